"""Shard format version 1: member names, label/text encodings, key sanitising and `dataset.json`.

A sample is a group of tar members sharing a key (WebDataset convention: the key is the member name
up to the first dot). Members, in this order inside the tar:

    <key>.json          metadata (key, split, source, duration, has_<modality> flags)
    <key>.cls           label index as ASCII (multi-label: comma-separated indices)
    <key>.label.npy     int64 [1] (single-label) or float32 [C] multi-hot; header padded to 128 bytes
    <key>.f0.jpg ...    video frames as JPEG, one member per frame
    <key>.wav|.flac     16 kHz mono PCM16 audio
    <key>.spec.npy      a precomputed float32 spectrogram (array datasets such as AV-MNIST)
    <key>.text.npy      int32 [L] token ids; <key>.text.txt.zst the raw text (zstandard)

A missing modality is a missing member. Every `.npy` member has a 128-byte header so a reader can view
its payload as typed data without parsing it (DALI reads the whole member as INT64/FLOAT/INT32 and
drops the header's elements).
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
NPY_HEADER_BYTES = 128
MODALITIES = ("visual", "audio", "text")  # every modality name, in the order batches and dataset.json use
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class FormatError(ValueError):
    """A dataset directory that does not follow shard format version 1."""


def sanitize_key(source_id: str) -> str:
    """Turn a source id into a sample key that cannot escape the shard or split into extensions.

    Keys may only hold letters, digits, `_` and `-`: no `/`, `..` or `.` (a dot would be read as the
    start of an extension by WebDataset and DALI)."""
    key = _KEY_UNSAFE.sub("_", source_id).strip("_")
    if not key:
        raise ValueError(f"source id {source_id!r} gives an empty sample key")
    return key


def frame_member(index: int) -> str:
    """Member extension of the index-th video frame."""
    return f"f{index}.jpg"


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) that a JPEG's frame header (SOFn marker) declares, read without decoding.

    The build records it per sample (`frame_size` in the sample's json, `frame_height`/`frame_width` in
    the manifest) so `verify` and the loaders can check every decoded frame against it."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                break
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            break
        i += 2 + length
    raise ValueError("JPEG has no frame header (SOFn)")


def encode_npy(array: np.ndarray) -> bytes:
    """Serialise an array as .npy with a header of exactly NPY_HEADER_BYTES bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getvalue()
    header = data[:NPY_HEADER_BYTES]
    if not header.rstrip(b" \n").endswith(b"}") and b"}" not in header:
        raise ValueError("array shape too long for a 128-byte .npy header")
    return data


def npy_payload(data: bytes, dtype: np.dtype) -> np.ndarray:
    """The payload of a .npy member written by `encode_npy`, without parsing the header."""
    return np.frombuffer(data, dtype=dtype, offset=NPY_HEADER_BYTES)


@dataclass
class ShardInfo:
    """One tar shard as recorded in dataset.json."""

    path: str  # relative to the dataset directory, e.g. "train/000000.tar"
    split: str
    samples: int
    sha256: str
    bytes: int


@dataclass
class DatasetInfo:
    """What `dataset.json` holds; the loaders read everything they need from here."""

    dataset: str
    modalities: list[str]
    classes: list[str]
    multilabel: bool
    visual: dict[str, Any] = field(default_factory=dict)
    audio: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        doc = {
            "format_version": self.format_version,
            "dataset": self.dataset,
            "modalities": self.modalities,
            "classes": self.classes,
            "multilabel": self.multilabel,
            "visual": self.visual,
            "audio": self.audio,
            "text": self.text,
            "splits": self.splits,
            "shards": [vars(s) for s in self.shards],
            "build": self.build,
        }
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def read_dataset_info(dataset_dir: str | Path) -> DatasetInfo:
    """Read and check `dataset.json`; errors name the file and what to do."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise FormatError(
            f"{path} not found: point at a directory written by `pipeline build-shards` "
            f"(OUT/<dataset>), or build it first")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); rebuild with `pipeline build-shards`") from exc
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path} has format_version {version!r}; this code reads version {FORMAT_VERSION}. "
            f"Rebuild the shards with this version of `pipeline build-shards`")
    shards = [ShardInfo(**s) for s in doc.pop("shards", [])]
    doc.pop("format_version")
    return DatasetInfo(shards=shards, **doc)


def read_index(idx_path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Parse a DALI webdataset index (v1.2): per sample, (key, extension -> (data offset, size))."""
    lines = Path(idx_path).read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise FormatError(f"{idx_path}: not a v1.2 DALI webdataset index; rebuild the shard")
    samples = []
    for line in lines[1:]:
        fields = line.split(" ")
        members = {}
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i:i + 4]
            members[ext] = (int(offset), int(size))
        samples.append((name[: -len(ext) - 1], members))
    if len(samples) != int(lines[0].split()[1]):
        raise FormatError(f"{idx_path}: header says {lines[0].split()[1]} samples, found {len(samples)}")
    return samples
