"""Benchmark helpers that change what is measured: the tiled view of a dataset (longer epochs, same data), the
loader benchmark's peers (the research code's loader, plain webdataset, the decoding floor) on a tiny corpus, and
the build benchmark on a corpus from the benchmarks' generator."""
from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shards.format import read_dataset_info
from shards.loader import make_loader
from shards.sample_refs import split_samples

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_corpus", ROOT / "benchmarks" / "corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)
tile_shards = corpus.tile_shards


def test_a_tiled_dataset_repeats_the_train_shards_and_keeps_the_other_splits(kinetics_sound_built,
                                                                            tmp_path: Path) -> None:
    src = kinetics_sound_built.path
    info = read_dataset_info(src)
    tiled = tile_shards(src, tmp_path / "x3" / src.name, 3)
    tiled_info = read_dataset_info(tiled)
    for split in info.splits:
        times = 3 if split == "train" else 1
        assert tiled_info.splits[split]["samples"] == times * info.splits[split]["samples"]
        keys = [r.key for r in split_samples(src, info, split)]
        assert [r.key for r in split_samples(tiled, tiled_info, split)] == keys * times
    tars = [Path(r.tar) for r in split_samples(tiled, tiled_info, "train")]
    assert all(t.stat().st_nlink > 1 for t in tars)  # hard links: no copy of the data
    batches = list(make_loader(tiled, "train", 2, backend="torch", train=True, num_workers=0))
    assert sum(len(b["key"]) for b in batches) == 2 * (3 * info.splits["train"]["samples"] // 2)
    assert json.loads((src / "dataset.json").read_text())["splits"]["train"]["samples"] == \
        info.splits["train"]["samples"]  # the source is untouched
    assert tile_shards(src, tmp_path / "x1", 1) == src
    with pytest.raises(ValueError):
        tile_shards(src, tmp_path / "x0", 0)


# ------------------------------------------------------------------------------- the loader benchmark's peers
def bench_module(name: str, monkeypatch: pytest.MonkeyPatch):
    """benchmarks/<name>.py imported as its scripts import each other (benchmarks/ on sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_the_peer_loaders_decode_each_sample_once_into_the_loader_tensors(kinetics_sound_built, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    peers = bench_module("peers", monkeypatch)
    from shards.features import AudioParams, VisualParams
    from shards.masks import DropSpec
    from shards.sample_refs import split_shards

    src = kinetics_sound_built.path
    info = read_dataset_info(src)
    refs = split_samples(src, info, "train")
    keys = sorted(r.key for r in refs)
    both = sorted(r.key for r in refs if "wav" in r.members and "f0.jpg" in r.members)
    visual, audio = VisualParams.from_info(info.visual, 32), AudioParams.from_info(info.audio)
    spec = DropSpec("independent", {"visual": 0.5, "audio": 0.5})

    files = peers.extract_ogm(src, info, "train", tmp_path / "ogm")
    root = Path(files["root"])
    assert sorted(p.name for p in (root / "visual" / both[0]).iterdir()) == [
        f"frame_{t:05d}.jpg" for t in range(1, visual.frames + 1)]
    assert np.load(root / "audio_spec" / f"{both[0]}.npy").shape == (audio.n_mels, audio.n_frames)
    batches = list(peers.OGMLoader(root, 2, 0, spec, seed=0, crop=32, pick_num=visual.frames))
    assert sorted(k for b in batches for k in b["key"]) == both  # OGM-GE leaves out clips missing a file
    b = batches[0]
    assert b["visual"].shape == (len(b["key"]), 3, visual.frames, 32, 32)  # OGM-GE's [B, 3, T, H, W]
    assert b["audio"].shape == (len(b["key"]), audio.n_mels, audio.n_frames)
    labels = {r["key"]: r["label"] for r in pq.read_table(src / "manifest.parquet").to_pylist()}
    ogm_classes = sorted(info.classes)
    assert all(ogm_classes[int(y)] == info.classes[labels[k]] for b in batches for k, y in zip(b["key"], b["label"]))
    for b in batches:  # dropped modalities are zeroed, never both
        assert b["present"].any(dim=1).all()
        assert all(bool(b["visual"][i].abs().sum() > 0) == bool(b["present"][i, 0]) for i in range(len(b["key"])))

    tars = [str(tar) for tar, _ in split_shards(src, info, "train")]
    batches = list(peers.WdsLoader(tars, visual, audio, 2, 0, spec, seed=0))
    assert sorted(k for b in batches for k in b["key"]) == keys
    assert batches[0]["visual"].shape[1:] == (visual.frames, 3, 32, 32)
    assert batches[0]["audio"].shape[1:] == (1, audio.n_mels, audio.n_frames)
    one_tar = sorted(r.key for r in refs if r.tar == tars[0])  # fewer tars than workers: samples are split
    batches = list(peers.WdsLoader(tars[:1], visual, audio, 2, 2, spec, seed=0))
    assert sorted(k for b in batches for k in b["key"]) == one_tar

    floor = peers.Floor(src, info, "train", spec, seed=0, crop=32)
    items = list(floor)
    assert sorted(k for it in items for k in it["key"]) == keys
    shown = [it for it in items if "visual" in it]
    assert shown and shown[0]["visual"].shape == (visual.frames, 32, 32, 3)
    assert all(it["audio"].shape == (1, audio.n_mels, audio.n_frames) for it in items if "audio" in it)
    assert len(list(peers.Floor(src, info, "train", spec, seed=0, crop=32, limit=2))) == 2


def test_the_loader_benchmark_reports_every_loader_against_the_research_loader_and_the_floor(
        kinetics_sound_raw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = bench_module("loader", monkeypatch)
    run = bench_module("run", monkeypatch)
    names = ["ogm", "wds", "torch", "torch_logmel", "floor"]  # torch_logmel: the clips built with the log-mel stored
    results = loader.main(["--src", str(kinetics_sound_raw.root), "--out", str(tmp_path), "--batch-size", "2",
                           "--repeats", "1", "--workers", "0", "--crop", "32", "--only", *names])
    assert json.loads((tmp_path / "loader.json").read_text())["configs"].keys() == results["configs"].keys()
    assert (tmp_path / "loader.png").stat().st_size > 0
    assert set(results["configs"]) == {f"{n}_p{p}" for n in names for p in ("0", "0.3")}
    for p in ("p0", "p0.3"):
        for ref in ("ogm", "floor"):
            assert set(results["ratios"][f"over_{ref}"][p]) == set(names)
            assert results["ratios"][f"over_{ref}"][p][ref] == {"samples_per_s": 1.0, "cpu_ms_per_sample": 1.0}
    assert set(results["targets"]) == {f"{n} CPU-ms/sample <= ogm (p={p})" for n in ("torch", "torch_logmel")
                                       for p in ("0", "0.3")}
    assert all(c["cpu_ms_per_sample"] > 0 for c in results["configs"].values())
    # batches of 2: every epoch has a rate after its first batch
    assert all(c["steady_samples_per_s"] > 0 for c in results["configs"].values() if c["loader"] != "floor")
    assert loader.measure([{"key": ["a", "b"]}], repeats=1, warmup=0)["steady_samples_per_s"] is None  # one batch
    table = run.loader_section(results)
    rows = [line for line in table if line.startswith(tuple(f"| {n} |" for n in names))]
    assert len(rows) == 2 * len(names)
    assert all(line.count("|") == table[table.index(rows[0]) - 1].count("|") for line in rows)


def test_the_loader_benchmark_counts_the_cpu_time_of_workers_still_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = bench_module("loader", monkeypatch)
    before = loader.live_children_cpu_seconds()
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    worker = subprocess.Popen([sys.executable, "-c", code])  # a persistent worker: busy, then alive and idle
    try:
        deadline = time.monotonic() + 20
        while loader.live_children_cpu_seconds() - before < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loader.live_children_cpu_seconds() - before >= 0.25  # RUSAGE_CHILDREN has none of it yet
    finally:
        worker.kill()
        worker.wait()


def test_the_step_benchmark_measures_each_batch_size_asked_for(kinetics_sound_built, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    train = bench_module("train", monkeypatch)
    run = bench_module("run", monkeypatch)
    result = train.main(["--out", str(tmp_path), "--shards", str(kinetics_sound_built.path), "--no-ray",
                         "--step-batches", "1", "--warmup-batches", "0", "--repeats", "1", "--step-batch-sizes", "1", "2",
                         "--set", "model.width=4", "--set", "data.crop_size=32", "--set", "data.batch_size=1",
                         "--set", "data.backend=torch", "--set", "data.num_workers=0"])
    assert result["step"]["batch_size"] == 1 and list(result["step_at_batch_size"]) == ["2"]
    assert result["step_at_batch_size"]["2"]["batch_size"] == 2
    table = run.train_section(result)
    assert [line.split("|")[1].strip() for line in table if line.startswith("| 1 |") or line.startswith("| 2 |")] == ["1", "2"]


# ------------------------------------------------------------------ the build benchmark and its corpus generator
@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("ffmpeg")), reason="needs espeak-ng and ffmpeg")
def test_the_build_benchmark_times_build_and_decode_floor_on_a_generated_corpus(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/build.py on the demo corpus that corpus.make_demo_corpus generates (the benchmarks' one
    generator for it): both timings per worker count, their ratio, build.json and build.png."""
    build = bench_module("build", monkeypatch)
    assert build.make_demo_corpus is bench_module("corpus", monkeypatch).make_demo_corpus
    assert build.main(["--out", str(tmp_path), "--corpus", "demo", "--clips", "3", "--workers", "1",
                       "--repeats", "1", "--shard-size", "2"]) == 0
    result = json.loads((tmp_path / "build.json").read_text())
    assert (tmp_path / "build.png").stat().st_size > 0
    assert result["corpus"] == {"name": "av_digits", "clips": 3, "dataset": "av_digits",
                                "src": str(tmp_path / "raw-demo-3")}
    (row,) = result["results"]
    assert row["workers"] == 1 and row["build_clips_per_s"] > 0 and row["floor_clips_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["build_clips_per_s"] / row["floor_clips_per_s"], abs=0.01)
    assert not (tmp_path / "shards").exists()  # each timed build starts from nothing and is removed

    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build.py"), "--out", str(tmp_path),
                              "--src", str(tmp_path / "raw-demo-3")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--src needs --dataset" in refused.stderr, refused.stderr


def test_a_benchmark_clip_whose_ffmpeg_fails_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clips are written through shards.writer.atomic_write: a failed ffmpeg leaves neither a truncated clip (which
    a rerun would keep) nor a temporary file."""
    def half_written_then_fails(ffmpeg: str, index: int, seed: int, out: Path) -> list[str]:
        return ["sh", "-c", f"printf 'half an mp4' > '{out}'; exit 1"]

    monkeypatch.setattr(corpus, "ffmpeg_command", half_written_then_fails)
    with pytest.raises(subprocess.CalledProcessError):
        corpus.write_clip("ffmpeg", 0, 0, tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []
