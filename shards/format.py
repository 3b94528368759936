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
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
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


class Section(Mapping[str, Any]):
    """A modality's section of dataset.json, typed once: the build writes it, the loaders and the trainer
    read its fields as attributes. As a Mapping it is the JSON object itself (fields that are None left
    out), which is what dataset.json, `pipeline inspect` and an exported model.json hold."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.items()}

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str):
        """Read a section back; a key this version does not know, or a missing one, is a FormatError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in doc]
        if unknown or missing:
            what = "; ".join(part for part in (f"unknown keys {unknown}" if unknown else "",
                                               f"missing keys {missing}" if missing else "") if part)
            raise FormatError(f"{where}: {what}; rebuild the shards with this version of `pipeline build-shards`")
        return cls(**doc)


@dataclass(frozen=True, eq=True)
class VisualInfo(Section):
    """`visual`: T frames (or one image) as JPEG, short side `short_side`, the crop the loaders default to,
    and the normalisation (ImageNet's, or MultiBench's /255 for AV-MNIST: mean 0, std 1)."""

    frames: int
    short_side: int
    crop: int
    mean: list[float]
    std: list[float]
    format: str = "jpeg"
    jpeg_quality: int | None = None
    fps: float | None = None  # video: frames sampled at this rate
    source: str | None = None  # "image" or "array" (None: video frames)


@dataclass(frozen=True, eq=True)
class AudioInfo(Section):
    """`audio`: `kind` "waveform" (a WAV/FLAC member the loaders turn into a log-mel), "logmel_array" (the
    log-mel stored as float16, `--audio-features logmel`) or "spectrogram_array" (a stored float32
    spectrogram, AV-MNIST); the log-mel parameters for the first two, the stored array's member, dtype,
    shape and scale for the last two."""

    kind: str
    sample_rate: int | None = None
    channels: int | None = None
    n_mels: int | None = None
    n_fft: int | None = None
    win_length: int | None = None
    hop_length: int | None = None
    db_cutoff: float | None = None
    seconds: float | None = None  # waveform: the median clip's audio; logmel: the stored length
    codec: str | None = None  # waveform: "wav" or "flac"
    member: str | None = None  # stored arrays: the member's extension
    dtype: str | None = None
    shape: list[int] | None = None  # stored arrays: [H, W]
    scale: float | None = None  # spectrogram_array: the loaders multiply by it


@dataclass(frozen=True, eq=True)
class TextInfo(Section):
    """`text`: the tokenizer (the built-in word tokenizer, or a Hugging Face tokenizer.json copied into the
    dataset folder as `file`), its sha256, the vocabulary size and the fixed length of the int32 ids."""

    tokenizer: str
    file: str
    vocab_size: int
    max_len: int
    sha256: str
    dtype: str = "int32"
    raw: str | None = None  # the member holding the raw text
    source: str | None = None  # huggingface: the folder's name
    pad_id: int | None = None
    unk_id: int | None = None
    lowercase: bool | None = None
    normalization: str | None = None
    vocab_from: str | None = None


SECTIONS = {"visual": VisualInfo, "audio": AudioInfo, "text": TextInfo}


@dataclass
class DatasetInfo:
    """What `dataset.json` holds; the loaders read everything they need from here."""

    dataset: str
    modalities: list[str]
    classes: list[str]
    multilabel: bool
    visual: VisualInfo | None = None  # None: the dataset has no such modality
    audio: AudioInfo | None = None
    text: TextInfo | None = None
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
            "visual": self.visual.to_json() if self.visual else {},
            "audio": self.audio.to_json() if self.audio else {},
            "text": self.text.to_json() if self.text else {},
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
    for name, section in SECTIONS.items():  # {} in the file: the dataset has no such modality
        doc[name] = section.from_json(doc[name], f"{path} [{name}]") if doc.get(name) else None
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
