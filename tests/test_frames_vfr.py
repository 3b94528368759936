"""Frames are picked by presentation time: on a variable-frame-rate clip the stored frames are the ones
on screen at the times the build claims, and `Clip.frame_times` says which times they are.

The clip (tests/media.py `vfr_clip`) runs at 5 fps for 2 s, then at 25 fps; each frame shows a bar whose
position is a known function of its presentation time, so the content tells the time too. Index x
average fps (17 fps here) would pick frames up to 1.3 s late in the slow part."""
from __future__ import annotations

import sys
from pathlib import Path

import decord
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests` has no __init__.py; make `tests.media` importable either way
    sys.path.insert(0, str(ROOT))

from pipeline.decode import decode_clip, frame_times  # noqa: E402
from tests.media import VFR_BAR_SPEED, VFR_BAR_WIDTH, VFR_FAST_FPS, VFR_SECONDS, VFR_SLOW_FPS, VFR_SWITCH, vfr_clip  # noqa: E402

N_FRAMES, FPS = 8, 2.0  # 0.75, 1.25, ... 4.25 s: four targets in the 5 fps part, four in the 25 fps part
CONTENT_TOL = 0.02  # s: the bar's centroid after H.264 is within 1 px (0.02 s at 50 px/s)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = vfr_clip(tmp_path_factory.mktemp("vfr") / "vfr.mp4")
    reader = decord.VideoReader(str(path), num_threads=1)
    starts = np.asarray(reader.get_frame_timestamp(np.arange(len(reader))), dtype=np.float64)[:, 0]
    steps = set(np.round(np.diff(starts), 3).tolist())
    assert steps == {1 / VFR_SLOW_FPS, 1 / VFR_FAST_FPS}  # really variable frame rate, not re-timed
    assert abs(reader.get_avg_fps() - len(reader) / VFR_SECONDS) < 0.5  # 17 fps: the misleading average
    return path


def frame_interval(t: float) -> float:
    """How long a frame of the clip lasts around time t."""
    return 1 / VFR_SLOW_FPS if t < VFR_SWITCH else 1 / VFR_FAST_FPS


def bar_time(frame: np.ndarray) -> float:
    """The presentation time the frame's content shows: the bar's centroid, back through x = speed * t."""
    columns = frame.mean(axis=(0, 2))
    lit = np.flatnonzero(columns > 128)
    return (float(lit.mean()) - (VFR_BAR_WIDTH - 1) / 2) / VFR_BAR_SPEED


def test_vfr_frames_are_the_ones_shown_at_the_target_times(clip_path: Path) -> None:
    clip = decode_clip(clip_path, N_FRAMES, FPS, 16_000)
    targets = frame_times(clip.duration, N_FRAMES, FPS)
    assert clip.audio is None and len(clip.frames) == len(clip.frame_times) == N_FRAMES
    for target, claimed, frame in zip(targets, clip.frame_times, clip.frames):
        assert claimed <= target + 1e-6 < claimed + frame_interval(target), (target, claimed)  # the frame on screen
        shown = bar_time(frame)
        assert abs(shown - claimed) <= CONTENT_TOL, (claimed, shown)  # frame_times names this very frame
        assert abs(shown - target) <= frame_interval(target) + CONTENT_TOL, (target, shown)
