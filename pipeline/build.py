"""`pipeline build-shards`: raw corpus -> tar shards, manifest, rejects and dataset.json.

The plan is fixed before any decoding: per split, samples sorted by key and cut into shards of
`shard_size`. Each shard is one independent task (a local process or a Ray task) that decodes,
encodes, validates and writes its tar, its index and a small part file (its manifest rows, rejects and
checksum) last. A shard whose part file exists is done, so a rerun after a crash finishes only the
missing shards, and the output does not depend on the number of workers."""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.datasets import ADAPTERS, Corpus, Reject, Sample, SourceError
from pipeline.decode import DecodeError, decode_clip
from pipeline.encode import encode_audio, encode_frame
from shards.format import FORMAT_VERSION, DatasetInfo, ShardInfo, encode_npy, frame_member
from shards.writer import ShardWriter, atomic_write_bytes, write_shard

log = logging.getLogger(__name__)
PARTS_DIR = ".build"


@dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the bytes of the output; recorded in dataset.json."""

    frames: int = 3
    fps: float = 1.0
    size: int = 256  # short side of stored frames (never upscaled)
    jpeg_quality: int = 90
    sample_rate: int = 16000
    audio_codec: str = "wav"
    shard_size: int = 256
    n_mels: int = 128  # log-mel parameters the loaders use, recorded for them
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160

    def check(self) -> None:
        if self.audio_codec not in ("wav", "flac"):
            raise SourceError(f"--audio-codec {self.audio_codec!r}: use wav or flac")
        for name in ("frames", "size", "sample_rate", "shard_size", "n_mels", "n_fft", "hop_length"):
            if getattr(self, name) <= 0:
                raise SourceError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.fps <= 0:
            raise SourceError(f"--fps must be positive, got {self.fps}")


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    samples: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return f"{self.split}/{self.index:06d}.tar"


def plan_shards(samples: list[Sample], shard_size: int) -> list[ShardTask]:
    """Per split, samples in key order cut into consecutive shards."""
    tasks = []
    for split in sorted({s.split for s in samples}):
        members = sorted((s for s in samples if s.split == split), key=lambda s: s.key)
        for i in range(0, len(members), shard_size):
            tasks.append(ShardTask(split, i // shard_size, tuple(members[i:i + shard_size])))
    return tasks


def encode_sample(sample: Sample, src: Path, opts: BuildOptions) -> tuple[dict[str, bytes], dict, Reject | None]:
    """Decode one clip and encode its members; returns (members, manifest row, partial reject)."""
    clip = decode_clip(src / sample.source, opts.frames, opts.fps, opts.sample_rate)
    has_audio = clip.audio is not None
    meta = {"key": sample.key, "split": sample.split, "label": sample.label, "source": sample.source,
            "duration": round(clip.duration, 3), "has_visual": True, "has_audio": has_audio}
    members: dict[str, bytes] = {
        "json": json.dumps(meta, sort_keys=True).encode(),
        "cls": str(sample.label).encode(),
        "label.npy": encode_npy(np.array([sample.label], dtype=np.int64)),
    }
    for i, frame in enumerate(clip.frames):
        members[frame_member(i)] = encode_frame(frame, opts.size, opts.jpeg_quality)
    if has_audio:
        members[opts.audio_codec] = encode_audio(clip.audio, opts.sample_rate, opts.audio_codec)
    row = dict(meta, audio_seconds=round(len(clip.audio) / opts.sample_rate, 3) if has_audio else 0.0)
    partial = None
    if clip.audio_note:
        partial = Reject(sample.key, sample.split, sample.source, "audio", clip.audio_note, kept=True)
    return members, row, partial


def run_shard_task(task: ShardTask, src: str, out: str, opts: BuildOptions) -> dict:
    """Build one shard (tar + idx + part file). Runs in a worker process or as a Ray task."""
    src_path, out_path = Path(src), Path(out)
    writer = ShardWriter()
    rows, rejects = [], []
    for sample in task.samples:
        try:
            members, row, partial = encode_sample(sample, src_path, opts)
        except DecodeError as exc:  # reasons name the source relative to --src, so rejects do not depend on it
            reason = exc.reason.replace(str(src_path / sample.source), sample.source)
            rejects.append(asdict(Reject(sample.key, sample.split, sample.source, exc.stage, reason)))
            continue
        writer.add(sample.key, members)
        rows.append(dict(row, shard=task.name))
        if partial:
            rejects.append(asdict(partial))
    part = {"shard": task.name, "split": task.split, "rows": rows, "rejects": rejects, "samples": len(writer)}
    if len(writer):
        tar_path = out_path / task.name
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        part["sha256"], part["bytes"] = write_shard(tar_path, writer)
    atomic_write_bytes(_part_path(out_path, task), json.dumps(part, sort_keys=True).encode())
    return part


def _part_path(out: Path, task: ShardTask) -> Path:
    return out / PARTS_DIR / f"{task.split}-{task.index:06d}.json"


def _read_done(out: Path, task: ShardTask) -> dict | None:
    """The part file of a finished shard, or None when the shard must be (re)built."""
    path = _part_path(out, task)
    if not path.is_file():
        return None
    part = json.loads(path.read_text())
    if part["samples"] and not ((out / task.name).is_file() and (out / task.name).with_suffix(".idx").is_file()):
        return None
    return part


def _run_local(todo: list[ShardTask], src: Path, out: Path, opts: BuildOptions, workers: int) -> Iterator[dict]:
    if workers <= 1:
        for task in todo:
            yield run_shard_task(task, str(src), str(out), opts)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(run_shard_task, t, str(src), str(out), opts) for t in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def _run_ray(todo: list[ShardTask], src: Path, out: Path, opts: BuildOptions, address: str | None) -> Iterator[dict]:
    import ray

    ray.init(address=address or None, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_shard_task)
    pending = [remote.remote(t, str(src), str(out), opts) for t in todo]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def prepare_out(out_root: Path, dataset: str) -> Path:
    """Create OUT/<dataset>, or explain why it cannot be written."""
    out = out_root / dataset
    try:
        (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / PARTS_DIR / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SourceError(f"--out {out_root} is not writable ({exc.strerror}); pass a directory you can write to") from exc
    return out


def _check_params(out: Path, dataset: str, src: Path, opts: BuildOptions) -> None:
    """A resumed build must use the options of the interrupted one, or shards would mix."""
    params = {"dataset": dataset, "src": str(src.resolve()), "options": asdict(opts), "format_version": FORMAT_VERSION}
    path = out / PARTS_DIR / "params.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != params:
            changed = sorted(k for k in before["options"] if before["options"].get(k) != params["options"].get(k))
            raise SourceError(
                f"{out} holds a build with other parameters ({', '.join(changed) or 'source'} differ); "
                f"pass a new --out or delete {out} to rebuild")
    else:
        atomic_write_bytes(path, json.dumps(params, indent=2, sort_keys=True).encode())


def build_shards(dataset: str, src: Path, out_root: Path, opts: BuildOptions, workers: int | None = None,
                 ray_address: str | None = None, use_ray: bool = False, progress: bool = True,
                 classes_file: Path | None = None) -> DatasetInfo:
    """Build (or finish building) OUT/<dataset>; returns what dataset.json records."""
    if dataset not in ADAPTERS:
        raise SourceError(f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(ADAPTERS))}")
    opts.check()
    kwargs = {"classes_file": classes_file} if classes_file and dataset == "kinetics_sound" else {}
    corpus: Corpus = ADAPTERS[dataset](src, **kwargs)
    if not corpus.samples:
        raise SourceError(f"{src}: the {dataset} adapter found no usable samples "
                          f"({len(corpus.rejects)} rejected); check --src")
    out = prepare_out(out_root, dataset)
    _check_params(out, dataset, src, opts)
    tasks = plan_shards(corpus.samples, opts.shard_size)
    parts = {t.name: p for t in tasks if (p := _read_done(out, t)) is not None}
    todo = [t for t in tasks if t.name not in parts]
    log.info("%s: %d samples in %d shards (%d already built), %d rejected by the adapter",
             dataset, len(corpus.samples), len(tasks), len(parts), len(corpus.rejects))
    workers = workers or os.cpu_count() or 1
    runner = _run_ray(todo, src, out, opts, ray_address) if use_ray else _run_local(todo, src, out, opts, workers)
    started = time.perf_counter()
    bar = tqdm(total=sum(len(t.samples) for t in todo), unit="clip", desc=f"build {dataset}", disable=not progress)
    for part in runner:
        parts[part["shard"]] = part
        bar.update(len(part["rows"]) + sum(not r["kept"] for r in part["rejects"]))
    bar.close()
    elapsed = time.perf_counter() - started
    info = _finish(out, dataset, corpus, tasks, parts, opts, src)
    n_new = sum(len(t.samples) for t in todo)
    log.info("built %d clips in %.1f s (%.1f clips/s); %d samples, %d rejects -> %s",
             n_new, elapsed, n_new / elapsed if elapsed > 0 else 0.0,
             sum(info.splits[s]["samples"] for s in info.splits), sum(info.splits[s]["rejected"] for s in info.splits), out)
    return info


def _finish(out: Path, dataset: str, corpus: Corpus, tasks: list[ShardTask], parts: dict[str, dict],
            opts: BuildOptions, src: Path) -> DatasetInfo:
    """Merge the part files into manifest.parquet, rejects.parquet and dataset.json (atomically)."""
    rows = sorted((r for t in tasks for r in parts[t.name]["rows"]), key=lambda r: (r["split"], r["key"]))
    rejects = [asdict(r) for r in corpus.rejects] + [r for t in tasks for r in parts[t.name]["rejects"]]
    rejects.sort(key=lambda r: (r["split"], r["key"], r["stage"]))
    manifest = pa.table({
        "key": [r["key"] for r in rows],
        "split": [r["split"] for r in rows],
        "shard": [r["shard"] for r in rows],
        "label": pa.array([r["label"] for r in rows], pa.int64()),
        "label_name": [corpus.classes[r["label"]] for r in rows],
        "has_visual": [r["has_visual"] for r in rows],
        "has_audio": [r["has_audio"] for r in rows],
        "duration": pa.array([r["duration"] for r in rows], pa.float64()),
        "audio_seconds": pa.array([r["audio_seconds"] for r in rows], pa.float64()),
        "source": [r["source"] for r in rows],
    })
    reject_table = pa.table({
        "key": pa.array([r["key"] for r in rejects], pa.string()),
        "split": pa.array([r["split"] for r in rejects], pa.string()),
        "source": pa.array([r["source"] for r in rejects], pa.string()),
        "stage": pa.array([r["stage"] for r in rejects], pa.string()),
        "reason": pa.array([r["reason"] for r in rejects], pa.string()),
        "kept": pa.array([r["kept"] for r in rejects], pa.bool_()),
    })
    _write_parquet(out / "manifest.parquet", manifest)
    _write_parquet(out / "rejects.parquet", reject_table)
    splits = {}
    for split in sorted({t.split for t in tasks}):
        split_rows = [r for r in rows if r["split"] == split]
        splits[split] = {
            "samples": len(split_rows),
            "rejected": sum(1 for r in rejects if r["split"] == split and not r["kept"]),
            "has_visual": sum(r["has_visual"] for r in split_rows),
            "has_audio": sum(r["has_audio"] for r in split_rows),
        }
    shards = [ShardInfo(t.name, t.split, parts[t.name]["samples"], parts[t.name]["sha256"], parts[t.name]["bytes"])
              for t in tasks if parts[t.name]["samples"]]
    seconds = [r["audio_seconds"] for r in rows if r["has_audio"]]
    info = DatasetInfo(
        dataset=dataset, modalities=corpus.modalities, classes=corpus.classes, multilabel=False,
        visual={"frames": opts.frames, "fps": opts.fps, "short_side": opts.size, "format": "jpeg",
                "jpeg_quality": opts.jpeg_quality, "crop": min(224, opts.size),
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        audio={"sample_rate": opts.sample_rate, "codec": opts.audio_codec, "channels": 1,
               "seconds": round(median(seconds), 1) if seconds else 0.0, "n_mels": opts.n_mels,
               "n_fft": opts.n_fft, "win_length": opts.win_length, "hop_length": opts.hop_length,
               "db_cutoff": 80.0},
        splits=splits, shards=shards,
        build={"src": src.name, "options": asdict(opts), "adapter_rejects": len(corpus.rejects)},
    )
    atomic_write_bytes(out / "dataset.json", info.to_json().encode())
    return info


def _write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
