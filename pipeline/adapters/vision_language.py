"""Vision-language datasets (mm_imdb, food101): an image (possibly none) and a text per sample. The text is
read and decoded while scanning, so the build can make the vocabulary from the train split first."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.adapters.corpus import (
    SPLITS,
    Corpus,
    Reject,
    Sample,
    SampleKind,
    SourceError,
    frame_size,
    outside_src,
    read_annotation,
    require_dir,
    require_file,
    sample_members,
    source_problem,
)
from pipeline.adapters.video import IMAGENET
from pipeline.encode import encode_image_file, encode_text
from pipeline.options import BuildContext, BuildOptions
from pipeline.text import decode_text, load_tokenizer
from shards.format import VisualInfo, frame_member, sanitize_key
from shards.masks import key_uniform


def encode_image_text(sample: Sample, src: Path, opts: BuildOptions, ctx: BuildContext,
                      out: Path | None = None) -> tuple[dict[str, bytes], dict, list[Reject]]:
    """The image as one JPEG frame (`f0.jpg`), the text as token ids + the zstd raw text."""
    frames = {frame_member(0): encode_image_file(src / sample.source, opts.size, opts.jpeg_quality)} if sample.source else {}
    meta = {"key": sample.key, "split": sample.split, "label": sample.label, "labels": list(sample.labels),
            "source": sample.source, "duration": 0.0, "has_visual": bool(sample.source),
            "has_audio": False, "has_text": sample.text is not None, "frame_size": frame_size(frames)}
    members = sample_members(meta, sample, ctx, frames)
    if sample.text is not None:
        tokenizer = load_tokenizer(str(out), ctx.tokenizer, opts.max_len)
        members["text.npy"], members["text.txt.zst"] = encode_text(sample.text, tokenizer)
    partial = []
    if sample.text_replaced:
        partial.append(Reject(sample.key, sample.split, sample.source, "text",
                              f"{sample.text_replaced} invalid UTF-8 sequence(s) replaced by U+FFFD", kept=True))
    return members, dict(meta, audio_seconds=0.0, text_replaced=sample.text_replaced), partial


def image_visual_info(opts: BuildOptions) -> VisualInfo:
    """One image per sample (T = 1), short side `size`, ImageNet normalisation."""
    return VisualInfo(frames=1, short_side=opts.size, jpeg_quality=opts.jpeg_quality, crop=min(224, opts.size),
                      source="image", **IMAGENET)


def no_audio_info(opts: BuildOptions, rows: list[dict]) -> None:
    return None


IMAGE_TEXT = SampleKind("image_text", encode_image_text, image_visual_info, no_audio_info)


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

    The reorganised layout of missing_aware_prompts (`DATA.md`, `vilt/utils/write_mmimdb.py`:
    `images/<id>.jpeg`, `labels/<id>.json`, `split.json` with the same train/dev/test lists, 15,552 /
    2,608 / 7,799) is read as well, detected by its `labels/` folder; its genre list is the same 23 in the
    same order.

    A movie without plot or without poster is kept without that modality; one with neither, with none of
    the 23 genres, or whose json is missing or malformed is rejected. Bytes that are not UTF-8 are replaced
    and counted (`text_replaced`)."""
    require_dir(src, "mm_imdb")
    root = src / "mmimdb" if (src / "mmimdb" / "split.json").is_file() else src
    fix = ("the MM-IMDB release has mmimdb/split.json and mmimdb/dataset/<id>.json + <id>.jpeg (or the "
           "reorganised split.json, labels/<id>.json, images/<id>.jpeg)")
    json_dir, poster_dir = ("labels", "images") if (root / "labels").is_dir() else ("dataset", "dataset")
    split_path = require_file(root / "split.json", "split.json", fix)
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
            rel_json = f"{prefix}{json_dir}/{movie_id}.json"
            outside = outside_src(src, resolved_src, rel_json)
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
            rel_poster = f"{prefix}{poster_dir}/{movie_id}.jpeg"
            poster = rel_poster if (src / rel_poster).is_file() else ""
            if poster and outside_src(src, resolved_src, rel_poster):
                rejects.append(Reject(key, split, rel_poster, "annotation", outside_src(src, resolved_src, rel_poster)))
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
    return Corpus("mm_imdb", ["visual", "text"], list(MMIMDB_GENRES), ordered, rejects, IMAGE_TEXT, multilabel=True,
                  annotation_replaced=replaced_files)


FOOD101_VAL_FRACTION = 0.1
"""UPMC Food-101 ships train and test only; a fixed 10% of train (by a hash of the key) is `val`, about
the 61,142 / 6,846 split of METHOD.md's reference."""


def food101(src: Path, split_json: Path | None = None, class_index: Path | None = None) -> Corpus:
    """UPMC Food-101: `images/{train,test}/<class>/<class>_<n>.jpg` and `texts/{train,test}_titles.csv`,
    header-less rows `image file name,title text,class name` (the title is the text of the web page the
    image came from). Classes are the sorted class folders of `images/train` (or the CSVs' class names).
    A blank or short CSV row, an unknown class or an image not on disk is rejected; an empty title is kept
    as a sample without text. Bytes that are not UTF-8 are replaced and counted (`text_replaced`).

    The vision-language papers use the split and class order of missing_aware_prompts (`DATA.md`,
    `vilt/utils/write_food101.py`): `split.json` ({"train"|"val"|"test": [image file names]}, 61,142 /
    6,846 / 22,716; val images lie in `images/train/`) and `class_idx.json` ({class: index}, not
    alphabetical). They are honoured when given (`split_json`, `class_index`) or found at the root of
    --src; an image they list without a title row is rejected, as that script ignores it. Without
    `split.json`, `val` is a fixed 10% of train by a hash of the key."""
    require_dir(src, "food101")
    fix = "the UPMC Food-101 release has images/{train,test}/<class>/*.jpg and texts/{train,test}_titles.csv"
    split_json = split_json or (src / "split.json" if (src / "split.json").is_file() else None)
    class_index = class_index or (src / "class_idx.json" if (src / "class_idx.json").is_file() else None)
    replaced_files: dict[str, int] = {}
    listed = _food101_split_json(split_json, src, replaced_files) if split_json else None
    rows: list[tuple[str, int, list[str], int]] = []
    for split in ("train", "test"):
        path = require_file(src / "texts" / f"{split}_titles.csv", f"texts/{split}_titles.csv", fix)
        text, replaced = decode_text(path.read_bytes())
        for line, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            rows.append((split, line, row, sum(f.count("\ufffd") for f in row) if replaced else 0))
    if class_index:
        classes = _food101_class_index(class_index, src, replaced_files)
    else:
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
        if listed is not None:  # train and val images lie in images/train/, test images in images/test/
            split = listed.get(name)
            if split is None or (split == "test") != (csv_split == "test"):
                rejects.append(Reject(key, "", rel, "annotation", f"not listed in {split_json.name}"))
                continue
            del listed[name]
        else:
            split = csv_split
            if split == "train" and key_uniform(key, 0, "food101:val") < FOOD101_VAL_FRACTION:
                split = "val"
        problem = source_problem(src, root, rel, key, split, samples)
        if problem:
            rejects.append(problem)
            continue
        samples[key] = Sample(key, split, index[label], rel, kind="image_text", text=title.strip() or None,
                              text_replaced=replaced if title.strip() else 0)
    for name, split in sorted((listed or {}).items()):
        rejects.append(Reject("", split, name, "annotation",
                              f"listed in {split_json.name} but no row of texts/*_titles.csv has it"))
    ordered = sorted(samples.values(), key=lambda s: (s.split, s.key))
    return Corpus("food101", ["visual", "text"], classes, ordered, rejects, IMAGE_TEXT,
                  annotation_replaced=replaced_files)


def _food101_split_json(path: Path, src: Path, replaced: dict[str, int]) -> dict[str, str]:
    """missing_aware_prompts' split.json as {image file name: split}; an unknown split or a name in two
    splits is a `SourceError`."""
    fix = 'expected {"train": [image file names], "val": [...], "test": [...]} (missing_aware_prompts)'
    try:
        doc = json.loads(read_annotation(require_file(path, "split.json", fix), src, replaced))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc}); {fix}") from exc
    if not isinstance(doc, dict) or set(doc) - set(SPLITS) or not all(isinstance(v, list) for v in doc.values()):
        raise SourceError(f"{path}: {fix}")
    listed: dict[str, str] = {}
    for split, names in doc.items():
        for name in names:
            if str(name) in listed:
                raise SourceError(f"{path}: {name!r} is listed in both {listed[str(name)]} and {split}")
            listed[str(name)] = split
    return listed


def _food101_class_index(path: Path, src: Path, replaced: dict[str, int]) -> list[str]:
    """missing_aware_prompts' class_idx.json ({class: index}) as the class list in index order."""
    fix = 'expected {"class name": index, ...} with indices 0..N-1 (missing_aware_prompts class_idx.json)'
    try:
        doc = json.loads(read_annotation(require_file(path, "class_idx.json", fix), src, replaced))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc}); {fix}") from exc
    if not isinstance(doc, dict) or sorted(doc.values()) != list(range(len(doc))):
        raise SourceError(f"{path}: {fix}")
    return [name for name, _ in sorted(doc.items(), key=lambda item: item[1])]
