"""`pipeline build-shards manifest`: any corpus from one row per sample, without code.

Fixtures (ffmpeg and Pillow): silent videos with separate audio files (wav, mp3, ogg), images with inline
text, audio with text files, multi-label rows, a missing modality per row, and bad rows."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.adapters.manifest import manifest
from pipeline.build import BuildOptions, build_shards
from pipeline.cli import main
from shards.format import read_dataset_info
from shards.loader import make_loader
from tests.media import class_image, ffmpeg_clip

WORDS = {"cat": "meow whiskers purr", "dog": "bark fetch wag", "bird": "tweet wings nest"}
TONES = {"cat": 400, "dog": 700, "bird": 1000}


def audio_file(path: Path, tone: int, seconds: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency={tone}:sample_rate=16000:duration={seconds}", "-ac", "1", str(path)], check=True)
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def av_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Silent videos with separate audio files of three formats, one video with its own track and no audio
    cell, rows missing a modality, and bad rows."""
    root = tmp_path_factory.mktemp("raw") / "av"
    rows = []
    for i in range(12):
        label = list(WORDS)[i % 3]
        split = "test" if i >= 9 else "train"
        row = {"id": f"clip {i}", "split": split, "label": label,
               "video": f"video/{i}.mp4", "audio": f"audio/{i}.{['wav', 'mp3', 'ogg'][i % 3]}"}
        ffmpeg_clip(root / row["video"], seconds=1.0, size="64x48", audio=False, pattern="testsrc2")
        audio_file(root / row["audio"], TONES[label])
        rows.append(row)
    ffmpeg_clip(root / "video/own_track.mp4", seconds=1.0, size="64x48", audio=True, tone=500)
    rows += [
        {"id": "own track", "split": "train", "label": "cat", "video": "video/own_track.mp4", "audio": ""},
        {"id": "no video", "split": "train", "label": "dog", "video": "", "audio": "audio/0.wav"},
        {"id": "../escape", "split": "train", "label": "dog", "video": "../../etc/passwd", "audio": ""},
        {"id": "", "split": "train", "label": "dog", "video": "video/1.mp4", "audio": ""},
        {"id": "unknown label", "split": "test", "label": "horse", "video": "video/1.mp4", "audio": ""},
        {"id": "bad split", "split": "training", "label": "dog", "video": "video/1.mp4", "audio": ""},
        {"id": "nothing", "split": "train", "label": "dog", "video": "", "audio": ""},
        {"id": "missing file", "split": "test", "label": "dog", "video": "video/none.mp4", "audio": ""},
        {"id": "broken audio", "split": "test", "label": "bird", "video": "video/2.mp4", "audio": "audio/broken.wav"},
    ]
    (root / "audio" / "broken.wav").write_bytes(b"RIFF not really a wav" * 20)
    write_csv(root / "manifest.csv", rows, ["id", "split", "label", "video", "audio"])
    return root


def test_manifest_columns_give_the_modalities_and_rows_the_samples(av_corpus: Path) -> None:
    corpus = manifest(av_corpus)
    assert corpus.modalities == ["visual", "audio"] and corpus.classes == ["bird", "cat", "dog"]
    keys = {s.key for s in corpus.samples}
    assert {"clip_0", "own_track", "no_video", "broken_audio"} <= keys
    reasons = {r.key or r.source: r.reason for r in corpus.rejects}
    assert reasons["escape"].startswith("source path points outside --src: ../../etc/passwd")
    assert reasons["manifest.csv row 16"] == "empty id"
    assert reasons["unknown_label"] == "label(s) 'horse' not in the class list"
    assert reasons["bad_split"].startswith("unknown split 'training'")
    assert reasons["nothing"] == "no modality: every media and text cell is empty"
    assert reasons["missing_file"] == "video file not found"
    assert any(s.split == "val" for s in corpus.samples)  # no val rows: a fixed share of train


def test_manifest_build_takes_audio_from_the_audio_file_or_the_video_track(av_corpus: Path, tmp_path: Path) -> None:
    build_shards("manifest", av_corpus, tmp_path, BuildOptions(size=32, shard_size=4), workers=1, progress=False)
    ds = tmp_path / "manifest"
    rows = {r["key"]: r for r in pq.read_table(ds / "manifest.parquet").to_pylist()}
    assert rows["clip_1"]["has_visual"] and rows["clip_1"]["has_audio"]  # silent video + mp3
    assert 0.9 < rows["clip_2"]["audio_seconds"] < 1.1  # ogg
    assert rows["own_track"]["has_audio"]  # no audio cell: the video's own track
    assert rows["no_video"]["has_audio"] and not rows["no_video"]["has_visual"]
    assert rows["broken_audio"]["has_visual"] and not rows["broken_audio"]["has_audio"]
    kept = {r["key"]: r["reason"] for r in pq.read_table(ds / "rejects.parquet").to_pylist() if r["kept"]}
    assert kept["broken_audio"].startswith("audio/broken.wav: ")
    assert main(["-q", "verify", str(ds)]) == 0
    batch = next(iter(make_loader(ds, "train", 4, backend="torch", train=False)))
    assert tuple(batch["visual"].shape[1:3]) == (3, 3)  # T = 3 frames, RGB
    assert batch["present"].shape == (4, 2)


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Audio + text (a pair no built-in dataset has): JSON Lines, text files, multi-label rows."""
    root = tmp_path_factory.mktemp("raw") / "at"
    rows = []
    for i in range(18):
        label = list(WORDS)[i % 3]
        labels = label if i % 4 else f"{label}|{list(WORDS)[(i + 1) % 3]}"
        split = "test" if i >= 14 else "val" if i >= 12 else "train"
        text = root / "text" / f"{i}.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(f"{WORDS[label]} number {i}")
        row = {"id": f"s{i:02d}", "split": split, "labels": labels, "audio": f"audio/{i}.wav",
               "text_file": f"text/{i}.txt"}
        if i == 5:
            row["text_file"] = ""  # a missing modality
        if i == 7:
            row["audio"] = None
        if row["audio"]:
            audio_file(root / row["audio"], TONES[label])
        rows.append(row)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "classes.txt").write_text("dog\ncat\nbird\n")
    return root


def test_audio_text_multilabel_manifest_builds_and_loads(text_corpus: Path, tmp_path: Path) -> None:
    build_shards("manifest", text_corpus, tmp_path, BuildOptions(shard_size=4, max_len=16), workers=1,
                 progress=False)
    ds = tmp_path / "manifest"
    info = read_dataset_info(ds)
    assert info.modalities == ["audio", "text"] and info.classes == ["dog", "cat", "bird"] and info.multilabel
    assert info.visual is None and info.audio.kind == "waveform" and info.text.max_len == 16
    assert info.splits["train"]["samples"] == 12 and info.splits["test"]["samples"] == 4
    rows = {r["key"]: r for r in pq.read_table(ds / "manifest.parquet").to_pylist()}
    assert rows["s05"]["has_audio"] and not rows["s05"]["has_text"]
    assert rows["s07"]["has_text"] and not rows["s07"]["has_audio"]
    assert rows["s00"]["label_name"] == "dog|cat"  # in the order of classes.txt
    for backend in ("torch", "dali"):
        batch = next(iter(make_loader(ds, "train", 4, backend=backend, train=False)))
        assert set(batch) >= {"audio", "text", "present", "label"} and "visual" not in batch
        assert batch["label"].shape == (4, 3) and batch["present"].shape == (4, 2)


def test_a_parquet_manifest_with_images_and_inline_text(tmp_path: Path) -> None:
    root = tmp_path / "it"
    rows = []
    for i in range(6):
        class_image(root / "img" / f"{i}.jpg", i % 2, i)
        rows.append({"id": f"p{i}", "split": "test" if i > 3 else "train", "label": ["a", "b"][i % 2],
                     "image": f"img/{i}.jpg", "text": f"words {['alpha', 'beta'][i % 2]} {i}" if i != 2 else None})
    pq.write_table(pa.Table.from_pylist(rows), root / "data.parquet")
    assert main(["-q", "build-shards", "manifest", "--src", str(root), "--out", str(tmp_path / "out"),
                 "--manifest", str(root / "data.parquet"), "--size", "32"]) == 0
    info = read_dataset_info(tmp_path / "out" / "manifest")
    assert info.modalities == ["visual", "text"] and info.visual["frames"] == 1


@pytest.mark.parametrize("columns, message", [
    (["split", "label", "video"], "missing column id"),
    (["id", "split", "video"], "no 'label' or 'labels' column"),
    (["id", "split", "label"], "no modality column"),
    (["id", "split", "label", "video", "image"], "both 'video' and 'image' columns"),
])
def test_a_malformed_manifest_exits_2_in_one_line(columns: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "m"
    root.mkdir()
    write_csv(root / "manifest.csv", [{c: "x" for c in columns}], columns)
    assert main(["-q", "build-shards", "manifest", "--src", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------- adapter plugins

PLUGIN = '''
"""An adapter of another package: a folder of <label>/<name>.jpg images, all in train except test/."""
from pathlib import Path

from pipeline.adapters import Corpus, Sample
from pipeline.adapters.vision_language import IMAGE_TEXT


def folder_images(src: Path) -> Corpus:
    files = sorted(src.rglob("*.jpg"))
    classes = sorted({p.parent.name for p in files})
    samples = [Sample(f"{p.parent.parent.name}_{p.parent.name}_{p.stem}", p.parent.parent.name,
                      classes.index(p.parent.name), p.relative_to(src).as_posix(), kind="image_text")
               for p in files]
    return Corpus("folder_images", ["visual"], classes, samples, [], IMAGE_TEXT)
'''


def test_an_adapter_of_another_package_is_listed_and_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    site = tmp_path / "site"
    (site / "folder_plugin").mkdir(parents=True)
    (site / "folder_plugin" / "__init__.py").write_text(PLUGIN)
    dist = site / "folder_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: folder-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ume_mma.adapters]\nfolder_images = folder_plugin:folder_images\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(SystemExit):
        main(["build-shards", "--help"])
    assert "folder_images" in capsys.readouterr().out
    src = tmp_path / "images"
    for split in ("train", "test"):
        for c in range(2):
            class_image(src / split / f"class{c}" / f"{split}{c}.jpg", c, 0)
    assert main(["-q", "build-shards", "folder_images", "--src", str(src), "--out", str(tmp_path / "out"),
                 "--size", "32"]) == 0
    info = read_dataset_info(tmp_path / "out" / "folder_images")
    assert info.modalities == ["visual"] and info.splits["train"]["samples"] == 2


@pytest.mark.slow
def test_an_audio_text_manifest_trains_through_the_methods_stages_and_eval(text_corpus: Path, tmp_path: Path) -> None:
    """A modality pair no built-in dataset has, from the shipped starting config, end to end."""
    import os
    import sys

    build_shards("manifest", text_corpus, tmp_path / "shards", BuildOptions(shard_size=8, max_len=16, n_mels=32),
                 workers=1, progress=False)
    storage = tmp_path / "runs"
    sets = {"data.dataset_dir": str(tmp_path / "shards" / "manifest"), "ray.storage_path": str(storage),
            "data.batch_size": 4, "data.num_workers": 0, "data.backend": '"torch"', "train.epochs": 1,
            "mma.epochs": 1, "model.width": 8, "ray.cpus_per_worker": 1, "train.lr_milestones": "[]"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v) if k.endswith(('_dir', '_path')) else v}")]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "trainer" / "launch.py"), "--config",
                           "trainer/configs/manifest.toml", "--stages", "unimodal,mma,eval", *args], cwd=root,
                          capture_output=True, text=True, timeout=900, env=os.environ)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads((storage / "manifest" / "results" / "results.json").read_text())
    # the method's stages only: eval goes on without the joint baselines and says so
    assert list(results["methods"]) == ["audio-only", "text-only", "UME", "UME-MMA", "UME, branch weights fitted on val"]
    assert results["skipped_stages"] == ["joint", "joint_dropout"]
    assert any(n.startswith("baselines not trained, so not in the table: joint, joint_dropout") for n in results["notes"])
    assert {"full", "missing:audio", "missing:text", "rate:text=0.5"} <= set(results["scenarios"])
