"""Training throughput: samples/s per Ray worker, the data-wait fraction, and scaling from 1 to N workers.

Two measurements on the same shards, in one run:

- `ray`: for each `--workers` count, the `joint` stage exactly as `trainer/launch.py` runs it
  (`trainer.launch.run_stage`: Ray Train `TorchTrainer`, DDP) for `--epochs` epochs into a fresh storage
  directory. trainer/train.py appends one row per epoch to `metrics.jsonl` (samples_per_s over all workers,
  rank 0's data_wait_fraction, world_size); the last epoch is taken (the first includes loader start-up).
  Median over `--repeats`; scaling efficiency = N-worker samples/s / (N x 1-worker samples/s).
- `step`: in this process, on one device, the config's model (`trainer.train.make_model`) and optimizer
  fed by `shards.loader.make_loader`, timing (a) the loader alone, batches moved to the device: the
  supply; (b) the training step alone (`trainer.train.train_step`) on one batch kept on the device: the
  consumption, and the same with a `loss.item()` host sync after every step as the trainer's loop had
  before it kept the loss on the device; (c) both as the trainer runs them: samples/s and the fraction
  of wall time spent waiting for the next batch, the data stall. On a GPU the step runs under bf16
  autocast, as trainer/train.py does with `train.amp = "bf16"` (`--amp`).

Shards: `--shards OUT/<dataset>` (built), else `--src RAW` (a kinetics_sound raw corpus), else a
Kinetics-shaped corpus generated with benchmarks/corpus.py; both are built into --out/shards. Writes
--out/train.json and --out/train.png.

    python benchmarks/train.py --out /tmp/bench-train --clips 64 --workers 1 2 \\
        --set model.width=16 --set data.crop_size=112 --set data.batch_size=8      # CPU, small model
    python benchmarks/train.py --out /tmp/bench-train --device gpu --src RAW --workers 1   # one GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from matplotlib.figure import Figure

from corpus import build_kinetics_sound, fail, make_corpus, tile_shards
from figure import label_bars, save
from machine import gpu_count, load_average, machine_info, machine_label
from pipeline.build import BuildOptions
from shards.format import read_dataset_info
from shards.loader import make_loader
from trainer.config import Config, load_config
from trainer.launch import absolute, run_stage
from trainer.recipe import STAGES
from trainer.resources import AUTO_MAX_CPUS_PER_WORKER
from trainer.train import build_optimizer, make_model, speed_up, to_device, train_step

log = logging.getLogger("benchmarks.train")
ROOT = Path(__file__).resolve().parent.parent
STAGE = "joint"
STALL_TARGET = 0.05  # target: at most 5% of step time waiting for data (the step, not the loader, sets the pace)
SAMPLES_TARGET = 5000  # target per H100: the loader supplying 5,000 samples/s


# --------------------------------------------------------------------------------------------- ray train
def ray_run(config: Config, workers: int, storage: Path) -> dict:
    """One `joint` stage on `workers` Ray workers into a fresh `storage`; its last metrics.jsonl row."""
    shutil.rmtree(storage, ignore_errors=True)
    config = dataclasses.replace(config, ray=dataclasses.replace(
        config.ray, num_workers=workers, storage_path=str(storage), run_name=f"bench-w{workers}", max_failures=0))
    (storage / config.ray.run_name).mkdir(parents=True)
    started = time.perf_counter()
    run_stage(config, STAGE, None, storage)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (storage / config.ray.run_name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == STAGE]
    last = rows[-1]
    if last["world_size"] != workers:
        raise RuntimeError(f"asked for {workers} workers, the trainer reported world_size {last['world_size']}")
    return {"samples_per_s": last["samples_per_s"], "data_wait_fraction": last["data_wait_fraction"],
            "epochs": [{k: round(r[k], 4) for k in ("epoch", "samples_per_s", "data_wait_fraction")} for r in rows],
            "wall_s": round(wall, 2)}


def start_ray() -> None:
    """Join RAY_ADDRESS's cluster, else start a private local instance, as trainer/launch.py does.

    A private instance gets a port chosen here and RAY_ADDRESS naming it, which its workers inherit: Ray
    Train's placement-group cleaner looks the controller up through the state API without an address, and
    with another Ray instance on the machine it cannot tell which to ask, decides the controller is dead
    and removes the placement group of a healthy run ("Destroying worker since its placement group was
    removed")."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    ray.init(address="local", log_to_driver=False, include_dashboard=False)
    log.info("private Ray instance at %s", ray.get_runtime_context().gcs_address)


def ray_benchmark(config: Config, workers: list[int], repeats: int, out: Path) -> list[dict]:
    """Median samples/s and data wait per worker count (interleaved repeats), with scaling efficiency."""
    start_ray()
    runs: dict[int, list[dict]] = {n: [] for n in workers}
    for repeat in range(repeats):
        for n in workers:
            run = ray_run(config, n, out / "ray" / f"w{n}")
            runs[n].append(run)
            log.info("ray repeat %d/%d, %d worker(s): %.1f samples/s, data wait %.1f%% (stage %.1f s)", repeat + 1,
                     repeats, n, run["samples_per_s"], 100 * run["data_wait_fraction"], run["wall_s"])
    results = []
    for n in workers:
        rate = statistics.median(r["samples_per_s"] for r in runs[n])
        results.append({"workers": n, "samples_per_s": round(rate, 2), "samples_per_s_per_worker": round(rate / n, 2),
                        "data_wait_fraction": round(statistics.median(r["data_wait_fraction"] for r in runs[n]), 4),
                        "runs": runs[n]})
    base = next((r["samples_per_s"] for r in results if r["workers"] == 1), None)
    for r in results:
        r["scaling_efficiency"] = round(r["samples_per_s"] / (r["workers"] * base), 3) if base else None
    return results


# --------------------------------------------------------------------------------------------- one step
def endless(loader) -> Iterator[dict]:
    """Batches across epochs (both loaders advance their epoch at the end of one)."""
    while True:
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_benchmark(config: Config, device: torch.device, amp: bool, batches: int, warmup: int, repeats: int) -> dict:
    """Loader supply, step consumption and the two together, in samples/s; median of interleaved repeats."""
    info = read_dataset_info(config.data.dataset_dir)
    gpu = device.type == "cuda"
    bs = config.data.batch_size
    loader = make_loader(config.data.dataset_dir, "train", bs, backend=config.data.backend,
                         device="gpu" if gpu else "cpu", train=True, seed=config.train.seed,
                         crop=config.data.crop_size, min_crop_area=config.data.min_crop_area, flip=config.data.flip,
                         num_workers=config.data.num_workers, device_id=device.index if gpu else None)
    model = speed_up(make_model(config, info).to(device), config)  # train.channels_last, train.compile
    optimizer, _, _ = build_optimizer(config, STAGES[STAGE], model)
    model.train()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))  # as one Ray worker: oversubscribed OpenMP crawls
    torch.backends.cudnn.benchmark = True

    def step(batch: dict) -> torch.Tensor:  # the trainer's step: the loss stays on the device
        return train_step(model, batch, optimizer, STAGES[STAGE], info, amp)

    log.info("step: %s, batch %d on %s, %d warm-up and %d timed batches per phase", type(loader).__name__, bs, device,
             warmup, batches)
    stream = endless(loader)
    resident = to_device(next(stream), device)
    for _ in range(warmup):  # cudnn autotuning, DALI start-up, allocator growth
        step(to_device(next(stream), device))
    runs: dict[str, list[float]] = {"supply": [], "consumption": [], "consumption_synced": [], "loop": [],
                                    "stall": []}
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(batches):
            to_device(next(stream), device)
        sync(device)
        runs["supply"].append(batches * bs / (time.perf_counter() - started))
        log.info("step: loader supply %.1f samples/s", runs["supply"][-1])  # a phase at a time: a slow one shows

        started = time.perf_counter()
        for _ in range(batches):
            step(resident)
        sync(device)
        runs["consumption"].append(batches * bs / (time.perf_counter() - started))

        started = time.perf_counter()
        for _ in range(batches):
            step(resident).item()  # a host sync per step, as the trainer's loop did before it summed on the device
        runs["consumption_synced"].append(batches * bs / (time.perf_counter() - started))

        wait = 0.0
        started = tick = time.perf_counter()
        for _ in range(batches):
            batch = next(stream)
            wait += time.perf_counter() - tick
            step(to_device(batch, device))
            tick = time.perf_counter()
        runs["loop"].append(batches * bs / (tick - started))
        runs["stall"].append(wait / (tick - started))
        log.info("step: supply %.1f, consumption %.1f, loop %.1f samples/s, data stall %.1f%%", runs["supply"][-1],
                 runs["consumption"][-1], runs["loop"][-1], 100 * runs["stall"][-1])
    median = {k: statistics.median(v) for k, v in runs.items()}
    return {"device": str(device), "backend": type(loader).__name__, "autocast": "bf16" if amp else None,
            "batch_size": bs, "batches_per_repeat": batches, "warmup_batches": warmup,
            "supply_samples_per_s": round(median["supply"], 2),
            "consumption_samples_per_s": round(median["consumption"], 2),
            "consumption_synced_samples_per_s": round(median["consumption_synced"], 2),
            "step_ms": round(1000 * bs / median["consumption"], 2),
            "loop_samples_per_s": round(median["loop"], 2), "data_stall_fraction": round(median["stall"], 4),
            "supply_over_consumption": round(median["supply"] / median["consumption"], 3),
            "runs": {k: [round(x, 4) for x in v] for k, v in runs.items()}}


# --------------------------------------------------------------------------------------------- report
def targets(result: dict) -> dict:
    """The training targets (STALL_TARGET, SAMPLES_TARGET, supply >= consumption), met or not, for what ran."""
    out = {}
    step = result.get("step")
    if step:
        where = f"one {step['device'].split(':')[0]} step"
        out[f"data stall <= {STALL_TARGET:.0%} ({where})"] = step["data_stall_fraction"] <= STALL_TARGET
        out[f"loader supply >= step consumption ({where})"] = (step["supply_samples_per_s"]
                                                               >= step["consumption_samples_per_s"])
        if step["device"].startswith("cuda"):
            out[f"loader supply >= {SAMPLES_TARGET} samples/s per GPU"] = step["supply_samples_per_s"] >= SAMPLES_TARGET
    for r in result.get("ray", []):
        key = f"data wait <= {STALL_TARGET:.0%} (Ray, {r['workers']} worker(s))"
        out[key] = r["data_wait_fraction"] <= STALL_TARGET
    return out


def plot(result: dict, path: Path) -> None:
    """Left: Ray samples/s per worker count against ideal scaling; right: supply / consumption / loop."""
    panels = [p for p in ("ray", "step") if result.get(p)]
    fig = Figure(figsize=(max(6.0, 5.2 * len(panels)), 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "ray":
            rows = result["ray"]
            xs = [r["workers"] for r in rows]
            bars = ax.bar(range(len(xs)), [r["samples_per_s"] for r in rows], color="#1f77b4", label="measured")
            if rows[0]["workers"] == 1:
                ax.plot(range(len(xs)), [x * rows[0]["samples_per_s"] for x in xs], "k--", marker="o",
                        label="ideal (N x 1 worker)")
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            label_bars(ax, bars, [(f"eff {r['scaling_efficiency']:.2f}\n" if r["scaling_efficiency"] is not None
                                   else "") + f"wait {100 * r['data_wait_fraction']:.0f}%" for r in rows])
            ax.set_xlabel("Ray Train workers")
            ax.set_ylabel("samples / s (median)")
            ax.set_title(f"{STAGE} stage on Ray Train, last of {result['params']['epochs']} epochs", fontsize=9)
            ax.legend(fontsize=8, loc="upper left")
            ax.set_ylim(0, 1.3 * max(max(b.get_height() for b in bars), max(xs) * rows[0]["samples_per_s"]))
        else:
            s = result["step"]
            names = ["loader supply", "step consumption", "loader + step"]
            values = [s["supply_samples_per_s"], s["consumption_samples_per_s"], s["loop_samples_per_s"]]
            bars = ax.bar(names, values, color=["#2ca02c", "#ff7f0e", "#1f77b4"])
            label_bars(ax, bars, [f"{v:.0f}" for v in values])
            if s["device"].startswith("cuda"):
                ax.axhline(SAMPLES_TARGET, color="grey", linestyle=":", label=f"{SAMPLES_TARGET} samples/s aim")
                ax.legend(fontsize=8)
            ax.set_ylabel("samples / s (median)")
            ax.set_title(f"{s['backend']} on {s['device']}, autocast {s['autocast'] or 'off'}, "
                         f"batch {s['batch_size']}: data stall {100 * s['data_stall_fraction']:.1f}%", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
    title = textwrap.fill(f"training throughput: {result['params']['model']}", 90)
    fig.suptitle(f"{title}\n{machine_label(result['machine'])}", fontsize=9)
    save(fig, path)


# --------------------------------------------------------------------------------------------- main
def dataset_dir(args: argparse.Namespace, cores: int) -> Path:
    """The shards to train on: given, or built from --src or a generated corpus (reused when there); with
    --tile k, a view whose train split is every shard k times (epochs k times longer, no new data)."""
    if args.shards:
        built = args.shards.resolve()
    else:
        src = args.src or make_corpus(args.out / "raw", args.clips, args.val_clips, cores)
        built = build_kinetics_sound(src, args.out / "shards", BuildOptions(shard_size=args.shard_size),
                                     cores).resolve()
    if args.tile > 1:
        built = tile_shards(built, args.out / f"shards_x{args.tile}" / built.name, args.tile)
        log.info("train split tiled %d times: %s", args.tile, built)
    return built


def load_bench_config(args: argparse.Namespace, dataset: Path, cores: int, amp: bool) -> Config:
    """The config with the benchmark's settings; CPUs per worker capped so max(--workers) fit the machine
    (each worker keeps the same share as the count grows); the Ray runs under bf16 autocast when the step
    measurement is (`train.amp`); user --set values win."""
    base = load_config(args.config, args.set)
    share = max(1, cores // max(args.workers)) if args.ray else cores
    cpus = min(AUTO_MAX_CPUS_PER_WORKER if base.ray.cpus_per_worker == "auto" else int(base.ray.cpus_per_worker), share)
    loaders = cpus if base.data.num_workers == "auto" else min(base.data.num_workers, cpus)
    defaults = [f"data.dataset_dir={dataset}", f"train.epochs={args.epochs}",
                f"ray.use_gpu={str(args.device == 'gpu').lower()}", f"ray.cpus_per_worker={cpus}",
                f"data.num_workers={loaders}", f"train.amp={'bf16' if amp else 'none'}"]
    user_keys = {s.split("=", 1)[0].strip() for s in args.set}
    return absolute(load_config(args.config, [d for d in defaults if d.split("=", 1)[0] not in user_keys] + args.set))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="train.json, train.png and the Ray runs go here")
    parser.add_argument("--shards", type=Path, help="a built dataset (the folder holding dataset.json)")
    parser.add_argument("--src", type=Path, help="a kinetics_sound raw corpus to build shards from")
    parser.add_argument("--clips", type=int, default=64, help="train clips to generate without --shards/--src")
    parser.add_argument("--val-clips", type=int, default=8, help="val clips to generate (the trainer validates)")
    parser.add_argument("--shard-size", type=int, default=32, help="samples per shard when building")
    parser.add_argument("--tile", type=int, default=1,
                        help="train on every shard this many times per epoch (hard links): epochs long enough that "
                             "a fast loader is measured running rather than starting")
    parser.add_argument("--config", default=str(ROOT / "trainer/configs/kinetics_sound.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override (repeatable), e.g. model.width=16")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per Ray run (the last one is measured)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray Train runs")
    parser.add_argument("--step-batches", type=int, default=20, help="batches per timed step phase (0: skip)")
    parser.add_argument("--warmup-batches", type=int, default=3)
    parser.add_argument("--step-batch-sizes", type=int, nargs="*", default=[], metavar="B",
                        help="also measure the one-device step at these batch sizes (data.batch_size otherwise)")
    parser.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto",
                        help="autocast of the step measurement and the Ray runs (train.amp): auto is bf16 on a "
                             "GPU, none on the CPU")
    args = parser.parse_args(argv)
    if min(args.workers) <= 0 or args.repeats <= 0 or args.epochs < 2 or args.clips <= 0 or args.tile < 1:
        parser.error("--workers, --repeats, --clips and --tile must be positive and --epochs at least 2")
    if args.step_batches < 0 or args.warmup_batches < 0 or any(b <= 0 for b in args.step_batch_sizes):
        parser.error("--step-batches and --warmup-batches must be >= 0, --step-batch-sizes positive")
    args.workers = sorted(set(args.workers))
    return args


def check_device(args: argparse.Namespace) -> torch.device:
    """The device of the step measurement; exits with a clear message when a GPU is asked for and absent."""
    if args.device == "cpu":
        return torch.device("cpu")
    gpus = gpu_count()
    if args.ray and max(args.workers) > gpus:
        fail(f"error: --workers {max(args.workers)} needs that many GPUs, this machine has {gpus}")
    return torch.device("cuda", 0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("shards").setLevel(logging.WARNING)
    device = check_device(args)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    load_before = load_average()
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    config = load_bench_config(args, dataset_dir(args, cores), cores, amp)
    info = read_dataset_info(config.data.dataset_dir)
    result: dict = {
        "benchmark": "training samples/s (Ray Train joint stage; one-device step vs loader)",
        "params": {"dataset": config.data.dataset_dir, "train_samples": info.splits["train"]["samples"],
                   "tile": args.tile,
                   "config": args.config, "overrides": args.set, "epochs": args.epochs, "repeats": args.repeats,
                   "workers": args.workers, "batch_size_per_worker": config.data.batch_size,
                   "crop": config.data.crop_size, "loader_backend": config.data.backend,
                   "loader_workers": config.data.num_workers, "cpus_per_worker": config.ray.cpus_per_worker,
                   "use_gpu": config.ray.use_gpu, "amp": config.train.amp, "statistic": "median",
                   "model": f"{'+'.join(config.model.encoders[m] for m in info.modalities)} "
                            f"width {config.model.width}, fusion {config.model.fusion}, {len(info.classes)} classes"},
    }
    if args.step_batches:
        result["step"] = step_benchmark(config, device, amp, args.step_batches, args.warmup_batches, args.repeats)
        result["step_at_batch_size"] = {
            str(b): step_benchmark(dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=b)),
                                   device, amp, args.step_batches, args.warmup_batches, args.repeats)
            for b in args.step_batch_sizes if b != config.data.batch_size}
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the GPU memory back before Ray's workers take the same GPU
    if args.ray:
        result["ray"] = ray_benchmark(config, args.workers, args.repeats, args.out)
    result["machine"] = machine_info(load_before)
    result["targets"] = targets(result)
    (args.out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "train.png")
    log.info("targets: %s", json.dumps(result["targets"]))
    log.info("wrote %s and %s", args.out / "train.json", args.out / "train.png")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
