"""Small raw corpora for tests, made with ffmpeg: good clips, no-audio, short-audio, truncated, garbage."""
from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path


def ffmpeg_clip(path: Path, seconds: float = 2.0, audio: bool = True, audio_seconds: float | None = None,
                size: str = "160x120", tone: int = 440, pattern: str = "testsrc2") -> Path:
    """An H.264 mp4 with an optional AAC tone; `audio_seconds` shorter than `seconds` makes a clip whose
    container declares more than its audio stream holds."""
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is needed for the test media: apt-get install -y ffmpeg")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size={size}:rate=10:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate=22050:duration={audio_seconds or seconds}"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-threads", "1"]
    cmd += ["-c:a", "aac", "-ac", "1"] if audio else []
    cmd += [str(path)]
    subprocess.run(cmd, check=True)
    return path


def truncate(path: Path, keep: float = 0.4) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def kinetics_sound_corpus(root: Path, n_per_class: int = 3) -> dict[str, list[str]]:
    """Kinetics-400 layout with two Kinetics-Sound classes and one class outside it, plus bad items.

    Returns the stems of the special cases by kind."""
    classes = ["playing drums", "playing piano", "abseiling"]
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    kinds: dict[str, list[str]] = {"good": [], "no_audio": [], "short_audio": [], "truncated": [],
                                   "garbage": [], "missing": [], "other_class": []}
    for split in rows:
        for c, label in enumerate(classes):
            for i in range(n_per_class):
                yid = f"{split[:2]}{c}x{i}Ab-_{i}"
                start = 10 * i
                stem = f"{yid}_{start:06d}_{start + 10:06d}"
                rows[split].append({"label": label, "youtube_id": yid, "time_start": start,
                                    "time_end": start + 10, "split": split})
                path = root / split / f"{stem}.mp4"
                kind = "other_class" if label == "abseiling" else "good"
                if kind == "good" and split == "train" and c == 0:
                    kind = ["good", "no_audio", "short_audio"][i % 3]
                if kind == "good" and split == "train" and c == 1 and i == 1:
                    kind = "truncated"
                if kind == "good" and split == "val" and c == 1 and i == 0:
                    kind = "garbage"
                if kind == "good" and split == "val" and c == 0 and i == 1:
                    kind = "missing"
                kinds[kind].append(stem)
                if kind == "missing":
                    continue
                if kind == "garbage":
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"this is not a video at all\n" * 100)
                    continue
                ffmpeg_clip(path, audio=kind != "no_audio", audio_seconds=0.3 if kind == "short_audio" else None,
                            tone=300 + 100 * c + 10 * i)
                if kind == "truncated":
                    truncate(path)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        with open(root / "annotations" / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writeheader()
            writer.writerows(split_rows)
    return kinds


def ave_corpus(root: Path) -> dict[str, list[str]]:
    """AVE layout: Annotations.txt, {train,val,test}Set.txt with `&`-separated fields, AVE/<id>.mp4."""
    categories = ["Church bell", "Dog", "Violin, fiddle"]
    lines = {"train": [], "val": [], "test": []}
    kinds: dict[str, list[str]] = {"good": [], "no_audio": [], "missing": []}
    n = 0
    for split in lines:
        for c, category in enumerate(categories):
            video_id = f"{split}V{c}-{n:03d}"
            n += 1
            kind = "good"
            if split == "test" and c == 2:
                kind = "missing"
            elif split == "train" and c == 1:
                kind = "no_audio"
            kinds[kind].append(video_id)
            lines[split].append(f"{category}&{video_id}&good&0&10")
            if kind != "missing":
                ffmpeg_clip(root / "AVE" / f"{video_id}.mp4", audio=kind != "no_audio", tone=500 + 50 * c)
    header = "Category&VideoID&Quality&StartTime&EndTime"
    (root / "Annotations.txt").write_text("\n".join([header] + sum(lines.values(), [])) + "\n")
    for split, split_lines in lines.items():
        (root / f"{split}Set.txt").write_text("\n".join([header] + split_lines) + "\n")
    return kinds
