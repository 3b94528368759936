"""Dataset adapters: each reads a raw corpus in its public release's own layout and lists samples.

An adapter returns `Sample`s (stable key, split, label, source file) and `Reject`s for annotation rows
that cannot become samples (file not there, malformed row, a path outside --src); rows of classes the
dataset does not keep (Kinetics-400 classes outside Kinetics-Sound) are skipped silently. Keys come from the source
ids, never from enumeration order, so a rebuild is deterministic."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from shards.format import sanitize_key


class SourceError(ValueError):
    """The raw corpus is not where or not what the adapter expects; the message says how to fix it."""


@dataclass(frozen=True)
class Sample:
    key: str
    split: str
    label: int
    source: str  # path relative to --src


@dataclass(frozen=True)
class Reject:
    key: str
    split: str
    source: str
    stage: str
    reason: str
    kept: bool = False  # True for partial problems: the sample was kept without one modality


@dataclass(frozen=True)
class Corpus:
    """What an adapter found: samples, rejects, class names and the modalities it provides."""

    name: str
    modalities: list[str]
    classes: list[str]
    samples: list[Sample]
    rejects: list[Reject]


def _require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{what} not found: {path}. {fix}")
    return path


def _require_dir(src: Path, dataset: str) -> None:
    if not src.is_dir():
        raise SourceError(f"--src {src} is not a directory; pass the root of the raw {dataset} corpus")


def _collect(rows, src: Path, classes: list[str], make: Callable) -> tuple[list[Sample], list[Reject]]:
    """Turn annotation rows into samples, rejecting missing files and duplicate keys."""
    index = {name: i for i, name in enumerate(classes)}
    samples: dict[str, Sample] = {}
    rejects: list[Reject] = []
    root = src.resolve()
    for row in rows:
        try:
            made = make(row)
        except ValueError as exc:  # an id with no usable character, e.g. ".."
            rejects.append(Reject("", "", "", "annotation", f"unusable row {row!r}: {exc}"))
            continue
        if made is None:
            continue
        if isinstance(made, Reject):
            rejects.append(made)
            continue
        key, split, label_name, rel = made
        if label_name not in index:
            continue  # a class the dataset does not keep (e.g. Kinetics-400 classes outside Kinetics-Sound)
        if not (src / rel).resolve().is_relative_to(root):
            rejects.append(Reject(key, split, rel, "annotation", "source path points outside --src"))
            continue
        if not (src / rel).is_file():
            rejects.append(Reject(key, split, rel, "source", "annotated file not found"))
            continue
        if key in samples:
            rejects.append(Reject(key, split, rel, "annotation", f"duplicate key (also {samples[key].source})"))
            continue
        samples[key] = Sample(key, split, index[label_name], rel)
    return sorted(samples.values(), key=lambda s: (s.split, s.key)), rejects


def kinetics_sound(src: Path, classes_file: Path | None = None) -> Corpus:
    """Kinetics-400 download (`{split}/<youtube_id>_<start:06d>_<end:06d>.mp4`, `annotations/<split>.csv`),
    keeping the Kinetics-Sound classes (shipped list, or `classes_file` with one name per line)."""
    _require_dir(src, "kinetics_sound")
    if classes_file is not None:
        classes = [c.strip() for c in _require_file(classes_file, "classes file", "pass an existing file").read_text().splitlines() if c.strip()]
    else:
        classes = resources.files("pipeline").joinpath("kinetics_sound_classes.txt").read_text().split("\n")
        classes = [c.strip() for c in classes if c.strip()]
    csvs = sorted((src / "annotations").glob("*.csv"))
    if not csvs:
        raise SourceError(
            f"no annotation CSVs in {src / 'annotations'}; the Kinetics-400 release has "
            f"annotations/{{train,val,test}}.csv with columns label,youtube_id,time_start,time_end,split")
    rows = []
    for path in csvs:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            missing = {"label", "youtube_id", "time_start", "time_end"} - set(reader.fieldnames or [])
            if missing:
                raise SourceError(f"{path}: missing columns {sorted(missing)}; expected label,youtube_id,time_start,time_end,split")
            rows.extend((path.stem, r) for r in reader)

    def make(item):
        csv_split, row = item
        split = (row.get("split") or csv_split).strip()
        try:
            stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except (TypeError, ValueError):
            return Reject(sanitize_key(str(row.get("youtube_id") or "row")), split, "", "annotation",
                          f"malformed row {dict(row)}")
        return sanitize_key(stem), split, (row.get("label") or "").strip(), f"{split}/{stem}.mp4"

    samples, rejects = _collect(rows, src, classes, make)
    return Corpus("kinetics_sound", ["visual", "audio"], classes, samples, rejects)


def ave(src: Path) -> Corpus:
    """AVE release: `AVE/<VideoID>.mp4`, `Annotations.txt` and `{train,val,test}Set.txt`
    (`Category&VideoID&Quality&StartTime&EndTime`); classes are the sorted categories of Annotations.txt."""
    _require_dir(src, "ave")
    fix = "the AVE release has Annotations.txt, trainSet.txt, valSet.txt, testSet.txt and the AVE/ video folder"
    annotations = _read_ave_list(_require_file(src / "Annotations.txt", "Annotations.txt", fix))
    classes = sorted({row[0] for row in annotations})
    rows = []
    for split in ("train", "val", "test"):
        path = _require_file(src / f"{split}Set.txt", f"{split}Set.txt", fix)
        rows.extend((split, row) for row in _read_ave_list(path))

    def make(item):
        split, row = item
        category, video_id = row[0], row[1]
        return sanitize_key(video_id), split, category, f"AVE/{video_id}.mp4"

    samples, rejects = _collect(rows, src, classes, make)
    return Corpus("ave", ["visual", "audio"], classes, samples, rejects)


def _read_ave_list(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = [f.strip() for f in line.split("&")]
        if len(fields) < 2 or fields[0] == "Category" or not fields[1]:
            continue  # header or blank line
        rows.append(fields)
    return rows


def av_digits(src: Path) -> Corpus:
    """The demo corpus of `pipeline make-demo av_digits`: `{split}/<clip_id>.mp4`,
    `annotations/{split}.csv` (clip_id,label,...) and `classes.txt`."""
    _require_dir(src, "av_digits")
    fix = "make it with `pipeline make-demo av_digits --out DIR` and pass that DIR as --src"
    classes = [c.strip() for c in _require_file(src / "classes.txt", "classes.txt", fix).read_text().splitlines() if c.strip()]
    csvs = sorted((src / "annotations").glob("*.csv"))
    if not csvs:
        raise SourceError(f"no annotation CSVs in {src / 'annotations'}; {fix}")
    rows = []
    for path in csvs:
        with open(path, newline="", encoding="utf-8") as f:
            rows.extend(csv.DictReader(f))

    def make(row):
        try:
            label_name = classes[int(row["label"])]
        except (KeyError, ValueError, IndexError):
            return Reject(sanitize_key(row.get("clip_id") or "row"), row.get("split", ""), "", "annotation",
                          f"bad label in row {dict(row)}")
        return sanitize_key(row["clip_id"]), row["split"], label_name, f"{row['split']}/{row['clip_id']}.mp4"

    samples, rejects = _collect(rows, src, classes, make)
    return Corpus("av_digits", ["visual", "audio"], classes, samples, rejects)


ADAPTERS: dict[str, Callable[..., Corpus]] = {
    "kinetics_sound": kinetics_sound,
    "ave": ave,
    "av_digits": av_digits,
}
