"""build-shards throughput against its decode-only floor, per worker count, on the same clips in one run.

The floor is what the build cannot beat: the same decoders (`pipeline.decode.decode_clip`) decoding the
same frames and audio of the same clips in a process pool of the same size, with no encoding, checking
or writing. The build is `pipeline.build.build_shards` into a fresh output directory (progress off), so
it includes everything a user waits for: the adapter scan, decoding, JPEG/WAV encoding and re-decoding,
tar + index writing and the manifest. Target: build clips/s >= 0.8 x floor clips/s: decoding is the work
a build cannot avoid, so encoding, checking and writing should add at most a quarter to its time.

    python benchmarks/build.py --out /tmp/bench-build --clips 64 --workers 1 2 --repeats 3

Corpora: `kinetics` (default) writes Kinetics-400-shaped clips with benchmarks/corpus.py (10 s, 340x256
H.264 at 30 fps, 44.1 kHz stereo AAC, Kinetics-400 layout) and builds `kinetics_sound`; `demo` makes the
av_digits demo corpus (corpus.make_demo_corpus) and builds `av_digits`; `--src DIR --dataset NAME`
measures an existing raw corpus. Writes OUT/build.json and OUT/build.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from statistics import median

from matplotlib.figure import Figure

from corpus import CLIP, make_corpus, make_demo_corpus  # benchmarks/ is on sys.path when a script there runs
from figure import save
from machine import load_average, machine_info, machine_label
from pipeline.adapters import ADAPTERS
from pipeline.build import BuildOptions, build_shards
from pipeline.decode import DecodeError, decode_clip

TARGET_RATIO = 0.8  # target: build clips/s >= 0.8 x decode-only clips/s


# ----------------------------------------------------------------------------------------- measurement

def _decode_one(job: tuple[str, int, float, int]) -> bool:
    """Decode one clip exactly as the build does; True when it decoded."""
    path, frames, fps, sample_rate = job
    try:
        decode_clip(Path(path), frames, fps, sample_rate)
    except DecodeError:
        return False
    return True


def decode_floor(paths: list[Path], opts: BuildOptions, workers: int) -> tuple[float, int]:
    """Seconds to decode every clip with `workers` processes (in-process for one, like the build)."""
    jobs = [(str(p), opts.frames, opts.fps, opts.sample_rate) for p in paths]
    started = time.perf_counter()
    if workers <= 1:
        ok = sum(map(_decode_one, jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            ok = sum(pool.map(_decode_one, jobs, chunksize=1))
    return time.perf_counter() - started, ok


def full_build(dataset: str, src: Path, out: Path, opts: BuildOptions, workers: int) -> tuple[float, int]:
    """Seconds for `build_shards` into a fresh `out`; also the number of samples it wrote."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    info = build_shards(dataset, src, out, opts, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return seconds, sum(s["samples"] for s in info.splits.values())


def plot(result: dict, path: Path) -> None:
    """Grouped bars (build vs floor) per worker count, with build/floor annotated."""
    rows = result["results"]
    xs = range(len(rows))
    width = 0.38
    fig = Figure(figsize=(1.8 + 1.6 * len(rows), 4.2))
    ax = fig.subplots()
    floor = ax.bar([x - width / 2 for x in xs], [r["floor_clips_per_s"] for r in rows], width,
                   label="decode-only floor", color="#9aa5b1")
    build = ax.bar([x + width / 2 for x in xs], [r["build_clips_per_s"] for r in rows], width,
                   label="build-shards", color="#1f77b4")
    for bar_floor, bar_build, r in zip(floor, build, rows):
        top = max(bar_floor.get_height(), bar_build.get_height())
        ax.annotate(f"{r['ratio']:.2f}x", (bar_build.get_x() + bar_build.get_width() / 2, top),
                    xytext=(0, 4), textcoords="offset points", ha="center", fontsize=9,
                    color="black" if r["ratio"] >= TARGET_RATIO else "#c0392b")
    ax.set_xticks(list(xs), [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in rows])
    ax.set_ylabel("clips / s (median)")
    ax.set_ylim(0, 1.18 * max(max(r["floor_clips_per_s"], r["build_clips_per_s"]) for r in rows))
    corpus = result["corpus"]
    ax.set_title(f"build-shards vs decode floor: {corpus['clips']} {corpus['name']} clips\n"
                 f"{machine_label(result['machine'])} (ratio build/floor, target {TARGET_RATIO})", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    save(fig, path)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen_workers = max(args.workers)
    if args.src:
        src, dataset, corpus = Path(args.src), args.dataset, {"name": args.dataset, "src": str(args.src)}
    elif args.corpus == "kinetics":
        src = make_corpus(out / f"raw-kinetics-{args.clips}", args.clips, workers=gen_workers)
        dataset, corpus = "kinetics_sound", {"name": "kinetics-shaped", **CLIP}
    else:
        src = make_demo_corpus(out / f"raw-demo-{args.clips}", args.clips, gen_workers)
        dataset, corpus = "av_digits", {"name": "av_digits"}
    opts = BuildOptions(shard_size=args.shard_size)
    samples = ADAPTERS[dataset](src).samples
    paths = [src / s.source for s in samples]
    corpus.update(clips=len(paths), dataset=dataset, src=str(src))

    # Warm the page cache and first-use costs (in this process too: one worker runs in-process) so the
    # first timed run of either kind is not penalised.
    decode_floor(paths, opts, max(args.workers))
    decode_floor(paths[:2], opts, 1)
    load_before = load_average()
    timings = {w: {"floor": [], "build": []} for w in args.workers}
    for repeat in range(args.repeats):
        for w in args.workers:  # interleaved, so drift in the machine hits both alike
            seconds, decoded = decode_floor(paths, opts, w)
            timings[w]["floor"].append(seconds)
            seconds, written = full_build(dataset, src, out / "shards", opts, w)
            timings[w]["build"].append(seconds)
            print(f"repeat {repeat + 1}/{args.repeats} workers {w}: floor {len(paths) / timings[w]['floor'][-1]:.2f} "
                  f"clips/s, build {len(paths) / seconds:.2f} clips/s ({decoded} decoded, {written} written)",
                  flush=True)
    results = []
    for w in args.workers:
        floor = len(paths) / median(timings[w]["floor"])
        build = len(paths) / median(timings[w]["build"])
        paired = [f / b for f, b in zip(timings[w]["floor"], timings[w]["build"])]
        results.append({"workers": w, "build_clips_per_s": round(build, 3), "floor_clips_per_s": round(floor, 3),
                        "ratio": round(build / floor, 3), "meets_target": build / floor >= TARGET_RATIO,
                        "ratio_per_repeat": [round(r, 3) for r in paired],
                        "build_seconds": [round(s, 3) for s in timings[w]["build"]],
                        "floor_seconds": [round(s, 3) for s in timings[w]["floor"]]})
    result = {
        "benchmark": "build-shards clips/s vs decode-only floor (same clips, same run)",
        "machine": machine_info(load_before),
        "corpus": corpus,
        "options": {"repeats": args.repeats, "statistic": "median", "workers": args.workers,
                    "build": asdict(opts)},
        "target_ratio": TARGET_RATIO,
        "results": results,
    }
    (out / "build.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "build.png")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="work directory; build.json and build.png go here")
    parser.add_argument("--corpus", choices=["kinetics", "demo"], default="kinetics",
                        help="generated corpus: Kinetics-shaped clips, or the av_digits demo")
    parser.add_argument("--src", default=None, help="measure this raw corpus instead of generating one")
    parser.add_argument("--dataset", default=None, help="adapter for --src: " + ", ".join(sorted(ADAPTERS)))
    parser.add_argument("--clips", type=int, default=64, help="clips to generate")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--shard-size", type=int, default=8,
                        help="samples per shard; small enough that every worker gets several shards")
    args = parser.parse_args(argv)
    if args.clips <= 0 or args.repeats <= 0 or min(args.workers) <= 0 or args.shard_size <= 0:
        parser.error("--clips, --repeats, --workers and --shard-size must be positive")
    if args.src and args.dataset not in ADAPTERS:
        parser.error(f"--src needs --dataset, one of {', '.join(sorted(ADAPTERS))}")
    return args


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(json.dumps({"machine": result["machine"], "results": [
        {k: r[k] for k in ("workers", "build_clips_per_s", "floor_clips_per_s", "ratio")} for r in result["results"]]},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
