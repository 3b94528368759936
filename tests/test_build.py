"""`pipeline build-shards`, `verify` and `inspect` on tiny raw corpora (fixtures in conftest.py).

Pinned: manifest and rejects contents for the kinetics_sound and ave layouts; that plain tar, the
webdataset library and DALI's CPU webdataset reader read the shards; that the DALI index is what
`wds2idx` writes; determinism across worker counts; resume after SIGKILL; verify; bad input (exit 2,
one line, no traceback); sanitised keys; the inspect summary."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import wave
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from shards.format import NPY_HEADER_BYTES, read_dataset_info, read_index, sanitize_key
from shards.masks import key_uniform
from tests.conftest import FIXTURE_BUILD_ARGS, BuiltDataset, RawCorpus

SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
FRAMES = ["f0.jpg", "f1.jpg", "f2.jpg"]
WDS2IDX = Path(sys.executable).parent / "wds2idx"


# ----------------------------------------------------------------------------------------------- helpers

def manifest(ds: BuiltDataset) -> list[dict]:
    return pq.read_table(ds.path / "manifest.parquet").to_pylist()


def rejects(ds: BuiltDataset) -> list[dict]:
    return pq.read_table(ds.path / "rejects.parquet").to_pylist()


def shipped_kinetics_sound_classes() -> list[str]:
    text = resources.files("pipeline").joinpath("kinetics_sound_classes.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def kinetics_annotations(raw: RawCorpus) -> dict[str, tuple[str, str]]:
    """stem -> (split, label name) from the corpus' own annotation CSVs."""
    out = {}
    for path in sorted((raw.root / "annotations").glob("*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                stem = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}"
                out[stem] = (row["split"], row["label"])
    return out


def ave_annotations(raw: RawCorpus) -> dict[str, tuple[str, str]]:
    """video id -> (split, category) from the {split}Set.txt lists."""
    out = {}
    for split in ("train", "val", "test"):
        for line in (raw.root / f"{split}Set.txt").read_text().splitlines()[1:]:
            category, video_id = line.split("&")[:2]
            out[video_id] = (split, category)
    return out


def by_key(rows: list[dict]) -> dict[str, dict]:
    return {r["key"]: r for r in rows}


def expected_members(row: dict) -> list[str]:
    """Tar member names of one manifest row, in the order the format fixes."""
    exts = ["json", "cls", "label.npy", *FRAMES] + (["wav"] if row["has_audio"] else [])
    return [f"{row['key']}.{ext}" for ext in exts]


def tar_order(row: dict) -> tuple:
    """Where a sample lies: its shard, then the seeded key hash that orders a split (default seed 0)."""
    return row["shard"], key_uniform(row["key"], 0, "shard-order"), row["key"]


def shard_rows(ds: BuiltDataset) -> dict[str, list[dict]]:
    """Manifest rows per shard, in the order inside the tar."""
    out: dict[str, list[dict]] = {}
    for row in sorted(manifest(ds), key=tar_order):
        out.setdefault(row["shard"], []).append(row)
    return out


def output_files(dataset_dir: Path) -> dict[str, bytes]:
    """Every output file of a build (not the .build part files, not temporaries), by relative path."""
    files = {}
    for path in sorted(dataset_dir.rglob("*")):
        rel = path.relative_to(dataset_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = path.read_bytes()
    return files


def assert_same_outputs(got: Path, want: Path) -> None:
    a, b = output_files(got), output_files(want)
    assert sorted(a) == sorted(b)
    assert {"dataset.json", "manifest.parquet", "rejects.parquet"} <= set(a)
    assert any(n.endswith(".tar") for n in a) and any(n.endswith(".idx") for n in a)
    assert [n for n in a if a[n] != b[n]] == []


def cli(*args: str | Path) -> int:
    return main(["-q", *map(str, args)])


def copy_dataset(ds: BuiltDataset, dst: Path) -> Path:
    return Path(shutil.copytree(ds.path, dst / ds.raw.dataset))


# ------------------------------------------------------------------------------------ kinetics_sound

def test_kinetics_manifest_keeps_kinetics_sound_clips_with_shipped_class_indices(kinetics_sound_built: BuiltDataset) -> None:
    raw = kinetics_sound_built.raw
    annotations = kinetics_annotations(raw)
    classes = shipped_kinetics_sound_classes()
    rows = by_key(manifest(kinetics_sound_built))
    kept = raw.kinds["good"] + raw.kinds["no_audio"] + raw.kinds["short_audio"]
    assert sorted(rows) == sorted(kept)
    for stem, row in rows.items():
        split, label_name = annotations[stem]
        assert row["split"] == split
        assert row["label"] == classes.index(label_name)
        assert row["label_name"] == label_name
        assert row["source"] == f"{split}/{stem}.mp4"
        assert row["has_visual"] is True
        assert row["duration"] == pytest.approx(2.0, abs=0.2)
    info = read_dataset_info(kinetics_sound_built.path)
    assert info.classes == classes and len(classes) == 31
    assert info.modalities == ["visual", "audio"]


def test_kinetics_classes_outside_kinetics_sound_are_left_out(kinetics_sound_built: BuiltDataset) -> None:
    other = set(kinetics_sound_built.raw.kinds["other_class"])
    assert other and not other & {r["key"] for r in manifest(kinetics_sound_built)}
    for tar in kinetics_sound_built.path.glob("*/*.tar"):
        with tarfile.open(tar) as t:
            assert not other & {name.split(".")[0] for name in t.getnames()}


def test_kinetics_no_audio_and_short_audio_clips_are_kept_without_audio(kinetics_sound_built: BuiltDataset) -> None:
    raw = kinetics_sound_built.raw
    rows = by_key(manifest(kinetics_sound_built))
    for stem in raw.kinds["no_audio"] + raw.kinds["short_audio"]:
        assert rows[stem]["has_audio"] is False and rows[stem]["audio_seconds"] == 0.0
    for stem in raw.kinds["good"]:
        assert rows[stem]["has_audio"] is True and rows[stem]["audio_seconds"] == pytest.approx(2.0, abs=0.2)
    short = {r["key"]: r for r in rejects(kinetics_sound_built)}[raw.kinds["short_audio"][0]]
    assert (short["stage"], short["kept"]) == ("audio", True)
    assert "truncated" in short["reason"]
    no_audio = set(raw.kinds["no_audio"])
    assert not no_audio & {r["key"] for r in rejects(kinetics_sound_built)}  # no track at all: nothing to report


def test_kinetics_samples_without_audio_have_no_audio_member(kinetics_sound_built: BuiltDataset) -> None:
    for shard, rows in shard_rows(kinetics_sound_built).items():
        with tarfile.open(kinetics_sound_built.path / shard) as t:
            names = t.getnames()
        for row in rows:
            has_wav = f"{row['key']}.wav" in names
            assert has_wav == row["has_audio"], row["key"]
            assert not any(n.startswith(row["key"] + ".") and n.endswith((".flac", ".wav")) and not has_wav for n in names)


def test_kinetics_rejects_list_truncated_garbage_and_missing_with_stage_and_reason(kinetics_sound_built: BuiltDataset) -> None:
    raw = kinetics_sound_built.raw
    found = by_key(rejects(kinetics_sound_built))
    truncated, = raw.kinds["truncated"]
    garbage, = raw.kinds["garbage"]
    missing, = raw.kinds["missing"]
    assert found[truncated]["stage"] in ("probe", "frames") and not found[truncated]["kept"]
    assert found[garbage]["stage"] == "probe" and not found[garbage]["kept"]
    assert "not a readable media file" in found[garbage]["reason"]
    assert (found[missing]["stage"], found[missing]["reason"], found[missing]["kept"]) == \
        ("source", "annotated file not found", False)
    for stem in (truncated, garbage, missing):
        split = kinetics_annotations(raw)[stem][0]
        assert found[stem]["split"] == split and found[stem]["source"] == f"{split}/{stem}.mp4"
        assert found[stem]["reason"]
    assert sorted(found) == sorted([truncated, garbage, missing, *raw.kinds["short_audio"]])
    assert not {truncated, garbage, missing} & {r["key"] for r in manifest(kinetics_sound_built)}
    info = read_dataset_info(kinetics_sound_built.path)
    assert {s: c["rejected"] for s, c in info.splits.items()} == {"train": 1, "val": 2}
    assert {s: c["samples"] for s, c in info.splits.items()} == {"train": 5, "val": 4}


# ------------------------------------------------------------------------------------------------ ave

def test_ave_categories_sorted_are_the_classes(ave_built: BuiltDataset) -> None:
    info = read_dataset_info(ave_built.path)
    assert info.classes == ["Church bell", "Dog", "Violin, fiddle"]
    annotations = ave_annotations(ave_built.raw)
    for row in manifest(ave_built):
        split, category = annotations[row["key"]]
        assert (row["split"], row["label"], row["label_name"]) == (split, info.classes.index(category), category)
        assert row["source"] == f"AVE/{row['key']}.mp4"


def test_ave_missing_file_is_rejected_and_no_audio_clip_kept(ave_built: BuiltDataset) -> None:
    raw = ave_built.raw
    rows = by_key(manifest(ave_built))
    assert sorted(rows) == sorted(raw.kinds["good"] + raw.kinds["no_audio"])
    missing, = raw.kinds["missing"]
    no_audio, = raw.kinds["no_audio"]
    assert [(r["key"], r["split"], r["stage"], r["reason"], r["kept"]) for r in rejects(ave_built)] == \
        [(missing, "test", "source", "annotated file not found", False)]
    assert rows[no_audio]["has_audio"] is False
    assert all(rows[k]["has_audio"] for k in raw.kinds["good"])
    with tarfile.open(ave_built.path / rows[no_audio]["shard"]) as t:
        assert f"{no_audio}.wav" not in t.getnames() and f"{no_audio}.f0.jpg" in t.getnames()
    info = read_dataset_info(ave_built.path)
    assert {s: (c["samples"], c["rejected"], c["has_audio"]) for s, c in info.splits.items()} == \
        {"test": (2, 1, 2), "train": (3, 0, 2), "val": (3, 0, 3)}


# -------------------------------------------------------------------------------------------- readers

@pytest.mark.parametrize("fixture", ["kinetics_sound_built", "ave_built"])
def test_plain_tar_lists_every_member_in_format_order(fixture: str, request: pytest.FixtureRequest) -> None:
    ds: BuiltDataset = request.getfixturevalue(fixture)
    for shard, rows in shard_rows(ds).items():
        listed = subprocess.run(["tar", "tf", str(ds.path / shard)], check=True, capture_output=True, text=True)
        assert listed.stdout.splitlines() == [m for row in rows for m in expected_members(row)]


def test_webdataset_library_reads_every_sample_with_its_members(kinetics_sound_built: BuiltDataset) -> None:
    import webdataset as wds

    info = read_dataset_info(kinetics_sound_built.path)
    rows = sorted(manifest(kinetics_sound_built), key=tar_order)
    for split in info.splits:
        urls = [str(kinetics_sound_built.path / s.path) for s in info.shards_of(split)]
        want = [r for r in rows if r["split"] == split]
        got = list(wds.WebDataset(urls, shardshuffle=False))
        assert [s["__key__"] for s in got] == [r["key"] for r in want]
        for sample, row in zip(got, want):
            exts = {k for k in sample if not k.startswith("__")}
            assert exts == {m.split(".", 1)[1] for m in expected_members(row)}
            meta = json.loads(sample["json"])
            assert (meta["key"], meta["label"], meta["has_audio"]) == (row["key"], row["label"], row["has_audio"])
            assert int(sample["cls"]) == row["label"]
            assert np.load(io.BytesIO(sample["label.npy"])).tolist() == [row["label"]]
            with Image.open(io.BytesIO(sample["f0.jpg"])) as image:
                assert image.size == (160, 120)  # never upscaled past the 160x120 source
            if row["has_audio"]:
                with wave.open(io.BytesIO(sample["wav"])) as w:
                    assert (w.getframerate(), w.getnchannels()) == (16000, 1)
                    assert w.getnframes() == pytest.approx(row["audio_seconds"] * 16000, abs=8)  # seconds kept to 1 ms


@pytest.mark.parametrize("fixture", ["kinetics_sound_built", "ave_built"])
def test_dali_cpu_webdataset_reader_reads_whole_split_with_labels(fixture: str, request: pytest.FixtureRequest) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    ds: BuiltDataset = request.getfixturevalue(fixture)
    info = read_dataset_info(ds.path)
    rows = sorted(manifest(ds), key=tar_order)
    batch_size = 2
    for split in info.splits:
        tars = [str(ds.path / s.path) for s in info.shards_of(split)]
        want = [r for r in rows if r["split"] == split]

        @dali.pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
        def reader(tars=tars):
            jpg, wav, label = fn.readers.webdataset(
                paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["f0.jpg", "wav", "label.npy"],
                missing_component_behavior="empty", dtypes=[types.UINT8, types.UINT8, types.INT64], name="reader")
            return fn.decoders.image(jpg, device="cpu"), wav, label

        pipe = reader()
        pipe.build()
        assert pipe.epoch_size("reader") == len(want)
        samples = []
        for _ in range(math.ceil(len(want) / batch_size)):
            images, wavs, labels = pipe.run()
            samples += [(np.array(images[i]), np.array(wavs[i]), np.array(labels[i])) for i in range(len(labels))]
        del pipe
        for (image, wav, label), row in zip(samples[:len(want)], want, strict=True):
            assert image.shape == (120, 160, 3) and image.dtype == np.uint8
            assert label.dtype == np.int64 and label.size == NPY_HEADER_BYTES // 8 + 1
            assert int(label[-1]) == row["label"], row["key"]
            assert (wav.size > 0) == row["has_audio"], row["key"]


@pytest.mark.parametrize("fixture", ["kinetics_sound_built", "ave_built"])
def test_index_is_byte_identical_to_wds2idx(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    ds: BuiltDataset = request.getfixturevalue(fixture)
    tars = sorted(ds.path.glob("*/*.tar"))
    assert tars
    for i, tar in enumerate(tars):
        theirs = tmp_path / f"{i}.idx"
        subprocess.run([str(WDS2IDX), str(tar), str(theirs)], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_bytes() == theirs.read_bytes(), tar


# ------------------------------------------------------------------------------ determinism and resume

def test_build_is_byte_identical_for_one_and_two_workers(kinetics_sound_built: BuiltDataset, tmp_path: Path) -> None:
    """The fixture was built with one worker; a two-worker build (its own process) must match it."""
    subprocess.run([sys.executable, "-m", "pipeline.cli", "-q", "build-shards", "kinetics_sound",
                    "--src", str(kinetics_sound_built.raw.root), "--out", str(tmp_path), *FIXTURE_BUILD_ARGS,
                    "--workers", "2"], check=True, capture_output=True)
    assert len(read_dataset_info(tmp_path / "kinetics_sound").shards) > 2  # both workers had shards to build
    assert_same_outputs(tmp_path / "kinetics_sound", kinetics_sound_built.path)


def test_build_as_ray_tasks_is_byte_identical(kinetics_sound_built: BuiltDataset, tmp_path: Path) -> None:
    """`--ray` runs the same shard tasks on a (here: private local) Ray cluster, with the same bytes."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "-q", "build-shards", "kinetics_sound",
                           "--src", str(kinetics_sound_built.raw.root), "--out", str(tmp_path), *FIXTURE_BUILD_ARGS,
                           "--ray"], capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_outputs(tmp_path / "kinetics_sound", kinetics_sound_built.path)


# Runs the real CLI with every clip decode slowed down, so the kill reliably lands between shards
# however fast the machine is. The slowdown changes no output bytes.
THROTTLED_CLI = """
import sys, time
import pipeline.adapters.video as build
decode = build.decode_clip
def slow_decode(*args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return decode(*args, **kwargs)
build.decode_clip = slow_decode
from pipeline.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_rerun_after_sigkill_resumes_and_gives_identical_output(kinetics_sound_built: BuiltDataset, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    import pipeline.adapters.video

    src = kinetics_sound_built.raw.root
    out = tmp_path / "out"
    args = ["build-shards", "kinetics_sound", "--src", str(src), "--out", str(out), *FIXTURE_BUILD_ARGS,
            "--workers", "1"]
    n_shards = len(list(kinetics_sound_built.path.glob(".build/*-*.json")))
    parts_dir = out / "kinetics_sound" / ".build"
    proc = subprocess.Popen([sys.executable, "-c", THROTTLED_CLI, "0.5", "-q", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(parts_dir.glob("*-*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = len(list(parts_dir.glob("*-*.json")))
    assert 1 <= done < n_shards
    assert not (out / "kinetics_sound" / "dataset.json").exists()

    decoded: list[str] = []
    real_decode = pipeline.adapters.video.decode_clip

    def counting_decode(path, *a, **kw):
        decoded.append(Path(path).name)
        return real_decode(path, *a, **kw)

    monkeypatch.setattr(pipeline.adapters.video, "decode_clip", counting_decode)
    caplog.set_level(logging.INFO, logger="pipeline.build")
    assert main(["-q", *args]) == 0
    assert f"in {n_shards} shards ({done} already built, 0 to rebuild" in caplog.text
    samples = sum(read_dataset_info(kinetics_sound_built.path).splits[s]["samples"] for s in ("train", "val"))
    rejected_in_decode = sum(r["stage"] != "source" and not r["kept"] for r in rejects(kinetics_sound_built))
    assert 0 < len(decoded) < samples + rejected_in_decode  # the finished shards were not decoded again
    assert_same_outputs(out / "kinetics_sound", kinetics_sound_built.path)


# ------------------------------------------------------------------------------------------------ verify

def test_verify_passes_on_a_clean_build(kinetics_sound_built: BuiltDataset, capsys: pytest.CaptureFixture) -> None:
    assert cli("verify", kinetics_sound_built.path) == 0
    assert capsys.readouterr().out.startswith("OK ")


@pytest.mark.parametrize("where", ["jpeg payload", "tar header"])
def test_verify_catches_one_flipped_byte_and_names_the_shard(where: str, kinetics_sound_built: BuiltDataset,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = copy_dataset(kinetics_sound_built, tmp_path)
    shard = "train/000001.tar"
    tar = dataset / shard
    if where == "jpeg payload":
        offset, size = read_index(tar.with_suffix(".idx"))[0][1]["f1.jpg"]
        at = offset + size // 2
    else:
        at = 3  # inside the first member's name
    data = bytearray(tar.read_bytes())
    data[at] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert cli("verify", dataset) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
    assert fails and all(shard in line for line in fails)


def test_verify_catches_a_deleted_index(kinetics_sound_built: BuiltDataset, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    dataset = copy_dataset(kinetics_sound_built, tmp_path)
    (dataset / "val/000000.idx").unlink()
    assert cli("verify", dataset, "--no-decode") == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
    assert fails and all("val/000000.tar" in line for line in fails)


# --------------------------------------------------------------------------------------------- bad input

def assert_usage_error(capsys: pytest.CaptureFixture, *names: str | Path) -> str:
    """Exit code was 2: stderr is one line naming each of `names`, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0]
    return lines[0]


def test_unknown_dataset_name_exits_2_and_lists_the_choices(kinetics_sound_raw: RawCorpus, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    assert cli("build-shards", "kinetics", "--src", kinetics_sound_raw.root, "--out", tmp_path) == 2
    assert_usage_error(capsys, "'kinetics'", "kinetics_sound", "ave")


def test_nonexistent_src_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "no-such-corpus"
    assert cli("build-shards", "kinetics_sound", "--src", src, "--out", tmp_path / "out") == 2
    assert_usage_error(capsys, src, "--src")
    assert not (tmp_path / "out").exists()


def test_omitted_src_exits_2_naming_the_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli("build-shards", "ave", "--out", tmp_path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--src" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("dataset, expected", [("kinetics_sound", "annotations"), ("ave", "Annotations.txt")])
def test_src_without_annotations_exits_2_naming_the_file(dataset: str, expected: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "raw"
    (src / "train").mkdir(parents=True)
    assert cli("build-shards", dataset, "--src", src, "--out", tmp_path / "out") == 2
    assert_usage_error(capsys, expected, src)


def test_ave_src_without_split_list_exits_2_naming_it(ave_raw: RawCorpus, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    src = Path(shutil.copytree(ave_raw.root, tmp_path / "raw"))
    (src / "valSet.txt").unlink()
    assert cli("build-shards", "ave", "--src", src, "--out", tmp_path / "out") == 2
    assert_usage_error(capsys, "valSet.txt")


def test_unwritable_out_exits_2_naming_it(ave_raw: RawCorpus, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    assert cli("build-shards", "ave", "--src", ave_raw.root, "--out", out) == 2
    assert_usage_error(capsys, out, "--out")


def test_rerun_with_other_options_exits_2_and_leaves_the_build_alone(kinetics_sound_built: BuiltDataset,
                                                                    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = copy_dataset(kinetics_sound_built, tmp_path)
    assert cli("build-shards", "kinetics_sound", "--src", kinetics_sound_built.raw.root, "--out", tmp_path,
               *FIXTURE_BUILD_ARGS, "--frames", "2") == 2
    assert_usage_error(capsys, "frames", dataset)
    assert_same_outputs(dataset, kinetics_sound_built.path)


def test_verify_of_a_directory_without_dataset_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli("verify", tmp_path) == 2
    assert_usage_error(capsys, "dataset.json", "build-shards")


# ------------------------------------------------------------------------------------------ sanitising

@pytest.mark.parametrize("source_id, key", [
    ("../x", "x"),
    ("../../etc/passwd", "etc_passwd"),
    ("a/b/c", "a_b_c"),
    ("clip.v2.final", "clip_v2_final"),
    ("my clip 01", "my_clip_01"),
    ("-_Zz09_-", "-_Zz09_-"),
    ("..\\win\\path", "win_path"),
    ("ünïcode☃id", "n_code_id"),
])
def test_sanitize_key_keeps_only_safe_characters(source_id: str, key: str) -> None:
    assert sanitize_key(source_id) == key
    assert SAFE_KEY.fullmatch(sanitize_key(source_id))


@pytest.mark.parametrize("source_id", ["..", "/", "...", " . / "])
def test_sanitize_key_refuses_ids_with_no_safe_characters(source_id: str) -> None:
    with pytest.raises(ValueError):
        sanitize_key(source_id)


def test_kinetics_ids_with_path_parts_cannot_escape_the_shard(kinetics_sound_raw: RawCorpus, tmp_path: Path) -> None:
    """youtube_ids with `../`, dots and spaces give safe keys, and tar members without `/`."""
    src = tmp_path / "raw"
    clip = kinetics_sound_raw.root / "train" / f"{kinetics_sound_raw.kinds['good'][0]}.mp4"
    ids = {"../x": "x_000000_000010", "my clip.v2": "my_clip_v2_000000_000010", "sub/dir": "sub_dir_000000_000010"}
    (src / "annotations").mkdir(parents=True)
    (src / "train" / "sub").mkdir(parents=True)
    with open(src / "annotations" / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        for youtube_id in ids:
            writer.writerow(["playing drums", youtube_id, 0, 10, "train"])
            shutil.copy(clip, src / "train" / f"{youtube_id}_000000_000010.mp4")
    out = tmp_path / "out"
    assert cli("build-shards", "kinetics_sound", "--src", src, "--out", out) == 0
    assert sorted(r["key"] for r in pq.read_table(out / "kinetics_sound/manifest.parquet").to_pylist()) == sorted(ids.values())
    tars = list((out / "kinetics_sound").rglob("*.tar"))
    assert [t.relative_to(out).as_posix() for t in tars] == ["kinetics_sound/train/000000.tar"]
    with tarfile.open(tars[0]) as t:
        names = t.getnames()
    assert names and all("/" not in n and "\\" not in n and SAFE_KEY.fullmatch(n.split(".")[0]) for n in names)
    assert {n.split(".")[0] for n in names} == set(ids.values())
    assert sorted(p.name for p in out.iterdir()) == ["kinetics_sound"]


def test_keys_that_sanitise_alike_are_rejected_as_duplicates(kinetics_sound_raw: RawCorpus, tmp_path: Path) -> None:
    src = tmp_path / "raw"
    clip = kinetics_sound_raw.root / "train" / f"{kinetics_sound_raw.kinds['good'][0]}.mp4"
    (src / "annotations").mkdir(parents=True)
    (src / "train").mkdir()
    with open(src / "annotations" / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        for youtube_id in ("a b", "a_b"):
            writer.writerow(["playing drums", youtube_id, 0, 10, "train"])
            shutil.copy(clip, src / "train" / f"{youtube_id}_000000_000010.mp4")
    assert cli("build-shards", "kinetics_sound", "--src", src, "--out", tmp_path / "out") == 0
    ds = tmp_path / "out" / "kinetics_sound"
    assert [r["key"] for r in pq.read_table(ds / "manifest.parquet").to_pylist()] == ["a_b_000000_000010"]
    [reject] = pq.read_table(ds / "rejects.parquet").to_pylist()
    assert (reject["key"], reject["stage"]) == ("a_b_000000_000010", "annotation")
    assert "duplicate key" in reject["reason"]


def test_ave_video_id_without_safe_characters_is_rejected_not_a_crash(ave_raw: RawCorpus, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    src = Path(shutil.copytree(ave_raw.root, tmp_path / "raw"))
    with open(src / "trainSet.txt", "a") as f:
        f.write("Dog&..&good&0&10\n")
    assert cli("build-shards", "ave", "--src", src, "--out", tmp_path / "out") == 0
    assert "annotation" in {r["stage"] for r in pq.read_table(tmp_path / "out/ave/rejects.parquet").to_pylist()}


# ----------------------------------------------------------------------------------------------- inspect

def test_inspect_prints_counts_and_missing_audio_rate_per_split(kinetics_sound_built: BuiltDataset,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert cli("inspect", kinetics_sound_built.path) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["train"], ["val"])}
    # columns: split, samples, shards, MiB, no visual, no audio, rejected
    assert rows["train"][1:3] == ["5", "3"] and rows["train"][4:] == ["0.0%", "40.0%", "1"]
    assert rows["val"][1:3] == ["4", "3"] and rows["val"][4:] == ["0.0%", "0.0%", "2"]
    for split, fields in rows.items():
        split_rows = [r for r in manifest(kinetics_sound_built) if r["split"] == split]
        rate = sum(not r["has_audio"] for r in split_rows) / len(split_rows)
        assert fields[5] == f"{rate:.1%}"
    assert "playing drums" in out and "rejects by stage and reason" in out


# ---------------------------------------------------------------------------------------- shard order

def test_shards_mix_classes_when_keys_sort_by_class() -> None:
    """Food-101 keys are `train_<class>_<n>`: in key order each shard would hold one or two classes."""
    from pipeline.adapters import Sample
    from pipeline.build import plan_shards

    samples = [Sample(f"train_class{c:02d}_{n:03d}", "train", c, f"images/train/{c}/{n}.jpg")
               for c in range(10) for n in range(64)]
    tasks = plan_shards(samples, 32)
    assert sorted(s.key for t in tasks for s in t.samples) == sorted(s.key for s in samples)
    assert all(len({s.label for s in t.samples}) >= 8 for t in tasks)  # every shard holds most classes
    assert plan_shards(list(reversed(samples)), 32) == tasks  # deterministic, whatever the input order
    assert plan_shards(samples, 32, seed=1) != tasks


def test_audio_features_logmel_stores_the_loaders_log_mel_as_float16(kinetics_sound_built: BuiltDataset,
                                                                      tmp_path: Path) -> None:
    from shards.features import AudioParams, log_mel

    assert cli("build-shards", "kinetics_sound", "--src", kinetics_sound_built.raw.root, "--out", tmp_path,
               *FIXTURE_BUILD_ARGS, "--audio-features", "logmel", "--audio-seconds", "2") == 0
    info = read_dataset_info(tmp_path / "kinetics_sound")
    assert info.audio["kind"] == "logmel_array" and info.audio["dtype"] == "float16"
    assert info.audio["shape"] == [128, 2 * 16000 // 160 + 1]
    params = AudioParams.from_info(dataclasses.replace(info.audio, seconds=2.0))
    checked = 0
    for tar in sorted((tmp_path / "kinetics_sound").glob("*/*.tar")):
        ours = {n: m for n, m in read_index(tar.with_suffix(".idx"))}
        wav_tar = kinetics_sound_built.path / tar.relative_to(tmp_path / "kinetics_sound")
        for key, members in read_index(wav_tar.with_suffix(".idx")):
            if "wav" not in members:
                assert "logmel.npy" not in ours[key]
                continue
            with open(wav_tar, "rb") as f:
                f.seek(members["wav"][0])
                wav = f.read(members["wav"][1])
            with open(tar, "rb") as f:
                f.seek(ours[key]["logmel.npy"][0])
                stored = np.load(io.BytesIO(f.read(ours[key]["logmel.npy"][1])))
            with wave.open(io.BytesIO(wav)) as w:
                audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
            assert stored.dtype == np.float16 and stored.shape == tuple(info.audio["shape"])
            np.testing.assert_allclose(stored.astype(np.float32), log_mel(audio, params)[0].numpy(), atol=2e-3)
            checked += 1
    assert checked > 3  # every sample with audio compared


def test_audio_features_logmel_without_a_length_exits_2(kinetics_sound_raw: RawCorpus, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert cli("build-shards", "kinetics_sound", "--src", kinetics_sound_raw.root, "--out", tmp_path,
               "--audio-features", "logmel") == 2
    assert "--audio-seconds" in capsys.readouterr().err
