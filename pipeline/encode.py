"""Encode decoded content into shard members, and check that each member decodes back.

One corrupt member stops a DALI pipeline, so nothing leaves the build without being decoded again."""
from __future__ import annotations

import io
import wave
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import zstandard
from PIL import Image

from pipeline.decode import DecodeError
from pipeline.text import Tokenizer
from shards.format import encode_npy
from shards.members import decode_audio_member


def encode_frame(frame: np.ndarray, short_side: int, quality: int) -> bytes:
    """Resize so the short side is at most `short_side` (never upscale) and encode as baseline JPEG."""
    image = Image.fromarray(frame)
    w, h = image.size
    scale = short_side / min(w, h)
    if scale < 1.0:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    data = buf.getvalue()
    try:
        with Image.open(io.BytesIO(data)) as check:
            check.load()
    except OSError as exc:
        raise DecodeError("encode", f"JPEG written for a frame does not decode: {exc}") from exc
    return data


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM mono WAV."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.ascontiguousarray(audio, dtype="<i2").tobytes())
    return buf.getvalue()


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """FLAC (lossless, smaller than WAV; DALI decodes it on the CPU)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def encode_audio(audio: np.ndarray, sample_rate: int, codec: str) -> bytes:
    """Encode with `codec` ("wav" or "flac") and check the member decodes to the same length."""
    data = encode_wav(audio, sample_rate) if codec == "wav" else encode_flac(audio, sample_rate)
    try:
        back = decode_audio_member(data)
    except (av.FFmpegError, wave.Error, EOFError) as exc:
        raise DecodeError("encode", f"{codec} written for the audio does not decode: {exc}") from exc
    if len(back) != len(audio):
        raise DecodeError("encode", f"{codec} round trip gave {len(back)} samples instead of {len(audio)}")
    return data


def encode_image_file(path: Path, short_side: int, quality: int) -> bytes:
    """An image file (any format Pillow reads: JPEG, PNG, CMYK, grayscale) as an RGB JPEG frame."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DecodeError("image", f"image does not decode ({type(exc).__name__}: {exc})") from exc
    return encode_frame(rgb, short_side, quality)


def encode_text(text: str, tokenizer: Tokenizer) -> tuple[bytes, bytes]:
    """(`text.npy`: int32 [max_len] ids, `text.txt.zst`: the raw UTF-8 text, zstandard level 10)."""
    ids = encode_npy(tokenizer.encode(text))
    raw = zstandard.ZstdCompressor(level=10).compress(text.encode("utf-8"))
    return ids, raw


@lru_cache(maxsize=8)
def _open_array(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_array_row(path: Path, row: int) -> np.ndarray:
    """Row `row` of a .npy array on disk (memory-mapped once per process)."""
    try:
        return np.array(_open_array(str(path))[row])
    except (OSError, ValueError, IndexError) as exc:
        raise DecodeError("source", f"cannot read row {row} of {path.name} ({exc})") from exc
