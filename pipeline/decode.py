"""Decode one raw clip: frames with decord, audio with PyAV, both checked against the container.

PyAV opens the container first because it fails cleanly on corrupt or non-video files; decord then
seeks the chosen frames, picked by their presentation timestamps (not index x average fps, which is wrong
on a variable-frame-rate clip); the audio is resampled to the target rate and length-checked, since a
truncated stream otherwise comes back silently short."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import decord
import numpy as np

# Audio shorter than this fraction of what the container declares is treated as missing.
MIN_AUDIO_FRACTION = 0.5


class DecodeError(Exception):
    """A raw item that cannot be used; `stage` says where it failed."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass
class Clip:
    """Decoded content of one raw clip."""

    frames: list[np.ndarray]  # T x [H, W, 3] uint8, original resolution
    audio: np.ndarray | None  # int16 [n] mono at the target rate, None when absent or unusable
    duration: float  # seconds, from the container
    audio_note: str | None = None  # why audio is missing although the container had a stream
    frame_times: list[float] = field(default_factory=list)  # presentation time (s) of each returned frame


def frame_times(duration: float, n_frames: int, fps: float) -> list[float]:
    """Times of the frames to keep: n_frames at `fps` centred in the clip, or spread evenly over a
    clip too short for that (OGM-GE style: 1 fps, 3 frames)."""
    span = (n_frames - 1) / fps
    if duration >= span + 1.0 / fps:
        start = (duration - span) / 2.0
        return [start + i / fps for i in range(n_frames)]
    return [(i + 0.5) * duration / n_frames for i in range(n_frames)]


def probe(path: Path) -> tuple[float, bool, float | None]:
    """(container duration in s, has video stream, declared audio duration in s or None)."""
    try:
        with av.open(str(path)) as container:
            video = container.streams.video
            audio = container.streams.audio
            if not video:
                raise DecodeError("probe", "no video stream")
            duration = _seconds(container.duration, 1 / av.time_base) or _stream_seconds(video[0])
            audio_duration = _stream_seconds(audio[0]) if audio else None
            if audio and audio_duration is None:
                audio_duration = duration
    except DecodeError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise DecodeError("probe", f"not a readable media file ({type(exc).__name__}: {exc})") from exc
    if not duration or duration <= 0:
        raise DecodeError("probe", "container reports no duration")
    return duration, True, audio_duration


def _seconds(value: int | None, unit: float) -> float | None:
    return None if value is None else value * unit


def _stream_seconds(stream: av.stream.Stream) -> float | None:
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def decode_frames(path: Path, duration: float, n_frames: int,
                  fps: float) -> tuple[list[np.ndarray], list[float]]:
    """(frames, their presentation times in s): for each time of `frame_times`, the frame on screen
    then, found by the frames' timestamps, so a variable-frame-rate clip gives the frames at the times
    claimed (decord, one thread: workers are processes)."""
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        if total == 0:
            raise DecodeError("frames", "video stream has no frames")
        spans = np.asarray(reader.get_frame_timestamp(np.arange(total)), dtype=np.float32).reshape(total, 2)
        indices = [frame_at(spans, t) for t in frame_times(duration, n_frames, fps)]
        batch = reader.get_batch(indices).asnumpy()
    except DecodeError:
        raise
    except Exception as exc:  # decord raises its own DECORDError and RuntimeError subclasses
        raise DecodeError("frames", f"decord could not decode frames ({type(exc).__name__}: {exc})") from exc
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise DecodeError("frames", f"unexpected frame array shape {batch.shape}")
    return [np.ascontiguousarray(f) for f in batch], [float(spans[i, 0]) for i in indices]


def frame_at(spans: np.ndarray, t: float) -> int:
    """Index of the frame displayed at time `t`: the one whose [start, end) interval holds it, else (in a
    gap, or before the first or past the last frame) the one starting nearest to it. decord's timestamps
    are float32, so `t` is compared at that precision (a time on a frame boundary picks the later frame)."""
    t = np.float32(t)
    shown = np.flatnonzero((spans[:, 0] <= t) & (t < spans[:, 1]))
    if len(shown):
        return int(shown[-1])
    return int(np.argmin(np.abs(spans[:, 0] - t)))


def decode_audio(path: Path, sample_rate: int) -> np.ndarray:
    """All audio of the first audio stream as int16 mono at `sample_rate`."""
    chunks = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise DecodeError("audio", f"PyAV could not decode audio ({type(exc).__name__}: {exc})") from exc
    return np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)


def decode_clip(path: Path, n_frames: int, fps: float, sample_rate: int) -> Clip:
    """Decode frames and audio of one clip; raises DecodeError when the clip cannot be used at all.

    A clip whose audio is absent, undecodable or much shorter than declared keeps its frames and
    comes back with `audio=None` and the reason in `audio_note`."""
    if not path.is_file():
        raise DecodeError("source", f"file not found: {path}")
    duration, _, audio_duration = probe(path)
    frames, times = decode_frames(path, duration, n_frames, fps)
    if audio_duration is None:
        return Clip(frames, None, duration, frame_times=times)
    try:
        audio = decode_audio(path, sample_rate)
    except DecodeError as exc:
        return Clip(frames, None, duration, exc.reason, times)
    got = len(audio) / sample_rate
    expected = max(audio_duration, duration)
    if got < MIN_AUDIO_FRACTION * expected or got == 0:
        note = (f"audio truncated: decoded {got:.2f} s of {expected:.2f} s declared "
                f"(below {MIN_AUDIO_FRACTION:.0%}); treated as missing")
        return Clip(frames, None, duration, note, times)
    return Clip(frames, audio, duration, frame_times=times)


def decode_audio_file(path: Path, sample_rate: int) -> tuple[np.ndarray, float]:
    """(int16 mono audio at `sample_rate`, declared duration in s) of an audio file (wav, flac, mp3,
    m4a/aac, ogg) or of a video's audio track; raises DecodeError when it has no usable audio, including
    audio much shorter than its container declares (silent truncation)."""
    if not path.is_file():
        raise DecodeError("source", f"file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DecodeError("audio", "no audio stream")
            declared = (_stream_seconds(container.streams.audio[0])
                        or _seconds(container.duration, 1 / av.time_base) or 0.0)
    except DecodeError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise DecodeError("probe", f"not a readable media file ({type(exc).__name__}: {exc})") from exc
    audio = decode_audio(path, sample_rate)
    got = len(audio) / sample_rate
    if got == 0 or got < MIN_AUDIO_FRACTION * declared:
        raise DecodeError("audio", f"audio truncated: decoded {got:.2f} s of {declared:.2f} s declared "
                                   f"(below {MIN_AUDIO_FRACTION:.0%})")
    return audio, declared
