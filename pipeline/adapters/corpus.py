"""What every adapter shares: samples, rejects and the corpus they make up; the rules for reading annotation
files; and the members every sample has (label, json).

Nothing read from the data chooses a path: a split must be one of `SPLITS` (an adapter's own names are
mapped onto them, e.g. MM-IMDB's `dev`), and every source path must resolve, links followed, inside --src.
Annotation files are read with one policy: a missing required column is a `SourceError` naming the file,
the column and the expected header; bytes that are not UTF-8 are replaced by U+FFFD and counted per file
(`Corpus.annotation_replaced`, recorded in dataset.json). Keys come from the source ids, never from
enumeration order, so a rebuild is deterministic."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.decode import DecodeError
from pipeline.encode import encode_audio
from pipeline.options import BuildContext, BuildOptions, SourceError
from pipeline.text import decode_text
from shards.format import AudioInfo, VisualInfo, encode_npy, jpeg_size

__all__ = ["SPLITS", "Corpus", "Reject", "Sample", "SampleKind", "SourceError"]


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
class SampleKind:
    """How the samples of one adapter family become shard members, and what dataset.json records about
    their modalities. `encode(sample, src, opts, ctx, out) -> (members, manifest row, kept-sample rejects)`
    must be a module-level function (it travels to worker processes); `visual_info(opts)` and
    `audio_info(opts, rows)` give the `visual` and `audio` sections of dataset.json."""

    name: str
    encode: Callable[..., tuple[dict[str, bytes], dict, list[Reject]]]
    visual_info: Callable[[BuildOptions], VisualInfo | None]
    audio_info: Callable[[BuildOptions, list[dict]], AudioInfo | None]


@dataclass(frozen=True)
class Corpus:
    """What an adapter found: samples, rejects, class names, the modalities it provides and their kind."""

    name: str
    modalities: list[str]
    classes: list[str]
    samples: list[Sample]
    rejects: list[Reject]
    kind: SampleKind
    multilabel: bool = False
    skipped_labels: dict[str, int] = field(default_factory=dict)  # rows of classes not kept, by label
    annotation_replaced: dict[str, int] = field(default_factory=dict)  # file -> invalid UTF-8 sequences


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{what} not found: {path}. {fix}")
    return path


def require_dir(src: Path, dataset: str) -> None:
    if not src.is_dir():
        raise SourceError(f"--src {src} is not a directory; pass the root of the raw {dataset} corpus")


def outside_src(src: Path, root: Path, rel: str) -> str | None:
    """The reason a source path escapes --src (through `..`, an absolute path or a link), or None."""
    resolved = (src / rel).resolve()
    if resolved.is_relative_to(root):
        return None
    return f"source path points outside --src: {rel} -> {resolved}"


def split_problem(split: str, key: str, rel: str, known: tuple[str, ...] = SPLITS) -> Reject | None:
    """A reject for a split name that is not one of the adapter's known names (it would become a path)."""
    if split in known:
        return None
    return Reject(key, "", rel, "annotation",
                  f"unknown split {split!r}; expected one of {', '.join(known)}")


def source_problem(src: Path, root: Path, rel: str, key: str, split: str, samples: dict[str, Sample]) -> Reject | None:
    """Why an annotated source cannot become a sample (outside --src, missing, duplicate key), or None."""
    outside = outside_src(src, root, rel)
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


def collect(rows, src: Path, classes: list[str], make: Callable,
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
        problem = split_problem(split, key, rel) or source_problem(src, root, rel, key, split, samples)
        if problem:
            rejects.append(problem)
            continue
        samples[key] = Sample(key, split, index[label_name], rel)
    return sorted(samples.values(), key=lambda s: (s.split, s.key)), rejects


def label_members(sample: Sample, ctx: BuildContext) -> dict[str, bytes]:
    """`.cls` (index, or comma-separated indices) and `.label.npy` (int64 [1], or float32 multi-hot [C])."""
    if ctx.multilabel:
        hot = np.zeros(ctx.num_classes, dtype=np.float32)
        hot[list(sample.labels)] = 1.0
        return {"cls": ",".join(map(str, sample.labels)).encode(), "label.npy": encode_npy(hot)}
    return {"cls": str(sample.label).encode(), "label.npy": encode_npy(np.array([sample.label], dtype=np.int64))}


def frame_size(frames: dict[str, bytes]) -> list[int]:
    """[height, width] of a sample's stored frames (all share it), [0, 0] without frames; the loaders and
    `verify` check every decoded frame against it."""
    sizes = {jpeg_size(data) for data in frames.values()}
    if len(sizes) > 1:
        raise DecodeError("encode", f"frames of one sample have different sizes {sorted(sizes)}")
    return list(sizes.pop()) if sizes else [0, 0]


def sample_members(meta: dict, sample: Sample, ctx: BuildContext, frames: dict[str, bytes]) -> dict[str, bytes]:
    """The members every sample starts with, in format order: json, cls, label.npy, then its frames."""
    return {"json": json.dumps(meta, sort_keys=True).encode(), **label_members(sample, ctx), **frames}


DB_CUTOFF = 80.0  # the log-mel's floor in dB below the peak power, recorded for the loaders


def audio_members(audio: np.ndarray, opts: BuildOptions) -> dict[str, bytes]:
    """The audio member of a sample: the waveform (`wav`/`flac`), or with `--audio-features logmel` the
    log-mel the loaders would compute from it (`shards.features.log_mel` of the first `audio_seconds`, zero
    padded), stored as float16 `logmel.npy` [n_mels, n_frames], so no loader computes a spectrogram."""
    if opts.audio_features != "logmel":
        return {opts.audio_codec: encode_audio(audio, opts.sample_rate, opts.audio_codec)}
    from shards.features import AudioParams, log_mel

    params = AudioParams(opts.sample_rate, opts.audio_seconds, opts.n_mels, opts.n_fft, opts.win_length,
                         opts.hop_length, DB_CUTOFF)
    mel = log_mel(audio.astype(np.float32) / 32768.0, params)[0].numpy().astype(np.float16)
    return {"logmel.npy": encode_npy(mel)}
