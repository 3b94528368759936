"""Shard members as bytes: the audio codec's decoder and the check that a member decodes.

The build (`pipeline/encode.py`) decodes every audio member it writes with `decode_audio_member`, `pipeline
verify` checks every member with `check_member`, and the DALI loader names a failing member with it; the
torch loader decodes audio with `decode_audio_member` too; both loaders read members by their offsets with
`ShardFiles`. PyAV is imported here, at import time, so a
loader's DataLoader workers inherit it from the parent instead of importing it after the fork."""
from __future__ import annotations

import io
import json
import os
import wave
from collections import OrderedDict
from typing import TYPE_CHECKING

import av
import numpy as np
import zstandard
from PIL import Image

if TYPE_CHECKING:
    from shards.sample_refs import SampleRef

STORED_SPECTROGRAMS = {"spec.npy": np.float32, "logmel.npy": np.float16}  # member -> dtype a build writes


def decode_audio_member(data: bytes) -> np.ndarray:
    """A WAV or FLAC member as int16 mono samples."""
    if data[:4] == b"RIFF":
        with wave.open(io.BytesIO(data)) as w:
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    chunks = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            chunks.append(frame.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)


def check_member(ext: str, data: bytes) -> tuple[int, int] | None:
    """Raise if a member does not decode; a JPEG's decoded (height, width), None for other members."""
    if ext.endswith("jpg"):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.height, image.width
    elif ext in ("wav", "flac"):
        if len(decode_audio_member(data)) == 0:
            raise ValueError("audio member holds no samples")
    elif ext == "text.npy":
        ids = np.load(io.BytesIO(data), allow_pickle=False)
        if ids.dtype != np.int32 or ids.ndim != 1 or (ids < 0).any():
            raise ValueError(f"token ids must be non-negative int32 [L], got {ids.dtype} {ids.shape}")
    elif ext in STORED_SPECTROGRAMS:
        spec, dtype = np.load(io.BytesIO(data), allow_pickle=False), np.dtype(STORED_SPECTROGRAMS[ext])
        if spec.dtype != dtype or spec.ndim != 2 or not np.isfinite(spec).all():
            raise ValueError(f"a stored spectrogram must be finite {dtype} [H, W], got {spec.dtype} {spec.shape}")
    elif ext.endswith("npy"):
        np.load(io.BytesIO(data), allow_pickle=False)
    elif ext.endswith("zst"):
        zstandard.ZstdDecompressor().decompress(data).decode("utf-8")
    elif ext == "json":
        json.loads(data)
    elif ext == "cls":
        [int(x) for x in data.decode().split(",")]
    return None


MAX_OPEN_SHARDS = 256  # tars a reader keeps open (least recently used closed first), well under `ulimit -n`


class ShardFiles:
    """Members read by offset from tars kept open, one descriptor per tar and process. `os.pread` keeps no
    file position, so reads need no seek and a descriptor inherited over fork stays correct."""

    def __init__(self, limit: int = MAX_OPEN_SHARDS) -> None:
        self.limit = limit
        self._fds: OrderedDict[str, int] = OrderedDict()

    def read(self, ref: SampleRef, ext: str) -> bytes:
        offset, size = ref.members[ext]
        fd = self._fds.get(ref.tar)
        if fd is None:
            fd = self._fds[ref.tar] = os.open(ref.tar, os.O_RDONLY)
            if len(self._fds) > self.limit:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(ref.tar)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{ref.tar}: member .{ext} of {ref.key} ends past the end of the file")
        return data

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __getstate__(self) -> dict:  # a spawned worker opens its own descriptors
        return {"limit": self.limit, "_fds": OrderedDict()}

    def __del__(self) -> None:
        self.close()
