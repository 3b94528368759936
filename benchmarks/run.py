"""Throughput of the whole system in one command: corpus -> build, loader and training benchmarks -> report.

    python benchmarks/run.py --out DIR [--clips N] [--device cpu|gpu] [--quick]

1. A Kinetics-Sound-shaped corpus (benchmarks/corpus.py: 10 s 340x256 H.264 clips at 30 fps with 44.1 kHz
   stereo AAC, Kinetics-400 layout) in DIR/raw, reused by later runs.
2. The three benchmarks as subprocesses with their own command lines, each writing JSON + PNG in its folder:
   benchmarks/loader.py (DIR/loader: raw mp4 decoding, the OGM-GE-style loader, plain webdataset, the
   torch loader, DALI CPU, the decoding floor and, with --device gpu, DALI GPU, at drop 0 and 0.3),
   benchmarks/train.py (DIR/train: one-device step vs loader, Ray Train 1..N workers) and benchmarks/build.py
   (DIR/build: build-shards vs its decode floor, on a subset of the corpus). Every number is a median of
   several runs and every comparison a ratio of numbers measured in the same run.
3. DIR/report.md (machine, one table per benchmark with the targets met or not, the plots) and
   DIR/report.json, rewritten after each benchmark so a run cut short still leaves a report; the output
   of each benchmark goes to DIR/logs/.

`--quick` sizes everything for a 2-core machine (a few minutes); `--device gpu` sizes the run for one GPU
and a 16-core host in under 10 minutes (see benchmarks/gpu.sh) and uses the Kinetics-Sound training config
unchanged (batch 64, crop 224, ResNet-18 x 2, DALI on the GPU, bf16 autocast in the step measurement).
The CPU profiles train a reduced model (width 16, crop 112), since a CPU is not where it trains.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from corpus import CLIP, fail, make_corpus, subset
from machine import gpu_count, load_average, machine_info
from shards.loader import dali_available

log = logging.getLogger("benchmarks.run")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMALL_MODEL = ["model.width=16", "data.crop_size=112"]


@dataclass(frozen=True)
class Profile:
    """How big each benchmark runs."""

    clips: int  # train clips of the corpus (loader and training benchmarks)
    val_clips: int  # val clips (the trainer validates every epoch)
    build_clips: int  # the build benchmark's subset
    build_workers: list[int]
    loader_batch: int
    train_workers: list[int]
    train_set: list[str] = field(default_factory=list)  # config overrides of the training benchmark
    epochs: int = 2
    step_batches: int = 20
    tile: int = 1  # the training benchmark's epochs: every train shard this many times
    loader_tile: int = 1  # the loader benchmark's dali_gpu: every train shard this many times per epoch
    loader_only: list[str] = field(default_factory=list)  # the loader benchmark's loaders (all when empty)
    step_batch_sizes: list[int] = field(default_factory=list)  # more batch sizes for the one-device step
    repeats: int = 3


def make_profile(device: str, quick: bool, cores: int, gpus: int) -> Profile:
    """quick (2 CPU cores, minutes), cpu (a bigger CPU machine), gpu (one GPU host, < 10 minutes)."""
    spread = sorted({1, 2, *(w for w in (4, 8, 16) if w <= cores), cores})
    if device == "gpu":
        return Profile(clips=96 if quick else 384, val_clips=16 if quick else 32, build_clips=32 if quick else 64,
                       build_workers=[1, min(4, cores), cores] if cores > 4 else spread, loader_batch=64,
                       train_workers=list(range(1, gpus + 1)), epochs=2 if quick else 3,
                       step_batches=10 if quick else 30, tile=4 if quick else 8,
                       # epochs of thousands of samples measure the GPU's rate, not the start-up (a DALI build took
                       # 1 s on an H200 host, 6 s for the CPU pipeline, once per loader). The CPU-bound peers
                       # (raw decoding took 90 s of a 10-minute run there) are measured by the CPU profiles.
                       loader_tile=16, loader_only=["torch", "dali_cpu", "dali_gpu"],
                       step_batch_sizes=[256])
    if quick:
        return Profile(clips=24, val_clips=8, build_clips=16, build_workers=[1, 2] if cores >= 2 else [1],
                       loader_batch=8, train_workers=[1, 2] if cores >= 2 else [1],
                       train_set=SMALL_MODEL + ["data.batch_size=4"], step_batches=4)
    return Profile(clips=128, val_clips=16, build_clips=64, build_workers=spread, loader_batch=16,
                   train_workers=[w for w in spread if w <= max(1, cores // 2)],
                   train_set=SMALL_MODEL + ["data.batch_size=8"], step_batches=10)


# --------------------------------------------------------------------------------------------- machine
def check_gpu() -> int:
    """The number of CUDA GPUs; exits with what to fix when there is none or DALI is missing."""
    gpus = gpu_count()
    if not dali_available():
        fail("error: --device gpu needs NVIDIA DALI: pip install -e . installs its CUDA 12 build "
             "(nvidia-dali-cuda120), the gpu-cuda13 extra the CUDA 13 one")
    return gpus


# --------------------------------------------------------------------------------------------- running
def stop(proc: subprocess.Popen) -> None:
    """End a benchmark and everything it started (its own process group): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_benchmark(name: str, args: list[str], out: Path, limit: float | None) -> dict:
    """Run benchmarks/<name>.py, streaming its output to the console and DIR/logs/<name>.log; stopped after
    `limit` seconds when given."""
    cmd = [sys.executable, "-u", str(HERE / f"{name}.py"), *args]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log.info("running %s", shlex.join(cmd))
    started, load_before = time.perf_counter(), load_average()[0]
    with open(out / "logs" / f"{name}.log", "w") as logfile:
        logfile.write(shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        timer = threading.Timer(limit, stop, (proc,)) if limit is not None else None
        if timer:
            timer.start()
        for line in proc.stdout:
            sys.stdout.write(line)
            logfile.write(line)
        rc = proc.wait()
        if timer:
            timer.cancel()
    seconds = round(time.perf_counter() - started, 1)
    run = {"seconds": seconds, "command": shlex.join(cmd),
           "load_average_1min": [load_before, load_average()[0]]}
    timed_out = limit is not None and seconds >= limit
    json_path = out / name / f"{name}.json"
    if rc != 0 or not json_path.is_file():
        why = (f"stopped at the time limit after {seconds:.0f} s" if timed_out
               else f"exit code {rc} after {seconds:.0f} s")
        log.error("%s failed (%s); see %s", name, why, out / "logs" / f"{name}.log")
        return {"ok": False, "why": why, **run}
    shutil.copyfile(out / name / f"{name}.png", out / f"{name}.png")  # beside report.md, for a flat copy of it
    return {"ok": True, **run, "result": json.loads(json_path.read_text())}


def benchmark_args(name: str, p: Profile, device: str, out: Path, src: Path, build_src: Path, cores: int) -> list[str]:
    """The command line of each benchmark, from the profile."""
    reps = ["--repeats", str(p.repeats)]
    if name == "build":
        return ["--out", str(out / "build"), "--src", str(build_src), "--dataset", "kinetics_sound",
                "--workers", *map(str, p.build_workers), *reps]
    if name == "loader":  # epochs of a second or less: more of them for a steadier median
        args = ["--out", str(out / "loader"), "--src", str(src), "--batch-size", str(p.loader_batch),
                "--device", device, "--workers", str(cores), "--repeats", str(max(p.repeats, 5))]
        if p.loader_only:
            args += ["--only", *p.loader_only]
        return args + ["--tile", str(p.loader_tile)]
    sets = [a for s in p.train_set for a in ("--set", s)]
    steps = ["--step-batch-sizes", *map(str, p.step_batch_sizes)] if p.step_batch_sizes else []
    return ["--out", str(out / "train"), "--src", str(src), "--device", device, "--workers", *map(str, p.train_workers),
            *steps,
            "--epochs", str(p.epochs), "--step-batches", str(p.step_batches), "--tile", str(p.tile), *sets, *reps]


# --------------------------------------------------------------------------------------------- report
def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def build_section(r: dict) -> list[str]:
    lines = [f"Build (`pipeline.build.build_shards`, everything a user waits for) against the decode-only floor "
             f"(the same decoders on the same {r['corpus']['clips']} clips, same process count), target build/floor "
             f">= {r['target_ratio']}; median of {r['options']['repeats']} runs.", "",
             "| workers | build clips/s | decode floor clips/s | build / floor | target |", "|---|---|---|---|---|"]
    lines += [f"| {x['workers']} | {fmt(x['build_clips_per_s'], 2)} | {fmt(x['floor_clips_per_s'], 2)} | "
              f"{x['ratio']:.2f} | {yes(x['meets_target'])} |" for x in r["results"]]
    return lines + ["", "![build](build.png)"]


def loader_section(r: dict) -> list[str]:
    p, configs, ratios = r["params"], r["configs"], r["ratios"]
    drops = p["drops"]
    order = ("raw", "ogm", "wds", "torch", "torch_logmel", "dali_cpu", "dali_cpu_logmel", "dali_gpu", "floor")
    names = [n for n in order if f"{n}_p0" in configs]
    lines = [f"Training-mode loading (random crop {p['crop']} + flip, {p['n_mels']}-mel log-mel of "
             f"{p['audio_seconds']} s audio, {p['frames']} frames) of {p['samples']} samples, "
             f"batch {p['batch_size']}, {p['workers']} workers or threads, with missing-modality augmentation "
             f"`{p['augment']}`; samples/s of the median of {p['repeats']} epochs, start-up included (the "
             "time to an epoch's first batch weighs more in these short epochs than in a real one), and CPU-ms "
             "per sample of the median epoch (this process, RUSAGE_SELF, + its workers: RUSAGE_CHILDREN for those "
             "that exited, /proc for persistent ones still alive).", "",
             "Loaders: `raw` decodes the mp4s in DataLoader workers; `ogm` is the research code's loader "
             "(OGM-GE `AVDataset`: JPEG files per clip and a pre-computed `.npy` log-mel, PIL + torchvision-style "
             "transforms, DataLoader); `wds` a plain `webdataset` pipeline over the shards; `torch` and "
             "`dali_*` the shard loaders; `floor` the decoding alone (3 JPEG decodes with the same crop + the "
             f"WAV's log-mel, one process, bytes in memory, {p.get('floor_samples', '-')} samples). `ogm` and "
             "`wds` decode everything and zero what is dropped; the others skip it."]
    files = r.get("ogm_files")
    if files:
        lines += ["", f"`ogm`'s one-off pre-extraction (not timed): {files['clips']} clips, "
                  f"{files['bytes'] / 2 ** 20:.1f} MiB of JPEG files and `.npy` arrays, {files['seconds']:.1f} s."]
    refs = [ref for ref in ("raw", "ogm", "floor") if ratios.get(f"over_{ref}")]
    if p.get("tile_dali_gpu", 1) > 1:
        lines += ["", f"`dali_gpu` reads every shard {p['tile_dali_gpu']} times per epoch (a GPU's rate shows "
                  "only over thousands of samples, beyond the start-up). \"after first batch\" is the "
                  "rate once the epoch's first batch is out: what a long epoch approaches."]
    lines += ["", "| loader | p | samples/s | after first batch | CPU-ms per sample | first batch s | vs p=0 | "
              + " | ".join(f"samples/s / {ref} | CPU-ms / {ref}" for ref in refs) + " |",
              "|---|" + "---|" * (6 + 2 * len(refs))]

    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}x"

    for n in names:
        for d in drops:
            c, tag = configs[f"{n}_p{d:g}"], f"p{d:g}"
            over = [ratios[f"over_{ref}"].get(tag, {}).get(n, {}) for ref in refs]
            vs_p0 = ratios["drop_over_no_drop"].get(n) if d != drops[0] else None
            lines.append(f"| {n} | {d:g} | {fmt(c['samples_per_s'])} | {fmt(c.get('steady_samples_per_s'))} | "
                         f"{fmt(c['cpu_ms_per_sample'])} | "
                         f"{fmt(c.get('first_batch_s'), 2)} | {ratio(vs_p0)} | "
                         + " | ".join(f"{ratio(o.get('samples_per_s'))} | {ratio(o.get('cpu_ms_per_sample'))}"
                                      for o in over) + " |")
    lines += ["", "| target | result |", "|---|---|"]
    lines += [f"| {k} | {yes(v)} |" for k, v in r.get("targets", {}).items()]
    return lines + ["", "![loader](loader.png)"]


def train_section(r: dict) -> list[str]:
    p = r["params"]
    lines = [f"Model: {p['model']}; batch {p['batch_size_per_worker']} per worker, crop {p['crop']}, loader "
             f"`{p['loader_backend']}` with {p['loader_workers']} threads/workers, {p['cpus_per_worker']:g} CPUs per "
             f"Ray worker, {p['train_samples']} train samples"
             + (f" (every train shard {p['tile']} times per epoch)" if p.get("tile", 1) > 1 else "")
             + f", autocast {p.get('amp', 'none')}; median of {p['repeats']} runs."]
    if p["overrides"]:
        lines[0] += " Config overrides: " + ", ".join(f"`{o}`" for o in p["overrides"]) + "."
    s = r.get("step")
    if s:
        steps = [s, *r.get("step_at_batch_size", {}).values()]
        lines += ["", f"**One device ({s['device']}, autocast {s['autocast'] or 'off'}, {s['backend']})**: the loader "
                  "alone (batches moved to the device), the training step alone on a resident batch, and both together "
                  "as the trainer runs them (data stall = share of wall time waiting for the next batch).", "",
                  "| batch | loader supply samples/s | step consumption samples/s | step ms | loader + step samples/s | "
                  "supply / consumption | data stall |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['batch_size']} | {fmt(x['supply_samples_per_s'])} | {fmt(x['consumption_samples_per_s'])} | "
                  f"{fmt(x['step_ms'])} | {fmt(x['loop_samples_per_s'])} | {x['supply_over_consumption']:.2f} | "
                  f"{100 * x['data_stall_fraction']:.1f}% |" for x in steps]
    if r.get("ray"):
        lines += ["", f"**Ray Train** (`joint` stage through `trainer.launch.run_stage`, DDP; last of {p['epochs']} "
                  "epochs from metrics.jsonl; data wait is rank 0's; scaling efficiency = N-worker samples/s / "
                  "(N x 1-worker samples/s)).", "",
                  "| workers | samples/s | per worker | data wait | scaling efficiency |", "|---|---|---|---|---|"]
        lines += [f"| {x['workers']} | {fmt(x['samples_per_s'])} | {fmt(x['samples_per_s_per_worker'])} | "
                  f"{100 * x['data_wait_fraction']:.1f}% | {fmt(x['scaling_efficiency'], 2)} |" for x in r["ray"]]
    lines += ["", "| target | result |", "|---|---|"]
    lines += [f"| {k} | {yes(v)} |" for k, v in r.get("targets", {}).items()]
    return lines + ["", "![train](train.png)"]


SECTIONS = {"build": ("1. Build: clips/s per worker against the decode floor", build_section),
            "loader": ("2. Loader: samples/s and CPU-ms per sample against raw decoding, the research code's "
                       "loader, plain webdataset and the decoding floor",
                       loader_section),
            "train": ("3. Training: samples/s per worker, data wait, scaling", train_section)}


def write_report(out: Path, state: dict) -> None:
    """report.json (everything) and report.md (machine, tables, targets, plots) from what has run so far."""
    (out / "report.json").write_text(json.dumps(state, indent=2) + "\n")
    m, c = state["machine"], state["corpus"]
    lines = ["# Throughput report", "",
             f"- **Machine**: {m['cpu']}, {m['cores']} usable of {m['total_cores']} cores, {m['memory_gib']} GiB; "
             f"GPU: {m['gpu'] or 'none'}; {m['platform']}",
             f"- **Software**: Python {m['python']}, torch {m['torch']}, DALI {m['dali'] or 'not installed'}, "
             f"Ray {m['ray']}",
             f"- **Load average** (1, 5, 15 min) at start {m['load_average_before']}, at end "
             f"{state.get('load_average_end', '-')} — other jobs share this machine when it is above the core count",
             f"- **Corpus**: {c['clips']} train + {c['val_clips']} val Kinetics-Sound-shaped clips "
             f"({CLIP['seconds']} s, {CLIP['width']}x{CLIP['height']} H.264 {CLIP['fps']} fps, AAC "
             f"{CLIP['audio_rate'] / 1000:g} kHz stereo), {c['mib']:.0f} MiB, in {c['path']}",
             f"- **Run**: `{state['command']}` on {state['started']}, profile `{state['profile_name']}`, "
             f"{state.get('seconds', '-')} s in all", "",
             "Every figure is a median of several runs; every comparison is a ratio of numbers measured in this run.",
             ""]
    targets = []
    for name in SECTIONS:
        r = state["benchmarks"].get(name)
        if r and r["ok"]:
            if name == "build":
                target = r["result"]["target_ratio"]
                targets += [(f"build/floor >= {target} ({x['workers']} worker(s))", x["meets_target"])
                            for x in r["result"]["results"]]
            else:
                targets += list(r["result"].get("targets", {}).items())
    if targets:
        lines += ["## Targets", "", "| target | result |", "|---|---|"]
        lines += [f"| {k} | {yes(v)} |" for k, v in targets] + [""]
    for name, (title, section) in SECTIONS.items():
        r = state["benchmarks"].get(name)
        lines += [f"## {title}", ""]
        if r is None:
            lines += ["Not run (yet).", ""]
        elif not r["ok"]:
            lines += [f"Failed ({r['why']}): see `logs/{name}.log`.", "",
                      f"    {r['command']}", ""]
        else:
            before, after = r["load_average_1min"]
            lines += section(r["result"]) + ["", f"{r['seconds']} s, 1-minute load average {before} before and "
                                                 f"{after} after: `{r['command']}`", ""]
    (out / "report.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="report.md, report.json and every benchmark's files")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    parser.add_argument("--clips", type=int, help="train clips of the corpus (default: from the profile)")
    parser.add_argument("--repeats", type=int, help="runs per measurement (default: from the profile)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run only these benchmarks")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run; a benchmark still running "
                        "then is stopped and reported as such")
    args = parser.parse_args(argv)
    if (args.clips is not None and args.clips <= 0) or (args.repeats is not None and args.repeats <= 0):
        parser.error("--clips and --repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    gpus = check_gpu() if args.device == "gpu" else 0
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    profile = make_profile(args.device, args.quick, cores, gpus)
    profile = replace(profile, clips=args.clips or profile.clips, repeats=args.repeats or profile.repeats,
                      build_clips=min(profile.build_clips, args.clips or profile.clips))
    state = {"command": shlex.join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
             "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "machine": machine_info(load_average()), "profile_name": f"{args.device}{'-quick' if args.quick else ''}",
             "profile": asdict(profile), "benchmarks": {}}
    log.info("profile %s: %s", state["profile_name"], state["profile"])

    corpus_started = time.perf_counter()
    src = make_corpus(out / "raw", profile.clips, profile.val_clips, cores)
    build_src = subset(src, out / "raw-build", profile.build_clips)
    mib = sum(f.stat().st_size for f in src.rglob("*.mp4")) / 2 ** 20
    state["corpus"] = {"path": str(src), "clips": profile.clips, "val_clips": profile.val_clips, "mib": round(mib, 1),
                       "build_subset": profile.build_clips, "seconds": round(time.perf_counter() - corpus_started, 1),
                       **CLIP}
    write_report(out, state)
    # GPU-critical benchmarks first, so a run cut short by --time-limit still reports them.
    for name in ("loader", "train", "build"):
        if name in args.only:
            left = None if args.time_limit is None else max(1.0, args.time_limit - (time.perf_counter() - started))
            state["benchmarks"][name] = run_benchmark(name, benchmark_args(name, profile, args.device, out, src,
                                                                           build_src, cores), out, left)
            write_report(out, state)
    state["seconds"] = round(time.perf_counter() - started)
    state["load_average_end"] = load_average()
    write_report(out, state)
    log.info("wrote %s and %s (%d s)", out / "report.md", out / "report.json", state["seconds"])
    return 0 if all(r["ok"] for r in state["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
