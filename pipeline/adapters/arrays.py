"""Array datasets (av_mnist): row `row` of the public image and audio arrays is one sample."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from pipeline.adapters.corpus import (
    Corpus,
    Reject,
    Sample,
    SampleKind,
    SourceError,
    frame_size,
    require_dir,
    require_file,
    sample_members,
)
from pipeline.decode import DecodeError
from pipeline.encode import encode_frame, load_array_row
from pipeline.options import BuildContext, BuildOptions
from shards.format import AudioInfo, VisualInfo, encode_npy, frame_member


def encode_arrays(sample: Sample, src: Path, opts: BuildOptions, ctx: BuildContext,
                  out: Path | None = None) -> tuple[dict[str, bytes], dict, list[Reject]]:
    """The digit image as an RGB JPEG frame, the spectrogram as float32 `spec.npy`."""
    image = load_array_row(src / sample.source, sample.row)
    if image.size == 784:
        image = image.reshape(28, 28)
    if image.ndim != 2:
        raise DecodeError("image", f"row {sample.row} of {sample.source} has shape {image.shape}, not 28x28 or 784")
    if image.dtype.kind == "f" and float(image.max(initial=0.0)) <= 1.0:
        image = image * 255.0
    gray = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    spec = np.asarray(load_array_row(src / sample.audio_source, sample.row), dtype=np.float32)
    if not np.isfinite(spec).all():
        raise DecodeError("audio", f"row {sample.row} of {sample.audio_source} holds NaN or infinite values")
    frames = {frame_member(0): encode_frame(np.repeat(gray[:, :, None], 3, axis=2), opts.size, opts.jpeg_quality)}
    meta = {"key": sample.key, "split": sample.split, "label": sample.label, "labels": [sample.label],
            "source": f"{sample.source}#{sample.row}", "duration": 0.0, "has_visual": True, "has_audio": True,
            "has_text": False, "frame_size": frame_size(frames)}
    members = sample_members(meta, sample, ctx, frames)
    members["spec.npy"] = encode_npy(spec)
    return members, dict(meta, audio_seconds=0.0, text_replaced=0), []


def digit_visual_info(opts: BuildOptions) -> VisualInfo:
    """The 28x28 digit as one frame, normalised as MultiBench's `datasets/avmnist/get_data.py` does: the
    grey values /255, no mean or std."""
    side = min(28, opts.size)
    return VisualInfo(frames=1, short_side=side, jpeg_quality=opts.jpeg_quality, crop=side, source="array",
                      mean=[0.0] * 3, std=[1.0] * 3)


def spectrogram_audio_info(opts: BuildOptions, rows: list[dict], shape: list[int]) -> AudioInfo:
    """A stored float32 spectrogram of `shape` [H, W] (from the arrays), scaled by 1/255 by the loaders."""
    return AudioInfo(kind="spectrogram_array", member="spec.npy", dtype="float32", shape=list(shape), scale=1.0 / 255.0)


AVMNIST_VAL_FROM = 55 / 60
"""MultiBench keeps the last 5,000 of the 60,000 training rows for validation (55,000 / 5,000 / 10,000)."""


def av_mnist(src: Path) -> Corpus:
    """The public AV-MNIST arrays (the `avmnist` folder MultiBench's loader reads): `image/{train,test}_data.npy`
    (N x 784 or N x 28 x 28 MNIST digits, 0..255), `audio/{train,test}_data.npy` (N x 112 x 112 spectrograms
    of spoken digits) and `{train,test}_labels.npy` (N digits). --src is the `avmnist` folder or its parent.
    Keys are `<file split>_<row>`; the last twelfth of the train rows (5,000 of 60,000) is `val`."""
    require_dir(src, "av_mnist")
    root = src / "avmnist" if (src / "avmnist" / "train_labels.npy").is_file() else src
    prefix = "" if root == src else "avmnist/"
    fix = "the AV-MNIST folder has image/{train,test}_data.npy, audio/{train,test}_data.npy, {train,test}_labels.npy"
    samples, rejects = [], []
    spec_shape: list[int] = []
    for file_split in ("train", "test"):
        rels = {m: f"{prefix}{m}/{file_split}_data.npy" for m in ("image", "audio")}
        labels_path = require_file(root / f"{file_split}_labels.npy", f"{file_split}_labels.npy", fix)
        labels = np.load(labels_path, mmap_mode="r").reshape(-1)
        lengths = {"labels": len(labels)}
        for m, rel in rels.items():
            shape = np.load(require_file(src / rel, rel, fix), mmap_mode="r").shape
            lengths[m] = shape[0]
            if m == "audio":
                if len(shape) != 3 or (spec_shape and list(shape[1:]) != spec_shape):
                    raise SourceError(f"{src / rel}: spectrograms must be N x H x W, the same H x W in train and "
                                      f"test; got {shape}; {fix}")
                spec_shape = list(shape[1:])
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
    kind = SampleKind("arrays", encode_arrays, digit_visual_info, partial(spectrogram_audio_info, shape=spec_shape))
    return Corpus("av_mnist", ["visual", "audio"], [str(d) for d in range(10)], samples, rejects, kind)
