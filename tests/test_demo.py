"""The av_digits demo corpus: layout, annotations, streams, unseen test voices, determinism, resume, atomic clips."""
from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline import demo
from pipeline.demo import CLASS_NAMES, CSV_COLUMNS, SPLITS, load_mnist_5k, make_demo, plan_corpus

SIZES = {"n_train": 12, "n_val": 4, "n_test": 8}


def read_rows(out: Path, split: str) -> list[dict[str, str]]:
    with open(out / "annotations" / f"{split}.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def all_rows(out: Path) -> list[dict[str, str]]:
    return [row for split in SPLITS for row in read_rows(out, split)]


def first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    out = tmp_path_factory.mktemp("demo") / "av_digits"
    return out, make_demo(out, **SIZES, seed=0, workers=2, progress=False)


def test_layout_and_summary(corpus):
    out, summary = corpus
    assert (out / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)
    assert "seed 0" in (out / "README.txt").read_text()
    assert summary["counts"] == {"train": 12, "val": 4, "test": 8}
    assert summary["without_audio"] == sum(row["has_audio"] == "0" for row in all_rows(out)) > 0
    for split in SPLITS:
        rows = read_rows(out, split)
        assert list(rows[0]) == list(CSV_COLUMNS)
        assert [row["clip_id"] for row in rows] == sorted(row["clip_id"] for row in rows)
        assert {row["split"] for row in rows} == {split}
        assert sorted(p.name for p in (out / split).iterdir()) == [f"{row['clip_id']}.mp4" for row in rows]
        for row in rows:
            assert row["clip_id"].replace("_", "").isalnum() and row["clip_id"].startswith(f"{split}_")
            assert 0 <= int(row["label"]) <= 9


def test_streams_match_the_annotations(corpus):
    out, _ = corpus
    for row in all_rows(out):
        with av.open(str(out / row["split"] / f"{row['clip_id']}.mp4")) as container:
            video = container.streams.video[0]
            assert (video.codec_context.name, video.width, video.height) == ("h264", 112, 112)
            assert video.format.name == "yuv420p"
            assert len(list(container.decode(video=0))) == 20
            if row["has_audio"] == "0":
                assert not container.streams.audio
                assert row["voice"] == row["rate"] == row["pitch"] == ""
                continue
            audio = container.streams.audio[0]
            assert (audio.codec_context.name, audio.rate, audio.channels) == ("aac", 16_000, 1)
            assert float(audio.duration * audio.time_base) == pytest.approx(2.0, abs=0.1)


def test_decord_reads_both_kinds_of_clip(corpus):
    decord = pytest.importorskip("decord")
    out, _ = corpus
    rows = all_rows(out)
    heard = next(row for row in rows if row["has_audio"] == "1")
    silent = next(row for row in rows if row["has_audio"] == "0")
    for row in (heard, silent):
        frames = decord.VideoReader(str(out / row["split"] / f"{row['clip_id']}.mp4"))
        assert len(frames) == 20 and frames[0].shape == (112, 112, 3)
    heard_path = out / heard["split"] / f"{heard['clip_id']}.mp4"
    samples = decord.AudioReader(str(heard_path), sample_rate=16_000, mono=True)
    assert samples.shape[0] == 1 and samples.shape[1] == pytest.approx(32_000, rel=0.05)


def test_test_voices_are_unseen(corpus):
    out, _ = corpus
    voices = {split: {row["voice"] for row in read_rows(out, split) if row["voice"]} for split in SPLITS}
    assert voices["train"] and voices["test"]
    assert not (voices["train"] | voices["val"]) & voices["test"]


def test_plan_keeps_test_images_apart_and_covers_every_digit():
    _, labels = load_mnist_5k()
    plan = plan_corpus(labels, {"train": 3000, "val": 500, "test": 1000}, seed=0)
    images = {split: {c.image_index for c in plan if c.split == split} for split in SPLITS}
    assert len(images["train"]) == 3000 and len(images["val"]) == 500 and len(images["test"]) == 1000
    assert not images["train"] & images["val"] and not (images["train"] | images["val"]) & images["test"]
    for split in SPLITS:
        assert {c.label for c in plan if c.split == split} == set(range(10))
    assert sum(not c.has_audio for c in plan) == 150 + 25 + 50


def test_same_seed_same_corpus_other_seed_other_labels(corpus, tmp_path):
    out, _ = corpus
    again = tmp_path / "again"
    make_demo(again, **SIZES, seed=0, workers=1, progress=False)
    assert all_rows(again) == all_rows(out)
    for row in all_rows(out):
        name = Path(row["split"]) / f"{row['clip_id']}.mp4"
        assert np.array_equal(first_frame(again / name), first_frame(out / name))
        assert (again / name).read_bytes() == (out / name).read_bytes()

    other = tmp_path / "other"
    make_demo(other, **SIZES, seed=1, workers=2, progress=False)
    assert [row["label"] for row in all_rows(other)] != [row["label"] for row in all_rows(out)]


def test_rerun_resumes_and_refuses_other_parameters(corpus, tmp_path):
    out, _ = corpus
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    lost = copy / "train" / "train_000003.mp4"
    lost.unlink()
    summary = make_demo(copy, **SIZES, seed=0, workers=1, progress=False)
    assert summary["rendered"] == 1
    assert lost.read_bytes() == (out / "train" / "train_000003.mp4").read_bytes()
    with pytest.raises(ValueError, match="another --out"):
        make_demo(copy, **SIZES, seed=5, progress=False)


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.demo.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
        make_demo(tmp_path / "never", **SIZES, progress=False)


def test_a_clip_whose_encoding_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    """Clips are written through shards.writer.atomic_write: an encoder that dies half-way leaves neither a
    truncated clip (which a rerun would keep as done) nor a temporary file."""
    def dies_half_way(path: Path, frames: np.ndarray, audio: np.ndarray | None) -> None:
        path.write_bytes(b"half an mp4")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(demo, "write_clip_mp4", dies_half_way)
    images, labels = load_mnist_5k()
    clip = dataclasses.replace(plan_corpus(labels, {"train": 1, "val": 0, "test": 0}, seed=0)[0], has_audio=False)
    (tmp_path / clip.split).mkdir()
    with pytest.raises(RuntimeError, match="encoder died"):
        demo._write_clip((clip, images[clip.image_index], None, 0, tmp_path))
    assert list((tmp_path / clip.split).iterdir()) == []
