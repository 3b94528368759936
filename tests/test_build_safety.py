"""What bad or edited input does to `pipeline build-shards`: nothing read from the data reaches a path,
a rerun after editing the corpus is never stale, bad labels and annotation files are named, and a build
stops cleanly (Ctrl-C, SIGKILL) without leaving processes behind.

The corpora here are tiny `av_digits`-layout corpora made with ffmpeg (1 s clips), plus the MM-IMDB and
Kinetics-400 layouts of tests/media.py."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.adapters import Sample
from pipeline.adapters.video import av_digits
from pipeline.build import BuildOptions, build_shards, plan_shards
from pipeline.cli import main
from shards.format import read_dataset_info
from tests.media import ffmpeg_clip, mm_imdb_corpus
from tests.test_build import THROTTLED_CLI

COLUMNS = ["clip_id", "label", "split"]
CLASSES = ["zero", "one", "two"]


def digits_corpus(root: Path, n: int = 6, splits: tuple[str, ...] = ("train", "test")) -> dict[str, list[dict]]:
    """An av_digits-layout corpus: `classes.txt`, `annotations/<split>.csv`, `<split>/<clip_id>.mp4`."""
    rows: dict[str, list[dict]] = {}
    for split in splits:
        rows[split] = []
        for i in range(n):
            clip_id = f"{split}_{i:03d}"
            ffmpeg_clip(root / split / f"{clip_id}.mp4", seconds=1.0, size="64x48", tone=300 + 50 * i)
            rows[split].append({"clip_id": clip_id, "label": str(i % len(CLASSES)), "split": split})
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    write_annotations(root, rows)
    return rows


def write_annotations(root: Path, rows: dict[str, list[dict]], columns: list[str] = COLUMNS) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for old in (root / "annotations").glob("*.csv"):
        old.unlink()
    for name, split_rows in rows.items():
        with open(root / "annotations" / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(split_rows)


@pytest.fixture(scope="module")
def digits_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "digits"
    digits_corpus(root)
    return root


def fresh_copy(raw: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / "src"))


def read_rows(raw: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted((raw / "annotations").glob("*.csv")):
        with open(path, newline="") as f:
            out[path.stem] = list(csv.DictReader(f))
    return out


def build(src: Path, out: Path, shard_size: int = 2, dataset: str = "av_digits") -> None:
    build_shards(dataset, src, out, BuildOptions(shard_size=shard_size, size=32), workers=1, progress=False)


def rejects_of(dataset_dir: Path) -> list[dict]:
    return pq.read_table(dataset_dir / "rejects.parquet").to_pylist()


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def outputs(dataset_dir: Path) -> dict[str, bytes]:
    """Every published output of a build (not the .build part files), by relative path."""
    return {rel: (dataset_dir / rel).read_bytes() for rel in sorted(files_under(dataset_dir))
            if not any(part.startswith(".") for part in rel.split("/"))}


def cli_error(capsys: pytest.CaptureFixture, *args: object) -> str:
    assert main(["-q", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ------------------------------------------------------------------------------ data never chooses a path

@pytest.mark.parametrize("bad_split", ["train/../test", "../../escaped", "link"])
def test_split_names_from_annotations_are_rejected_not_used_as_paths(bad_split: str, digits_raw: Path,
                                                                      tmp_path: Path) -> None:
    """`train/../test` would write over the test split, `../../escaped` outside --out, and `link` (a link
    inside --src to the train folder) would read train clips as another split."""
    src = fresh_copy(digits_raw, tmp_path)
    (src / "link").symlink_to(src / "train")
    rows = read_rows(src)
    rows["train"][0] = dict(rows["train"][0], split=bad_split)
    write_annotations(src, rows)
    out = tmp_path / "out"
    build(src, out)
    ds = out / "av_digits"
    assert files_under(tmp_path) - files_under(src).__class__() >= set()  # build finished
    assert not (tmp_path / "escaped").exists() and not (out / "escaped").exists()
    assert {p.name for p in ds.iterdir() if p.is_dir() and not p.name.startswith(".")} == {"train", "test"}
    bad = [r for r in rejects_of(ds) if r["key"] == "train_000"]
    assert len(bad) == 1 and bad[0]["reason"].startswith(f"unknown split {bad_split!r}")
    info = read_dataset_info(ds)
    assert info.splits["train"]["samples"] == 5 and info.splits["test"]["samples"] == 6


def test_a_split_folder_linked_out_of_out_is_refused_before_any_write(digits_raw: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out" / "av_digits").mkdir(parents=True)
    (tmp_path / "out" / "av_digits" / "train").symlink_to(elsewhere)
    err = cli_error(capsys, "build-shards", "av_digits", "--src", digits_raw, "--out", tmp_path / "out",
                    "--size", "32")
    assert "outside --out" in err and "train/000000.tar" in err
    assert list(elsewhere.iterdir()) == []


def test_mm_imdb_ids_and_split_keys_cannot_reach_outside_src(tmp_path: Path) -> None:
    """An id `../../../elsewhere/private` would copy a file from outside --src into a shard and the
    vocabulary; a split key `../../../x` would name an output folder."""
    src = tmp_path / "mmimdb_root"
    mm_imdb_corpus(src)
    private = tmp_path / "elsewhere" / "private.json"
    private.parent.mkdir()
    private.write_text(json.dumps({"genres": ["Drama"], "plot": ["supersecretword appears here"]}))
    split_path = src / "mmimdb" / "split.json"
    splits = json.loads(split_path.read_text())
    splits["train"].append("../../../elsewhere/private")
    splits["../../../x"] = [splits["train"][0]]
    split_path.write_text(json.dumps(splits))
    out = tmp_path / "out"
    build_shards("mm_imdb", src, out, BuildOptions(shard_size=4, size=32), workers=1, progress=False)
    ds = out / "mm_imdb"
    reasons = {r["reason"] for r in rejects_of(ds)}
    assert any(r.startswith("source path points outside --src: mmimdb/dataset/../../../elsewhere/private.json")
               for r in reasons)
    assert any(r.startswith("unknown split '../../../x'") for r in reasons)
    assert "supersecretword" not in (ds / "vocab.txt").read_text()
    assert not any(b"supersecretword" in data for data in outputs(ds).values())
    assert not (tmp_path / "x").exists() and not (out / "x").exists()
    assert set(read_dataset_info(ds).splits) == {"train", "val", "test"}


# ------------------------------------------------------------------------------ a rerun is never stale

def plan(src: Path) -> dict[str, tuple[Sample, ...]]:
    """Shard name -> its samples, as the build plans them (shard size 2)."""
    return {t.name: t.samples for t in plan_shards(av_digits(src).samples, 2)}


def test_rerun_after_editing_the_annotations_rebuilds_exactly_the_changed_shards(
        digits_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.adapters.video

    src = fresh_copy(digits_raw, tmp_path)
    out = tmp_path / "out"
    build(src, out)
    before_plan = plan(src)
    before = outputs(out / "av_digits")
    rows = read_rows(src)
    rows["train"][1]["label"] = "0"  # a label fixed (was 1)
    del rows["test"][5]  # two clips removed: the test split needs one shard less
    del rows["test"][4]
    ffmpeg_clip(src / "train" / "train_100.mp4", seconds=1.0, size="64x48")  # a clip added
    rows["train"].append({"clip_id": "train_100", "label": "2", "split": "train"})
    write_annotations(src, rows)
    after_plan = plan(src)
    changed = {name for name, samples in after_plan.items() if before_plan.get(name) != samples}
    assert 0 < len(changed) < len(after_plan)  # some shards are reused, some are not
    removed = set(before_plan) - set(after_plan)
    assert removed == {"test/000002.tar"}

    decoded: list[str] = []
    real = pipeline.adapters.video.decode_clip
    def counting(path, *a, **k):
        decoded.append(Path(path).stem)
        return real(path, *a, **k)

    monkeypatch.setattr(pipeline.adapters.video, "decode_clip", counting)
    build(src, out)
    assert sorted(decoded) == sorted(s.key for name in changed for s in after_plan[name])
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(pipeline.adapters.video, "decode_clip", real)
    build(src, fresh)
    got, want = outputs(out / "av_digits"), outputs(fresh / "av_digits")
    assert sorted(got) == sorted(want) and [n for n in got if got[n] != want[n]] == []
    assert "test/000002.tar" in before and "test/000002.tar" not in got
    assert not (out / "av_digits" / ".build" / "test-000002.json").exists()
    manifest = {r["key"]: r for r in pq.read_table(out / "av_digits" / "manifest.parquet").to_pylist()}
    assert manifest["train_001"]["label"] == 0 and "train_100" in manifest and "test_005" not in manifest
    assert main(["-q", "verify", str(out / "av_digits")]) == 0


def test_rerun_after_replacing_a_clip_rebuilds_its_shard(digits_raw: Path, tmp_path: Path) -> None:
    src = fresh_copy(digits_raw, tmp_path)
    out = tmp_path / "out"
    build(src, out)
    before = outputs(out / "av_digits")
    ffmpeg_clip(src / "test" / "test_003.mp4", seconds=1.0, size="64x48", pattern="smptebars")
    build(src, out)
    after = outputs(out / "av_digits")
    shard = next(name for name, samples in plan(src).items() if "test_003" in {s.key for s in samples})
    assert sorted(n for n in after if after[n] != before.get(n) and n.endswith(".tar")) == [shard]


def test_a_shard_whose_samples_all_fail_leaves_no_old_tar_behind(digits_raw: Path, tmp_path: Path) -> None:
    src = fresh_copy(digits_raw, tmp_path)
    out = tmp_path / "out"
    build(src, out)
    for sample in plan(src)["test/000002.tar"]:
        (src / sample.source).write_bytes(b"not a video any more\n" * 50)
    build(src, out)
    ds = out / "av_digits"
    assert not (ds / "test" / "000002.tar").exists() and not (ds / "test" / "000002.idx").exists()
    assert [s.path for s in read_dataset_info(ds).shards if s.split == "test"] == ["test/000000.tar", "test/000001.tar"]


# ------------------------------------------------------------------------------ labels and annotation files

def test_negative_and_out_of_range_labels_are_rejected_with_the_reason(digits_raw: Path, tmp_path: Path) -> None:
    src = fresh_copy(digits_raw, tmp_path)
    rows = read_rows(src)
    rows["train"][0]["label"] = "-1"
    rows["train"][1]["label"] = "3"
    write_annotations(src, rows)
    build(src, tmp_path / "out")
    ds = tmp_path / "out" / "av_digits"
    bad = {r["key"]: r["reason"] for r in rejects_of(ds) if r["stage"] == "annotation"}
    assert bad["train_000"].startswith("label '-1' is not a class index 0..2")
    assert bad["train_001"].startswith("label '3' is not a class index 0..2")
    keys = set(pq.read_table(ds / "manifest.parquet").column("key").to_pylist())
    assert not {"train_000", "train_001"} & keys


def test_annotation_without_a_required_column_exits_2_naming_file_column_and_header(
        digits_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = fresh_copy(digits_raw, tmp_path)
    write_annotations(src, read_rows(src), columns=["clip_id", "split"])
    err = cli_error(capsys, "build-shards", "av_digits", "--src", src, "--out", tmp_path / "out")
    assert "annotations/test.csv" in err and "missing column label" in err and "clip_id,label,split" in err
    assert len(err.strip().splitlines()) == 1


def test_non_utf8_annotation_bytes_are_replaced_counted_and_reported(digits_raw: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    src = fresh_copy(digits_raw, tmp_path)
    path = src / "annotations" / "test.csv"
    path.write_bytes(path.read_bytes().replace(b"test_002,", b"test_002\xff\xfe,", 1))
    build(src, tmp_path / "out")
    info = read_dataset_info(tmp_path / "out" / "av_digits")
    assert info.build["annotation_replaced"] == {"annotations/test.csv": 2}  # \xff and \xfe
    assert "annotations/test.csv: 2 invalid UTF-8 sequence(s) replaced" in caplog.text
    assert info.splits["test"]["samples"] == 5  # the damaged id names no file: rejected, not a crash


def test_kinetics_rows_of_other_classes_are_counted_by_label_and_empty_classes_warned(
        kinetics_sound_built, caplog: pytest.LogCaptureFixture) -> None:
    info = read_dataset_info(kinetics_sound_built.path)
    assert info.build["skipped_labels"] == {"abseiling": 6}
    assert "playing drums" not in info.build["empty_classes"]
    assert len(info.build["empty_classes"]) == len(info.classes) - 2


# ------------------------------------------------------------------------------ an empty build says why

def test_a_build_with_no_usable_sample_writes_rejects_and_names_the_common_reasons(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere"
    digits_corpus(elsewhere, n=3, splits=("train",))
    src = tmp_path / "src"
    (src / "annotations").mkdir(parents=True)
    shutil.copy(elsewhere / "classes.txt", src / "classes.txt")
    shutil.copy(elsewhere / "annotations" / "train.csv", src / "annotations" / "train.csv")
    (src / "train").symlink_to(elsewhere / "train")  # a link out of --src: every clip resolves outside
    err = cli_error(capsys, "build-shards", "av_digits", "--src", src, "--out", tmp_path / "out")
    assert "found no usable samples (3 rejected" in err
    assert f"3 x source path points outside --src: train/train_000.mp4 -> {elsewhere}/train/train_000.mp4" in err
    assert "hint: links under --src must point inside --src" in err
    rejects = rejects_of(tmp_path / "out" / "av_digits")
    assert len(rejects) == 3 and all("outside --src" in r["reason"] for r in rejects)


# ------------------------------------------------------------------------------ stopping a build



def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from the parent field of every /proc/<pid>/stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def start_slow_build(src: Path, out: Path, workers: int) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", THROTTLED_CLI, "1.0", "-q", "build-shards", "av_digits",
                             "--src", str(src), "--out", str(out), "--shard-size", "2", "--size", "32",
                             "--workers", str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    workers_seen: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None:
        workers_seen = children(proc.pid)
        if len(workers_seen) >= workers and list((out / "av_digits" / ".build").glob("*-*.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    return proc, workers_seen


def test_sigkill_of_a_two_worker_build_leaves_no_worker_behind(digits_raw: Path, tmp_path: Path) -> None:
    proc, workers = start_slow_build(digits_raw, tmp_path / "out", workers=2)
    assert len(workers) == 2
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if alive(w)]
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)


def test_ctrl_c_prints_one_line_exits_130_and_a_rerun_resumes(digits_raw: Path, tmp_path: Path) -> None:
    proc, workers = start_slow_build(digits_raw, tmp_path / "out", workers=2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    started = time.monotonic()
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 10
    assert proc.returncode == 130
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.decode(), err.decode()
    assert lines[0].startswith("interrupted: ") and "of 6 shards of av_digits are finished" in lines[0]
    assert "rerun the same command to resume" in lines[0]
    assert not [w for w in workers if alive(w)]
    build(digits_raw, tmp_path / "out", shard_size=2)
    fresh = tmp_path / "fresh"
    build(digits_raw, fresh, shard_size=2)
    assert outputs(tmp_path / "out" / "av_digits") == outputs(fresh / "av_digits")
