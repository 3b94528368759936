"""Any corpus, without code: one manifest row per sample (CSV with a header, JSON Lines or Parquet).

Columns (any order; others are ignored):

| column | meaning |
|---|---|
| `id` | required; the sample key after sanitising (letters, digits, `_`, `-`) |
| `split` | required; `train`, `val` or `test`. Without any `val` row, a fixed 10% of train (by a hash of the key) is `val` |
| `label` / `labels` | a class name, or `\\|`-separated class names (multi-label, as MM-IMDB); one of the two columns |
| `video` | a clip: the visual frames, and its audio track when there is no `audio` column or the row's is empty |
| `audio` | an audio file (wav, flac, mp3, m4a/aac, ogg) or a video whose track is used |
| `image` | one image as the visual frame (instead of `video`) |
| `text` / `text_file` | the text inline, or a UTF-8 text file |

Paths are relative to --src and must resolve inside it; an empty cell is a missing modality. Classes come
from `classes.txt` beside the manifest when present (its order is the label order), else the sorted distinct
labels of the train rows. The dataset's modalities are those the columns provide: `visual` (video or image),
`audio` (audio, or the track of video), `text` (text or text_file), in that order.

A bad row is a reject with its reason; a malformed manifest (no `id` or `split` column, no label column, no
modality column, both `video` and `image`) is a `SourceError`: one line, exit 2."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.adapters.corpus import (
    Corpus,
    Reject,
    Sample,
    SampleKind,
    SourceError,
    outside_src,
    read_annotation,
    read_csv_rows,
    require_dir,
    split_problem,
)
from pipeline.adapters.video import clip_visual_info, encode_media_sample, waveform_audio_info
from pipeline.adapters.vision_language import image_visual_info, no_audio_info
from pipeline.options import BuildOptions
from pipeline.text import decode_text
from shards.format import sanitize_key
from shards.masks import key_uniform

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "manifest.parquet")
MEDIA_COLUMNS = ("video", "audio", "image", "text_file")
VAL_FRACTION = 0.1


def read_manifest(path: Path, src: Path, replaced: dict[str, int]) -> list[dict[str, str]]:
    """The rows of a manifest as strings ("" for empty cells); a file that cannot be read is a SourceError."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = read_csv_rows(path, src, ("id",), "id,split,label,video,audio,image,text,...", replaced)
    elif suffix == ".jsonl":
        rows = []
        for n, line in enumerate(read_annotation(path, src, replaced).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path} line {n}: not a JSON object ({exc}); one object per line") from exc
            if not isinstance(row, dict):
                raise SourceError(f"{path} line {n}: not a JSON object; one object per line")
            rows.append(row)
    elif suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise SourceError(f"{path}: not a readable Parquet file ({exc})") from exc
    else:
        raise SourceError(f"{path}: a manifest is .csv, .jsonl or .parquet")
    return [{k: _cell(v) for k, v in row.items() if k is not None} for row in rows]


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def find_manifest(src: Path, manifest_file: Path | None) -> Path:
    if manifest_file is not None:
        if not manifest_file.is_file():
            raise SourceError(f"--manifest {manifest_file} not found; pass a .csv, .jsonl or .parquet file")
        return manifest_file
    for name in MANIFEST_NAMES:
        if (src / name).is_file():
            return src / name
    raise SourceError(f"no manifest in {src} ({', '.join(MANIFEST_NAMES)}); write one row per sample "
                      f"(id,split,label and any of video,audio,image,text,text_file) or pass --manifest FILE")


def manifest(src: Path, manifest_file: Path | None = None) -> Corpus:
    """Samples of any corpus described by a manifest (see the module docstring)."""
    require_dir(src, "manifest")
    path = find_manifest(src, manifest_file)
    replaced: dict[str, int] = {}
    rows = read_manifest(path, src, replaced)
    columns = set().union(*(row.keys() for row in rows)) if rows else set()
    _check_columns(path, columns)
    multilabel = "labels" in columns
    classes = _classes(path, src, rows, multilabel, replaced)
    modalities = [m for m, cols in (("visual", ("video", "image")), ("audio", ("audio", "video")),
                                    ("text", ("text", "text_file"))) if columns & set(cols)]
    index = {c: i for i, c in enumerate(classes)}
    root = src.resolve()
    samples: dict[str, Sample] = {}
    rejects: list[Reject] = []
    for n, row in enumerate(rows, start=1):
        made = _sample(row, n, path.name, src, root, index, multilabel)
        if isinstance(made, Reject):
            rejects.append(made)
        elif made.key in samples:
            rejects.append(Reject(made.key, made.split, made.source, "annotation",
                                  f"duplicate key (also {samples[made.key].source or 'row ' + made.key})"))
        else:
            samples[made.key] = made
    if samples and not any(s.split == "val" for s in samples.values()):
        for key, s in samples.items():
            if s.split == "train" and key_uniform(key, 0, "manifest:val") < VAL_FRACTION:
                samples[key] = replace(s, split="val")
    visual_info = (clip_visual_info if "video" in columns else image_visual_info if "image" in columns
                   else no_visual_info)
    audio_info = waveform_audio_info if "audio" in modalities else no_audio_info
    kind = SampleKind("manifest", encode_media_sample, visual_info, audio_info)
    ordered = sorted(samples.values(), key=lambda s: (s.split, s.key))
    return Corpus("manifest", modalities, classes, ordered, rejects, kind, multilabel=multilabel,
                  annotation_replaced=replaced)


def _check_columns(path: Path, columns: set[str]) -> None:
    fix = "columns: id, split, label (or labels), and any of video, audio, image, text, text_file"
    for required in ("id", "split"):
        if required not in columns:
            raise SourceError(f"{path}: no {required!r} column; {fix}")
    if not columns & {"label", "labels"}:
        raise SourceError(f"{path}: no 'label' or 'labels' column; {fix}")
    if {"label", "labels"} <= columns:
        raise SourceError(f"{path}: both 'label' and 'labels' columns; use label (one class) or labels (a|b|c)")
    if not columns & {"video", "audio", "image", "text", "text_file"}:
        raise SourceError(f"{path}: no modality column; {fix}")
    if {"video", "image"} <= columns:
        raise SourceError(f"{path}: both 'video' and 'image' columns; a dataset's visual is clips or images")
    if {"text", "text_file"} <= columns:
        raise SourceError(f"{path}: both 'text' and 'text_file' columns; use one")


def _classes(path: Path, src: Path, rows: list[dict[str, str]], multilabel: bool, replaced: dict[str, int]) -> list[str]:
    """classes.txt beside the manifest, else the sorted distinct labels of the train rows."""
    listed = path.parent / "classes.txt"
    if listed.is_file():
        classes = [c.strip() for c in read_annotation(listed, src, replaced).splitlines() if c.strip()]
        if len(set(classes)) != len(classes):
            raise SourceError(f"{listed}: a class is listed twice")
        return classes
    names = set()
    for row in rows:
        if row.get("split") == "train":
            names.update(_label_names(row, multilabel))
    if not names:
        raise SourceError(f"{path}: no labelled train row to take the classes from; add train rows or a "
                          f"classes.txt beside the manifest")
    return sorted(names)


def _label_names(row: dict[str, str], multilabel: bool) -> list[str]:
    if multilabel:
        return [n.strip() for n in row.get("labels", "").split("|") if n.strip()]
    return [row["label"]] if row.get("label") else []


def _sample(row: dict[str, str], n: int, name: str, src: Path, root: Path, index: dict[str, int],
            multilabel: bool) -> Sample | Reject:
    """One manifest row as a sample, or the reason it cannot be one."""
    where = f"{name} row {n}"
    if not row.get("id"):
        return Reject("", "", where, "annotation", "empty id")
    try:
        key = sanitize_key(row["id"])
    except ValueError as exc:
        return Reject("", "", where, "annotation", f"unusable id {row['id']!r}: {exc}")
    split = row.get("split", "")
    problem = split_problem(split, key, where)
    if problem:
        return problem
    names = _label_names(row, multilabel)
    unknown = [n for n in names if n not in index]
    if not names or unknown:
        what = f"label(s) {', '.join(map(repr, unknown))} not in the class list" if unknown else "no label"
        return Reject(key, split, where, "annotation", what)
    for column in MEDIA_COLUMNS:
        rel = row.get(column, "")
        if rel:
            outside = outside_src(src, root, rel)
            if outside:
                return Reject(key, split, rel, "annotation", outside)
            if not (src / rel).is_file():
                return Reject(key, split, rel, "source", f"{column} file not found")
    text, text_replaced = row.get("text") or None, 0
    if row.get("text_file"):
        text, text_replaced = decode_text((src / row["text_file"]).read_bytes())
        text = text.strip() or None
    visual = row.get("video") or row.get("image") or ""
    if not (visual or row.get("audio") or text):
        return Reject(key, split, where, "annotation", "no modality: every media and text cell is empty")
    labels = tuple(sorted(index[n] for n in set(names)))
    return Sample(key, split, -1 if multilabel else labels[0], visual,
                  kind="video" if row.get("video") else "image" if row.get("image") else "none",
                  labels=labels, text=text, text_replaced=text_replaced, audio_source=row.get("audio", ""))


def no_visual_info(opts: BuildOptions) -> None:
    return None
