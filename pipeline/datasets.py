"""Dataset adapters: each reads a raw corpus in its public release's own layout and lists samples.

Video datasets (kinetics_sound, ave, av_digits) give one source clip per sample; the vision-language
datasets (mm_imdb, food101) give an image path (possibly none) and the text, read and decoded here so
the build can make the vocabulary from the train split first; av_mnist gives rows of the public arrays.

An adapter returns `Sample`s (stable key, split, label, source file) and `Reject`s for annotation rows
that cannot become samples (file not there, malformed row, a label outside the class list, a split that is
not one of the adapter's known names, a path outside --src); rows of classes the dataset does not keep
(Kinetics-400 classes outside Kinetics-Sound) are skipped and counted by label (`Corpus.skipped_labels`).
Keys come from the source ids, never from enumeration order, so a rebuild is deterministic.

Nothing read from the data chooses a path: a split must be one of `SPLITS` (an adapter's own names are
mapped onto them, e.g. MM-IMDB's `dev`), and every source path must resolve, links followed, inside --src.
Annotation files are read with one policy: a missing required column is a `SourceError` naming the file,
the column and the expected header; bytes that are not UTF-8 are replaced by U+FFFD and counted per file
(`Corpus.annotation_replaced`, recorded in dataset.json)."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.text import decode_text
from shards.format import sanitize_key
from shards.scenarios import key_uniform


class SourceError(ValueError):
    """The raw corpus is not where or not what the adapter expects; the message says how to fix it."""


SPLITS = ("train", "val", "test")
"""The split names a build writes; anything else read from annotations is rejected, never used as a path."""


@dataclass(frozen=True)
class Sample:
    """One sample to build. `kind` says how: "video" (a clip at `source`), "image_text" (an image at
    `source`, "" when there is none, and `text`, None when there is none) or "arrays" (row `row` of the
    image array at `source` and of the audio array at `audio_source`)."""

    key: str
    split: str
    label: int  # class index; -1 for multi-label samples (see `labels`)
    source: str  # path relative to --src
    kind: str = "video"
    labels: tuple[int, ...] = ()  # multi-label: the class indices
    text: str | None = None
    text_replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD in the text's source
    audio_source: str = ""
    row: int = -1


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
    multilabel: bool = False
    skipped_labels: dict[str, int] = field(default_factory=dict)  # rows of classes not kept, by label
    annotation_replaced: dict[str, int] = field(default_factory=dict)  # file -> invalid UTF-8 sequences


def _require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{what} not found: {path}. {fix}")
    return path


def _require_dir(src: Path, dataset: str) -> None:
    if not src.is_dir():
        raise SourceError(f"--src {src} is not a directory; pass the root of the raw {dataset} corpus")


def _outside_src(src: Path, root: Path, rel: str) -> str | None:
    """The reason a source path escapes --src (through `..`, an absolute path or a link), or None."""
    resolved = (src / rel).resolve()
    if resolved.is_relative_to(root):
        return None
    return f"source path points outside --src: {rel} -> {resolved}"


def _split_problem(split: str, key: str, rel: str, known: tuple[str, ...] = SPLITS) -> Reject | None:
    """A reject for a split name that is not one of the adapter's known names (it would become a path)."""
    if split in known:
        return None
    return Reject(key, "", rel, "annotation",
                  f"unknown split {split!r}; expected one of {', '.join(known)}")


def _source_problem(src: Path, root: Path, rel: str, key: str, split: str, samples: dict[str, Sample]) -> Reject | None:
    """Why an annotated source cannot become a sample (outside --src, missing, duplicate key), or None."""
    outside = _outside_src(src, root, rel)
    if outside:
        return Reject(key, split, rel, "annotation", outside)
    if not (src / rel).is_file():
        return Reject(key, split, rel, "source", "annotated file not found")
    if key in samples:
        return Reject(key, split, rel, "annotation", f"duplicate key (also {samples[key].source})")
    return None


def read_annotation(path: Path, src: Path, replaced: dict[str, int]) -> str:
    """An annotation file's text under the one policy of every adapter: invalid UTF-8 replaced by U+FFFD
    and counted in `replaced` (by path relative to --src)."""
    text, n = decode_text(path.read_bytes())
    if n:
        replaced[_rel_name(path, src)] = n
    return text


def _rel_name(path: Path, src: Path) -> str:
    return path.relative_to(src).as_posix() if path.is_relative_to(src) else str(path)


def read_csv_rows(path: Path, src: Path, required: tuple[str, ...], header: str,
                  replaced: dict[str, int]) -> list[dict[str, str]]:
    """Rows of a CSV with a header line; a missing required column is a `SourceError` naming the file,
    the column(s) and the expected header."""
    reader = csv.DictReader(io.StringIO(read_annotation(path, src, replaced), newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise SourceError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                          f"expected the header {header}")
    return list(reader)


def _collect(rows, src: Path, classes: list[str], make: Callable,
             skipped: dict[str, int] | None = None) -> tuple[list[Sample], list[Reject]]:
    """Turn annotation rows into samples, rejecting unknown splits, missing files and duplicate keys;
    rows of classes not kept are counted by label in `skipped`."""
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
        if label_name not in index:  # a class the dataset does not keep (Kinetics-400 outside Kinetics-Sound)
            if skipped is not None:
                skipped[label_name] = skipped.get(label_name, 0) + 1
            continue
        problem = _split_problem(split, key, rel) or _source_problem(src, root, rel, key, split, samples)
        if problem:
            rejects.append(problem)
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
    replaced: dict[str, int] = {}
    for path in csvs:
        rows.extend((path.stem, r) for r in read_csv_rows(
            path, src, ("label", "youtube_id", "time_start", "time_end"),
            "label,youtube_id,time_start,time_end,split", replaced))

    def make(item):
        csv_split, row = item
        split = (row.get("split") or csv_split).strip()
        try:
            stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except (TypeError, ValueError):
            return Reject(sanitize_key(str(row.get("youtube_id") or "row")), split, "", "annotation",
                          f"malformed row {dict(row)}")
        return sanitize_key(stem), split, (row.get("label") or "").strip(), f"{split}/{stem}.mp4"

    skipped: dict[str, int] = {}
    samples, rejects = _collect(rows, src, classes, make, skipped)
    return Corpus("kinetics_sound", ["visual", "audio"], classes, samples, rejects,
                  skipped_labels=skipped, annotation_replaced=replaced)


def ave(src: Path) -> Corpus:
    """AVE release: `AVE/<VideoID>.mp4`, `Annotations.txt` and `{train,val,test}Set.txt`
    (`Category&VideoID&Quality&StartTime&EndTime`); classes are the sorted categories of Annotations.txt."""
    _require_dir(src, "ave")
    fix = "the AVE release has Annotations.txt, trainSet.txt, valSet.txt, testSet.txt and the AVE/ video folder"
    replaced: dict[str, int] = {}
    annotations = _read_ave_list(_require_file(src / "Annotations.txt", "Annotations.txt", fix), src, replaced)
    classes = sorted({row[0] for row in annotations})
    rows = []
    for split in SPLITS:
        path = _require_file(src / f"{split}Set.txt", f"{split}Set.txt", fix)
        rows.extend((split, row) for row in _read_ave_list(path, src, replaced))

    def make(item):
        split, row = item
        category, video_id = row[0], row[1]
        return sanitize_key(video_id), split, category, f"AVE/{video_id}.mp4"

    samples, rejects = _collect(rows, src, classes, make)
    return Corpus("ave", ["visual", "audio"], classes, samples, rejects, annotation_replaced=replaced)


def _read_ave_list(path: Path, src: Path, replaced: dict[str, int]) -> list[list[str]]:
    rows = []
    for line in read_annotation(path, src, replaced).splitlines():
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
    replaced: dict[str, int] = {}
    classes_txt = _require_file(src / "classes.txt", "classes.txt", fix)
    classes = [c.strip() for c in read_annotation(classes_txt, src, replaced).splitlines() if c.strip()]
    csvs = sorted((src / "annotations").glob("*.csv"))
    if not csvs:
        raise SourceError(f"no annotation CSVs in {src / 'annotations'}; {fix}")
    rows = []
    for path in csvs:
        rows.extend(read_csv_rows(path, src, ("clip_id", "label", "split"), "clip_id,label,split,...", replaced))

    def make(row):
        clip_id, split = row["clip_id"] or "", (row["split"] or "").strip()
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < len(classes):  # -1 ("unlabelled") would index the class list from the end
            return Reject(sanitize_key(clip_id or "row"), "", "", "annotation",
                          f"label {row['label']!r} is not a class index 0..{len(classes) - 1} (row {dict(row)})")
        return sanitize_key(clip_id), split, classes[label], f"{split}/{clip_id}.mp4"

    samples, rejects = _collect(rows, src, classes, make)
    return Corpus("av_digits", ["visual", "audio"], classes, samples, rejects, annotation_replaced=replaced)


# ------------------------------------------------------------------------------------ vision-language
MMIMDB_GENRES = ("Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
                 "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
                 "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir")
"""The 23 genres of the MM-IMDB paper (Arevalo et al. 2017), most frequent first; other genres are ignored."""
MMIMDB_SPLITS = {"train": "train", "dev": "val", "test": "test"}


def mm_imdb(src: Path) -> Corpus:
    """MM-IMDB release (`mmimdb.tar.gz`): `split.json` ({"train": [ids], "dev": [ids], "test": [ids]};
    `dev` becomes the `val` split) and `dataset/<id>.json` + `dataset/<id>.jpeg` per movie. The json's
    `genres` (a list of names; only the paper's 23 genres count, multi-label) and `plot` (a list of plot
    summaries; joined with spaces) are used. --src is the `mmimdb` folder or the folder holding it.

    A movie without plot or without poster is kept without that modality; one with neither, with none of
    the 23 genres, or whose json is missing or malformed is rejected. Bytes that are not UTF-8 are replaced
    and counted (`text_replaced`)."""
    _require_dir(src, "mm_imdb")
    root = src / "mmimdb" if (src / "mmimdb" / "split.json").is_file() else src
    fix = "the MM-IMDB release has mmimdb/split.json and mmimdb/dataset/<id>.json + <id>.jpeg"
    split_path = _require_file(root / "split.json", "split.json", fix)
    replaced_files: dict[str, int] = {}
    try:
        splits = json.loads(read_annotation(split_path, src, replaced_files))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{split_path}: not valid JSON ({exc}); {fix}") from exc
    if not isinstance(splits, dict) or not set(splits) & set(MMIMDB_SPLITS):
        raise SourceError(f"{split_path}: expected an object with train/dev/test id lists; {fix}")
    prefix = "" if root == src else "mmimdb/"
    index = {g: i for i, g in enumerate(MMIMDB_GENRES)}
    resolved_src = src.resolve()
    samples: dict[str, Sample] = {}
    rejects: list[Reject] = []
    for raw_split, ids in splits.items():
        known = ", ".join(MMIMDB_SPLITS)
        if raw_split not in MMIMDB_SPLITS:
            rejects.append(Reject("", "", "split.json", "annotation",
                                  f"unknown split {raw_split!r} in split.json ({len(ids) if isinstance(ids, list) else 0} "
                                  f"ids left out); expected {known}"))
            continue
        if not isinstance(ids, list):
            raise SourceError(f"{split_path}: {raw_split!r} must be a list of movie ids; {fix}")
        split = MMIMDB_SPLITS[raw_split]
        for movie_id in ids:
            try:
                key = sanitize_key(str(movie_id))
            except ValueError as exc:
                rejects.append(Reject("", split, "", "annotation", f"unusable id {movie_id!r} in split.json: {exc}"))
                continue
            rel_json = f"{prefix}dataset/{movie_id}.json"
            outside = _outside_src(src, resolved_src, rel_json)
            if outside:
                rejects.append(Reject(key, split, rel_json, "annotation", outside))
                continue
            path = src / rel_json
            if not path.is_file():
                rejects.append(Reject(key, split, rel_json, "source", "movie json not found"))
                continue
            text, replaced = decode_text(path.read_bytes())
            try:
                meta = json.loads(text)
                genres = meta.get("genres") or []
                plot = meta.get("plot") or []
            except (json.JSONDecodeError, AttributeError) as exc:
                rejects.append(Reject(key, split, rel_json, "annotation", f"movie json is not a JSON object ({exc})"))
                continue
            labels = tuple(sorted({index[g] for g in genres if g in index}))
            if not labels:
                rejects.append(Reject(key, split, rel_json, "annotation", f"none of the 23 genres in {genres!r}"))
                continue
            plot_text = " ".join(str(p) for p in plot) if isinstance(plot, list) else str(plot)
            plot_text = plot_text.strip() or None
            rel_poster = f"{prefix}dataset/{movie_id}.jpeg"
            poster = rel_poster if (src / rel_poster).is_file() else ""
            if poster and _outside_src(src, resolved_src, rel_poster):
                rejects.append(Reject(key, split, rel_poster, "annotation", _outside_src(src, resolved_src, rel_poster)))
                continue
            if plot_text is None and not poster:
                rejects.append(Reject(key, split, rel_json, "annotation", "neither poster nor plot"))
                continue
            if key in samples:
                rejects.append(Reject(key, split, rel_json, "annotation", f"duplicate key (also {samples[key].split})"))
                continue
            samples[key] = Sample(key, split, -1, poster, kind="image_text", labels=labels, text=plot_text,
                                  text_replaced=replaced if plot_text else 0)
    ordered = sorted(samples.values(), key=lambda s: (s.split, s.key))
    return Corpus("mm_imdb", ["visual", "text"], list(MMIMDB_GENRES), ordered, rejects, multilabel=True,
                  annotation_replaced=replaced_files)


FOOD101_VAL_FRACTION = 0.1
"""UPMC Food-101 ships train and test only; a fixed 10% of train (by a hash of the key) is `val`, about
the 61,142 / 6,846 split of METHOD.md's reference."""


def food101(src: Path) -> Corpus:
    """UPMC Food-101: `images/{train,test}/<class>/<class>_<n>.jpg` and `texts/{train,test}_titles.csv`,
    header-less rows `image file name,title text,class name` (the title is the text of the web page the
    image came from). Classes are the sorted class folders of `images/train` (or the CSVs' class names).
    A blank or short CSV row, an unknown class or an image not on disk is rejected; an empty title is kept
    as a sample without text. Bytes that are not UTF-8 are replaced and counted (`text_replaced`)."""
    _require_dir(src, "food101")
    fix = "the UPMC Food-101 release has images/{train,test}/<class>/*.jpg and texts/{train,test}_titles.csv"
    rows: list[tuple[str, int, list[str], int]] = []
    for split in ("train", "test"):
        path = _require_file(src / "texts" / f"{split}_titles.csv", f"texts/{split}_titles.csv", fix)
        text, replaced = decode_text(path.read_bytes())
        for line, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            rows.append((split, line, row, sum(f.count("\ufffd") for f in row) if replaced else 0))
    class_dir = src / "images" / "train"
    classes = sorted(p.name for p in class_dir.iterdir() if p.is_dir()) if class_dir.is_dir() else []
    if not classes:
        classes = sorted({r[2].strip() for _, _, r, _ in rows if len(r) >= 3 and r[2].strip()})
    index = {c: i for i, c in enumerate(classes)}
    root = src.resolve()
    samples: dict[str, Sample] = {}
    rejects: list[Reject] = []
    for csv_split, line, row, replaced in rows:
        where = f"texts/{csv_split}_titles.csv line {line}"
        if not any(field.strip() for field in row):
            rejects.append(Reject("", csv_split, where, "annotation", "empty CSV row"))
            continue
        if len(row) < 3:
            rejects.append(Reject("", csv_split, where, "annotation", f"expected file,title,class; got {row!r}"))
            continue
        name, title, label = row[0].strip(), row[1], row[2].strip()
        try:
            key = sanitize_key(f"{csv_split}_{Path(name).stem}")
        except ValueError as exc:
            rejects.append(Reject("", csv_split, where, "annotation", f"unusable file name {name!r}: {exc}"))
            continue
        if label not in index:
            rejects.append(Reject(key, csv_split, where, "annotation", f"unknown class {label!r}"))
            continue
        rel = f"images/{csv_split}/{label}/{name}"
        problem = _source_problem(src, root, rel, key, csv_split, samples)
        if problem:
            rejects.append(problem)
            continue
        split = csv_split
        if split == "train" and key_uniform(key, 0, "food101:val") < FOOD101_VAL_FRACTION:
            split = "val"
        samples[key] = Sample(key, split, index[label], rel, kind="image_text", text=title.strip() or None,
                              text_replaced=replaced if title.strip() else 0)
    ordered = sorted(samples.values(), key=lambda s: (s.split, s.key))
    return Corpus("food101", ["visual", "text"], classes, ordered, rejects)


# ------------------------------------------------------------------------------------------ AV-MNIST
AVMNIST_VAL_FROM = 55 / 60
"""MultiBench keeps the last 5,000 of the 60,000 training rows for validation (55,000 / 5,000 / 10,000)."""


def av_mnist(src: Path) -> Corpus:
    """The public AV-MNIST arrays (the `avmnist` folder MultiBench's loader reads): `image/{train,test}_data.npy`
    (N x 784 or N x 28 x 28 MNIST digits, 0..255), `audio/{train,test}_data.npy` (N x 112 x 112 spectrograms
    of spoken digits) and `{train,test}_labels.npy` (N digits). --src is the `avmnist` folder or its parent.
    Keys are `<file split>_<row>`; the last twelfth of the train rows (5,000 of 60,000) is `val`."""
    _require_dir(src, "av_mnist")
    root = src / "avmnist" if (src / "avmnist" / "train_labels.npy").is_file() else src
    prefix = "" if root == src else "avmnist/"
    fix = "the AV-MNIST folder has image/{train,test}_data.npy, audio/{train,test}_data.npy, {train,test}_labels.npy"
    samples, rejects = [], []
    for file_split in ("train", "test"):
        rels = {m: f"{prefix}{m}/{file_split}_data.npy" for m in ("image", "audio")}
        labels_path = _require_file(root / f"{file_split}_labels.npy", f"{file_split}_labels.npy", fix)
        labels = np.load(labels_path, mmap_mode="r").reshape(-1)
        lengths = {"labels": len(labels)}
        for m, rel in rels.items():
            lengths[m] = np.load(_require_file(src / rel, rel, fix), mmap_mode="r").shape[0]
        if len(set(lengths.values())) != 1:
            raise SourceError(f"{root}: {file_split} arrays disagree on the number of rows ({lengths}); {fix}")
        val_from = int(len(labels) * AVMNIST_VAL_FROM) if file_split == "train" else len(labels)
        for row, label in enumerate(labels.tolist()):
            key = f"{file_split}_{row:05d}"
            split = "val" if row >= val_from else file_split
            if not (isinstance(label, (int, float)) and float(label).is_integer() and 0 <= label <= 9):
                rejects.append(Reject(key, split, rels["image"], "annotation", f"label {label!r} is not a digit 0..9"))
                continue
            samples.append(Sample(key, split, int(label), rels["image"], kind="arrays",
                                  audio_source=rels["audio"], row=row))
    samples.sort(key=lambda s: (s.split, s.key))
    return Corpus("av_mnist", ["visual", "audio"], [str(d) for d in range(10)], samples, rejects)


ADAPTERS: dict[str, Callable[..., Corpus]] = {
    "kinetics_sound": kinetics_sound,
    "ave": ave,
    "av_digits": av_digits,
    "mm_imdb": mm_imdb,
    "food101": food101,
    "av_mnist": av_mnist,
}
