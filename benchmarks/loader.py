"""Loader throughput: samples/s of the shard loaders against decoding the raw mp4s, in one run.

Configurations, each in training mode (random crop + flip) with missing-modality augmentation
`DropSpec("independent", {"visual": p, "audio": p})` at p = 0 and p = --drop (default 0.3):

- `dali_cpu`: the DALI pipeline on the CPU (`device_id=None`), `--workers` threads;
- `dali_gpu` (with `--device gpu`): the same pipeline with nvJPEG (`mixed`) and the GPU spectrogram;
- `torch`: the torch loader over the same shards, DataLoader with `--workers` worker processes;
- `raw`: what users do without shards: DataLoader workers decode each sample from the source mp4
  (decord frames + PyAV audio through `pipeline.decode.decode_clip`), then random-resized-crop, flip
  and normalise the frames and compute the log-mel with `shards.features.log_mel`. Like the usual
  modality-dropout code, it decodes everything and then zeroes what the mask drops.

Without `--src` a Kinetics-shaped corpus is generated offline with ffmpeg (10 s clips, 340x256 H.264
at 30 fps, 44.1 kHz stereo AAC, Kinetics-400 layout) and built into shards once (reused by later runs).
Each configuration runs one warm-up epoch, then `--repeats` timed epochs (worker start-up included,
as in training); the median epoch gives samples/s. Writes `loader.json` and `loader.png` in --out.

    python benchmarks/loader.py --n-clips 64 --batch-size 16 --repeats 3            # CPU machine
    python benchmarks/loader.py --device gpu --n-clips 512 --batch-size 64          # GPU machine
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.build import BuildOptions, build_shards
from pipeline.decode import decode_clip
from shards.features import AudioParams, VisualParams, log_mel, mel_filters
from shards.format import read_dataset_info
from shards.loader import dali_available, make_loader
from shards.scenarios import DropSpec, augment_keep, resolve_present
from shards.torch_loader import collate

log = logging.getLogger("benchmarks.loader")
SPLIT = "train"
CLIP_SECONDS = 10
CLIP_SIZE = "340x256"


# ----------------------------------------------------------------------------------------------- corpus
def make_kinetics_corpus(root: Path, n_clips: int, workers: int) -> Path:
    """A Kinetics-400-layout corpus of `n_clips` 10 s clips (H.264 340x256 30 fps, AAC 44.1 kHz stereo)."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is needed to generate the corpus (apt-get install ffmpeg), or pass --src")
    classes = [c.strip() for c in resources.files("pipeline").joinpath("kinetics_sound_classes.txt")
               .read_text().splitlines() if c.strip()]
    rows = []
    jobs = []
    for i in range(n_clips):
        youtube_id = f"bm{i:05d}Kx-"  # 11 characters, like a YouTube id
        path = root / SPLIT / f"{youtube_id}_000000_{CLIP_SECONDS:06d}.mp4"
        rows.append({"label": classes[i % len(classes)], "youtube_id": youtube_id, "time_start": 0,
                     "time_end": CLIP_SECONDS, "split": SPLIT})
        if not path.is_file():
            jobs.append((path, i))
    (root / SPLIT).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda job: _ffmpeg_kinetics_clip(*job), jobs))
    if jobs:
        log.info("generated %d clips in %.1f s", len(jobs), time.perf_counter() - started)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"{SPLIT}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _ffmpeg_kinetics_clip(path: Path, i: int) -> None:
    """One clip: moving test pattern with temporal noise (realistic bitrate), two-tone noisy stereo audio.

    libx264 with its defaults (preset medium, keyframe every 250 frames), as the common Kinetics download
    scripts re-encode with `ffmpeg -c:v libx264` and no further options."""
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    f1, f2 = 220 + 37 * (i % 20), 330 + 53 * (i % 13)
    audio = (f"aevalsrc=exprs=0.3*sin(2*PI*{f1}*t)+0.05*(random(0)-0.5)|0.3*sin(2*PI*{f2}*t)+0.05*(random(1)-0.5)"
             f":s=44100:d={CLIP_SECONDS}")
    cmd = ["ffmpeg", "-v", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={CLIP_SIZE}:rate=30:duration={CLIP_SECONDS}",
           "-f", "lavfi", "-i", audio,
           "-vf", "noise=alls=12:allf=t", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-b:a", "128k", "-ac", "2", "-ar", "44100",
           "-threads", "1", "-shortest", str(tmp)]
    subprocess.run(cmd, check=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- raw baseline
class RawClips(Dataset):
    """Decode each sample from its source mp4 (the pre-shard baseline); same tensors as the loaders."""

    def __init__(self, src: Path, rows: list[dict], modalities: list[str], frames: int, fps: float,
                 visual: VisualParams, audio: AudioParams, spec: DropSpec, seed: int) -> None:
        self.src, self.rows, self.modalities = src, rows, modalities
        self.frames, self.fps, self.visual, self.audio = frames, fps, visual, audio
        self.spec, self.seed, self.epoch = spec, seed, 0
        self.filters = torch.from_numpy(mel_filters(audio.sample_rate, audio.n_fft, audio.n_mels))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        clip = decode_clip(self.src / row["source"], self.frames, self.fps, self.audio.sample_rate)
        has = np.array([[True, clip.audio is not None]])
        keep = (augment_keep([row["key"]], self.modalities, self.spec, self.seed, self.epoch) if self.spec.active
                else np.ones_like(has))
        present = dict(zip(self.modalities, resolve_present(has, keep, never_all=True)[0]))
        v, a = self.visual, self.audio
        rng = np.random.default_rng([self.seed, self.epoch, i])
        item = {"key": row["key"], "label": int(row["label"]),
                "present": np.array([present[m] for m in self.modalities])}
        item["visual"] = (train_frames(clip.frames, v, rng) if present["visual"]
                          else np.zeros((v.frames, 3, v.crop, v.crop), np.float32))
        item["audio"] = (log_mel(clip.audio.astype(np.float32) / 32768.0, a, self.filters).numpy() if present["audio"]
                         else np.zeros((1, a.n_mels, a.n_frames), np.float32))
        return item


def train_frames(frames: list[np.ndarray], p: VisualParams, rng: np.random.Generator) -> np.ndarray:
    """[T, 3, crop, crop]: one random resized crop (35-100% area, 3/4..4/3) and flip for all frames."""
    h, w = frames[0].shape[:2]
    box = (0.0, 0.0, float(w), float(h))
    for _ in range(10):
        area = w * h * rng.uniform(0.35, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = np.sqrt(area * ratio), np.sqrt(area / ratio)
        if cw <= w and ch <= h:
            x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            box = (x, y, x + cw, y + ch)
            break
    clip = np.stack([np.asarray(Image.fromarray(f).resize((p.crop, p.crop), Image.BILINEAR, box=box), np.float32)
                     for f in frames])
    if rng.random() < 0.5:
        clip = clip[:, :, ::-1]
    clip = (clip - 255.0 * np.array(p.mean, np.float32)) / (255.0 * np.array(p.std, np.float32))
    return np.ascontiguousarray(clip.transpose(0, 3, 1, 2))


class RawLoader:
    """Epochs of a shuffled DataLoader over `RawClips` (training: the short last batch is dropped)."""

    def __init__(self, dataset: RawClips, batch_size: int, workers: int, seed: int) -> None:
        self.dataset, self.batch_size, self.workers, self.seed = dataset, batch_size, workers, seed

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.workers,
                            generator=torch.Generator().manual_seed(self.seed + self.dataset.epoch),
                            collate_fn=collate, drop_last=True, prefetch_factor=4 if self.workers else None)
        for batch in loader:
            batch.pop("skipped", None)
            yield batch
        self.dataset.epoch += 1


# ----------------------------------------------------------------------------------------------- timing
def cpu_seconds() -> float:
    """CPU time of this process (DALI threads included) and of its reaped children (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(loader: Iterable[dict], repeats: int, warmup: int = 1) -> dict:
    """Warm-up epochs, then `repeats` timed epochs; samples/s of the median epoch, start-up included.

    Also, per epoch, the time to the first batch (worker start-up, pipeline build, first decode) and the
    steady rate after it ((samples - first batch) / (epoch - time to first batch)): with the few hundred
    samples of a benchmark epoch start-up weighs far more than in a real epoch of thousands. And CPU-seconds
    per sample (median), which other load on a shared machine disturbs less than wall time; DataLoader
    workers count once they exit at the end of each epoch."""
    for _ in range(warmup):
        for _batch in loader:
            pass
    seconds, cpu, counts, firsts, steady = [], [], [], [], []
    for _ in range(repeats):
        n, first, first_n = 0, None, 0
        started, cpu_started = time.perf_counter(), cpu_seconds()
        for batch in loader:
            if first is None:
                first, first_n = time.perf_counter() - started, len(batch["key"])
            n += len(batch["key"])
        seconds.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - cpu_started)
        counts.append(n)
        firsts.append(first or 0.0)
        if n > first_n and seconds[-1] > firsts[-1]:
            steady.append((n - first_n) / (seconds[-1] - firsts[-1]))
    rates = [n / s for n, s in zip(counts, seconds)]
    return {"samples_per_s": round(statistics.median(rates), 2), "runs_samples_per_s": [round(r, 2) for r in rates],
            "epoch_seconds": [round(s, 3) for s in seconds], "samples_per_epoch": counts[0],
            "first_batch_s": round(statistics.median(firsts), 3),
            "steady_samples_per_s": round(statistics.median(steady), 2) if steady else None,
            "cpu_ms_per_sample": round(1000 * statistics.median(c / n for c, n in zip(cpu, counts)), 2)}


# ----------------------------------------------------------------------------------------------- machine
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    elif shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True)
        gpu = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    dali = None
    if dali_available():
        import nvidia.dali

        dali = nvidia.dali.__version__
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": gpu, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "dali": dali,
            "load_average_1min_after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------------------------- plot
def plot(results: dict, path: Path) -> None:
    """Bars per loader and drop probability: samples/s (log scale) and CPU-ms per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    loaders = [name for name in ("raw", "torch", "dali_cpu", "dali_gpu") if f"{name}_p0" in results["configs"]]
    drops = results["params"]["drops"]
    fig, axes = plt.subplots(1, 2, figsize=(3.0 + 3.2 * len(loaders), 4.2))
    width = 0.8 / len(drops)
    for ax, metric, label in ((axes[0], "samples_per_s", "samples / s (log scale; higher is better)"),
                              (axes[1], "cpu_ms_per_sample", "CPU-ms per sample (lower is better)")):
        for j, p in enumerate(drops):
            values = [results["configs"][f"{name}_p{p:g}"][metric] for name in loaders]
            xs = [i + (j - (len(drops) - 1) / 2) * width for i in range(len(loaders))]
            bars = ax.bar(xs, values, width, label=f"drop p={p:g}")
            for bar, v in zip(bars, values):
                ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(loaders)), loaders)
        ax.set_ylabel(label, fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    m, prm = results["machine"], results["params"]
    fig.suptitle(f"loader throughput: {prm['samples']} samples, batch {prm['batch_size']}, crop {prm['crop']}, "
                 f"{prm['n_mels']} mels, training augmentation\n{m['cpu'][:48]}, {m['cores']} cores"
                 + (f", {m['gpu']}" if m["gpu"] else "") + f" (load {m['load_average_1min_before']} at start)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path,
                        help="raw kinetics_sound corpus (Kinetics-400 layout); default: generate one")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader"))
    parser.add_argument("--n-clips", type=int, default=64, help="clips to generate when --src is not given")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (median)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: also the DALI pipeline with nvJPEG and the GPU spectrogram")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--n-mels", type=int, default=128)
    parser.add_argument("--drop", type=float, default=0.3, help="drop probability per modality (besides 0)")
    parser.add_argument("--workers", type=int, default=cores, help="DataLoader workers / DALI threads")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=("raw", "torch", "dali_cpu", "dali_gpu"),
                        help="run only these loaders (ratios then cover what ran)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("shards").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.src or make_kinetics_corpus(args.out / "raw" / "kinetics400", args.n_clips, args.workers)
    opts = BuildOptions(n_mels=args.n_mels, shard_size=args.shard_size)
    shards_root = args.out / f"shards_mels{args.n_mels}_ss{args.shard_size}"
    started = time.perf_counter()
    build_shards("kinetics_sound", src, shards_root, opts, workers=args.workers, progress=False)
    build_s = time.perf_counter() - started
    dataset = shards_root / "kinetics_sound"
    info = read_dataset_info(dataset)
    n = info.splits[SPLIT]["samples"]
    if n < args.batch_size:
        raise SystemExit(f"{n} samples is fewer than one batch of {args.batch_size}; lower --batch-size")
    log.info("%d samples in %s (build/resume %.1f s); %d workers, batch %d", n, dataset, build_s, args.workers,
             args.batch_size)

    loaders = args.only or ["raw", "torch"] + (["dali_cpu"] if dali_available() else []) + \
        (["dali_gpu"] if args.device == "gpu" else [])
    if ("dali_cpu" in loaders or "dali_gpu" in loaders) and not dali_available():
        raise SystemExit("DALI is not installed; run with --only raw torch")
    drops = [0.0, args.drop]
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    configs: dict[str, dict] = {}
    manifest = pq.read_table(dataset / "manifest.parquet", columns=["key", "split", "label", "source"]).to_pylist()
    rows = [r for r in manifest if r["split"] == SPLIT]
    visual = VisualParams.from_info(info.visual, args.crop)
    audio = AudioParams.from_info(info.audio)
    # Forking DataLoader workers after DALI has started its threads is avoided: raw and torch run first.
    for name in loaders:
        for p in drops:
            spec = DropSpec("independent", {"visual": p, "audio": p})
            if name == "raw":
                loader = RawLoader(RawClips(Path(src), rows, list(info.modalities), info.visual["frames"],
                                            info.visual["fps"], visual, audio, spec, args.seed),
                                   args.batch_size, args.workers, args.seed)
            else:
                backend, device = ("torch", "cpu") if name == "torch" else ("dali", name.split("_")[1])
                loader = make_loader(dataset, SPLIT, args.batch_size, backend=backend, device=device, train=True,
                                     augment=spec, seed=args.seed, crop=args.crop, num_workers=args.workers,
                                     device_id=0 if device == "gpu" else None)
            result = measure(loader, args.repeats)
            configs[f"{name}_p{p:g}"] = {"loader": name, "drop": p, **result}
            log.info("%-9s p=%-4g %8.1f samples/s (%.1f after a first batch in %.2f s)  %7.1f CPU-ms/sample  "
                     "(epochs: %s s)", name, p, result["samples_per_s"], result["steady_samples_per_s"] or 0.0,
                     result["first_batch_s"], result["cpu_ms_per_sample"], result["epoch_seconds"])
            del loader
            gc.collect()

    results = {
        "benchmark": "loader",
        "machine": {**machine_info(), "load_average_1min_before": load_before},  # other load skews timings
        "params": {"samples": n, "batch_size": args.batch_size, "repeats": args.repeats, "workers": args.workers,
                   "crop": args.crop, "n_mels": args.n_mels, "frames": info.visual["frames"],
                   "audio_seconds": info.audio["seconds"], "stored_short_side": info.visual["short_side"],
                   "drops": drops, "augment": "DropSpec('independent', {'visual': p, 'audio': p})", "train": True,
                   "src": str(src), "generated": args.src is None,
                   "clip": None if args.src else f"{CLIP_SECONDS} s {CLIP_SIZE} H.264 30 fps, AAC 44.1 kHz stereo"},
        "dataset": {"path": str(dataset), "shards": len(info.shards), "shard_bytes": sum(s.bytes for s in info.shards),
                    "raw_bytes": sum((Path(src) / r["source"]).stat().st_size for r in rows)},
        "configs": configs,
        "ratios": ratios(configs, drops),
    }
    results["targets"] = targets(results["ratios"], drops)
    (args.out / "loader.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "loader.png")
    log.info("ratios: %s", json.dumps(results["ratios"]))
    log.info("targets: %s", json.dumps(results["targets"]))
    log.info("wrote %s and %s", args.out / "loader.json", args.out / "loader.png")
    return results


def ratios(configs: dict[str, dict], drops: list[float]) -> dict:
    """shards/raw and dali/torch per drop probability; p=drop over p=0 per loader."""
    rate = {k: v["samples_per_s"] for k, v in configs.items()}
    cpu = {k: v["cpu_ms_per_sample"] for k, v in configs.items()}
    steady = {k: v.get("steady_samples_per_s") for k, v in configs.items()}
    out: dict[str, dict] = {"shards_over_raw": {}, "shards_over_raw_steady": {}, "dali_over_torch": {},
                            "drop_over_no_drop": {}, "raw_cpu_over_shards_cpu": {}}
    for p in drops:
        tag = f"p{p:g}"
        for key, values in (("shards_over_raw", rate), ("shards_over_raw_steady", steady)):
            raw = values.get(f"raw_{tag}")
            shards = {name: values[f"{name}_{tag}"] for name in ("torch", "dali_cpu", "dali_gpu")
                      if values.get(f"{name}_{tag}")}
            if raw and shards:
                out[key][tag] = {**{k: round(v / raw, 2) for k, v in shards.items()},
                                 "best": round(max(shards.values()) / raw, 2)}
        if f"raw_{tag}" in cpu:  # CPU time per sample: the same comparison, less sensitive to other load
            out["raw_cpu_over_shards_cpu"][tag] = {name: round(cpu[f"raw_{tag}"] / cpu[f"{name}_{tag}"], 2)
                                                   for name in ("torch", "dali_cpu") if cpu.get(f"{name}_{tag}")}
        if f"dali_cpu_{tag}" in rate and f"torch_{tag}" in rate:
            out["dali_over_torch"][tag] = round(rate[f"dali_cpu_{tag}"] / rate[f"torch_{tag}"], 2)
    for name in ("raw", "torch", "dali_cpu", "dali_gpu"):
        if f"{name}_p0" in rate and f"{name}_p{drops[-1]:g}" in rate:
            out["drop_over_no_drop"][name] = round(rate[f"{name}_p{drops[-1]:g}"] / rate[f"{name}_p0"], 2)
    return out


def targets(r: dict, drops: list[float]) -> dict:
    """The goals of this benchmark, as met / not met (absent where a configuration did not run)."""
    out = {}
    if r["shards_over_raw"]:
        out["shards_over_raw >= 20 (best shard loader, every p)"] = all(
            v["best"] >= 20 for v in r["shards_over_raw"].values())
    if r["dali_over_torch"]:
        out["dali_cpu >= torch (every p)"] = all(v >= 1.0 for v in r["dali_over_torch"].values())
    if "dali_cpu" in r["drop_over_no_drop"]:
        out[f"dali_cpu p={drops[-1]:g} >= 1.2x p=0"] = r["drop_over_no_drop"]["dali_cpu"] >= 1.2
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
