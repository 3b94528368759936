"""`pipeline build-shards`: raw corpus -> tar shards, manifest, rejects and dataset.json.

The plan is fixed before any decoding: per split, samples sorted by key and cut into shards of
`shard_size`. Each shard is one independent task (a local process or a Ray task) that decodes,
encodes, validates and writes its tar, its index and a small part file (its manifest rows, rejects and
checksum) last. The part file records a digest of what the shard was built from (its samples with labels,
sources and their sizes and mtimes, the label shape and the tokenizer), so a rerun finishes only the
missing shards after a crash, rebuilds exactly the shards whose inputs changed after the annotations or
files were edited, and removes the shards the new plan no longer has; the output does not depend on the
number of workers. Every output path is checked, links resolved, to lie inside --out.

Workers ignore Ctrl-C (the parent stops them) and die with their parent (PR_SET_PDEATHSIG on Linux), so
neither a Ctrl-C nor a SIGKILL of the build leaves processes behind."""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.adapters import SPLITS, Corpus, Reject, Sample, adapters
from pipeline.decode import DecodeError
from pipeline.merge import merge_parts, reject_table, write_parquet
from pipeline.options import BuildContext, BuildOptions, SourceError
from pipeline.text import prepare_tokenizer
from shards.format import FORMAT_VERSION, DatasetInfo
from shards.masks import key_uniform
from shards.writer import ShardWriter, atomic_write_bytes, write_shard

log = logging.getLogger(__name__)
PARTS_DIR = ".build"
SHARD_FILE = re.compile(r"\d{6}\.(tar|idx)")
PART_FILE = re.compile(r"[a-z]+-\d{6}\.json")
TEMP_FILE = re.compile(r"\..+\.tmp-\d+")


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C during a build; the message says what was finished and that a rerun resumes."""


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    samples: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return f"{self.split}/{self.index:06d}.tar"


def plan_shards(samples: list[Sample], shard_size: int, seed: int = 0) -> list[ShardTask]:
    """Per split, samples ordered by a seeded hash of the key, then cut into consecutive shards: every
    shard mixes classes even when keys sort by class (Food-101's `train_<class>_<n>`), which a reader that
    shuffles only inside a buffer (DALI) needs; still deterministic and independent of the worker count."""
    tasks = []
    for split in sorted({s.split for s in samples}):
        if split not in SPLITS:  # adapters reject these; a split name must never become a path
            raise SourceError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        members = sorted((s for s in samples if s.split == split),
                         key=lambda s: (key_uniform(s.key, seed, "shard-order"), s.key))
        for i in range(0, len(members), shard_size):
            tasks.append(ShardTask(split, i // shard_size, tuple(members[i:i + shard_size])))
    return tasks


def run_shard_task(task: ShardTask, src: str, out: str, opts: BuildOptions, ctx: BuildContext,
                   inputs: str = "") -> dict:
    """Build one shard (tar + idx + part file). Runs in a worker process or as a Ray task. `inputs` is the
    digest of what the shard is built from (`task_inputs`), recorded in the part file."""
    src_path, out_path = Path(src), Path(out)
    writer = ShardWriter()
    rows, rejects = [], []
    for sample in task.samples:
        try:
            members, row, partial = ctx.encode(sample, src_path, opts, ctx, out_path)
        except DecodeError as exc:  # reasons name the source relative to --src, so rejects do not depend on it
            reason = exc.reason.replace(str(src_path / sample.source), sample.source)
            rejects.append(asdict(Reject(sample.key, sample.split, sample.source, exc.stage, reason)))
            continue
        writer.add(sample.key, members)
        rows.append(dict(row, shard=task.name))
        rejects.extend(asdict(r) for r in partial)
    part = {"shard": task.name, "split": task.split, "rows": rows, "rejects": rejects, "samples": len(writer),
            "inputs": inputs}
    tar_path = output_path(out_path, task.name)
    if len(writer):
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        part["sha256"], part["bytes"] = write_shard(tar_path, writer)
    else:  # every sample rejected: no tar, and none left from an earlier build of other inputs
        tar_path.unlink(missing_ok=True)
        tar_path.with_suffix(".idx").unlink(missing_ok=True)
    atomic_write_bytes(output_path(out_path, _part_rel(task)), json.dumps(part, sort_keys=True).encode())
    return part


def output_path(out: Path, rel: str) -> Path:
    """`out / rel`, refused when it resolves (links followed) outside `out`: data never chooses a path."""
    path = out / rel
    root = out.resolve()
    if not path.resolve().is_relative_to(root) or path.resolve() == root:
        raise SourceError(f"output {rel} resolves to {path.resolve()}, outside --out {out}; "
                          f"remove the link or pass another --out")
    return path


def _part_rel(task: ShardTask) -> str:
    return f"{PARTS_DIR}/{task.split}-{task.index:06d}.json"


def _source_stat(src: Path, rel: str) -> list[int] | None:
    if not rel:
        return None
    try:
        st = os.stat(src / rel)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def task_inputs(task: ShardTask, src: Path, ctx: BuildContext, text_sha256: str = "") -> str:
    """Digest of everything a shard's bytes depend on besides the build options (checked by params.json):
    its samples (key, split, label(s), source, text), each source's size and mtime, the label shape and the
    tokenizer's vocabulary."""
    encode = f"{ctx.encode.__module__}.{ctx.encode.__qualname__}" if ctx.encode else ""
    h = hashlib.sha256(json.dumps([ctx.num_classes, ctx.multilabel, ctx.tokenizer, encode, text_sha256]).encode())
    for sample in task.samples:
        stats = [_source_stat(src, sample.source), _source_stat(src, sample.audio_source)]
        h.update(json.dumps([asdict(sample), stats], sort_keys=True).encode())
    return h.hexdigest()


def _read_done(out: Path, task: ShardTask, inputs: str) -> dict | None:
    """The part file of a finished shard built from the same inputs, or None when it must be (re)built."""
    path = out / _part_rel(task)
    if not path.is_file():
        return None
    try:
        part = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if part.get("inputs") != inputs:
        return None
    if part["samples"] and not ((out / task.name).is_file() and (out / task.name).with_suffix(".idx").is_file()):
        return None
    return part


def remove_stale(out: Path, tasks: list[ShardTask]) -> list[str]:
    """Delete shards, indexes and part files the plan no longer has, and temporaries of killed writers;
    returns the removed paths relative to `out`. Only names the build itself writes are touched."""
    planned = {t.name for t in tasks}
    planned_parts = {_part_rel(t) for t in tasks}
    removed = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink()):
        for path in sorted(folder.iterdir()):
            rel = f"{folder.name}/{path.name}"
            stale_shard = (folder.name != PARTS_DIR and SHARD_FILE.fullmatch(path.name)
                           and f"{folder.name}/{path.stem}.tar" not in planned)
            stale_part = folder.name == PARTS_DIR and PART_FILE.fullmatch(path.name) and rel not in planned_parts
            if (stale_shard or stale_part or TEMP_FILE.fullmatch(path.name)) and path.is_file():
                path.unlink()
                removed.append(rel)
        if folder.name != PARTS_DIR and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _worker_init() -> None:
    """Pool workers: Ctrl-C is the parent's to handle, and a worker dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() == 1:  # the parent died before the death signal was armed
        os._exit(1)


def _run_task(args: tuple) -> dict:
    return run_shard_task(*args)


def _run_local(todo: list[ShardTask], src: Path, out: Path, opts: BuildOptions, ctx: BuildContext,
               workers: int, inputs: dict[str, str]) -> Iterator[dict]:
    jobs = [(t, str(src), str(out), opts, ctx, inputs[t.name]) for t in todo]
    if workers <= 1:
        for job in jobs:
            yield _run_task(job)
        return
    # Pool.__exit__ terminates the workers, so an error or Ctrl-C in the parent stops them at once. Forking is
    # cheap, but not safe once torch has started its OpenMP threads in this process (a forked child's first
    # torch op can then wait forever, e.g. the log-mel of --audio-features logmel): spawn fresh workers then.
    method = "spawn" if "torch" in sys.modules else "fork"
    with multiprocessing.get_context(method).Pool(min(workers, len(jobs)) or 1, initializer=_worker_init) as pool:
        yield from pool.imap_unordered(_run_task, jobs)


def _run_ray(todo: list[ShardTask], src: Path, out: Path, opts: BuildOptions, ctx: BuildContext,
             address: str | None, inputs: dict[str, str]) -> Iterator[dict]:
    import ray

    started = not ray.is_initialized()
    # an explicit address or RAY_ADDRESS joins that cluster; otherwise a private local instance
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", ignore_reinit_error=True,
             log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_shard_task)
        pending = [remote.remote(t, str(src), str(out), opts, ctx, inputs[t.name]) for t in todo]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()


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
            options = set(before["options"]) | set(params["options"])
            changed = sorted(k for k in options if before["options"].get(k) != params["options"].get(k))
            changed += [k for k in ("dataset", "src", "format_version") if before.get(k) != params.get(k)]
            raise SourceError(
                f"{out} holds a build with other parameters ({', '.join(changed)} differ); "
                f"pass a new --out or delete {out} to rebuild")
    else:
        atomic_write_bytes(path, json.dumps(params, indent=2, sort_keys=True).encode())


def build_shards(dataset: str, src: Path, out_root: Path, opts: BuildOptions, workers: int | None = None,
                 ray_address: str | None = None, use_ray: bool = False, progress: bool = True,
                 adapter_options: dict[str, Any] | None = None) -> DatasetInfo:
    """Build (or finish building) OUT/<dataset>; returns what dataset.json records. `adapter_options` are
    keyword arguments of the dataset's adapter (e.g. kinetics_sound's `classes_file`, `split_lists`)."""
    known = adapters()
    if dataset not in known:
        raise SourceError(f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(known))}")
    opts.check()
    kwargs = {k: v for k, v in (adapter_options or {}).items() if v is not None}
    corpus: Corpus = known[dataset](src, **kwargs)
    _log_adapter_notes(corpus)
    if not corpus.samples:
        out = prepare_out(out_root, dataset)
        rejects = [asdict(r) for r in corpus.rejects]
        write_parquet(out / "rejects.parquet", reject_table(rejects))
        raise SourceError(f"{src}: the {dataset} adapter found no usable samples ({len(rejects)} rejected, "
                          f"listed in {out / 'rejects.parquet'}){reject_summary(rejects, indent=chr(10) + '  ')}")
    out = prepare_out(out_root, dataset)
    _check_params(out, dataset, src, opts)
    text_info = {}
    if "text" in corpus.modalities:  # the vocabulary comes from the train split, before any shard
        try:
            text_info = prepare_tokenizer(out, (s.text for s in corpus.samples if s.split == "train" and s.text),
                                          opts.max_len, opts.vocab_size, opts.tokenizer)
        except ValueError as exc:
            raise SourceError(str(exc)) from exc
    ctx = BuildContext(len(corpus.classes), corpus.multilabel, text_info.get("tokenizer", ""), corpus.kind.encode)
    tasks = plan_shards(corpus.samples, opts.shard_size, opts.order_seed)
    for task in tasks:  # refuse before any work when a split folder is a link out of --out
        output_path(out, task.name), output_path(out, _part_rel(task))
    inputs = {t.name: task_inputs(t, src, ctx, text_info.get("sha256", "")) for t in tasks}
    parts = {t.name: p for t in tasks if (p := _read_done(out, t, inputs[t.name])) is not None}
    todo = [t for t in tasks if t.name not in parts]
    stale = remove_stale(out, tasks)
    if todo or stale:  # the old dataset.json would describe shards that are about to change
        (out / "dataset.json").unlink(missing_ok=True)
    changed = sum(1 for t in todo if (out / _part_rel(t)).is_file())
    log.info("%s: %d samples in %d shards (%d already built, %d to rebuild because their inputs changed, "
             "%d stale files removed), %d rejected by the adapter",
             dataset, len(corpus.samples), len(tasks), len(parts), changed, len(stale), len(corpus.rejects))
    workers = workers or os.cpu_count() or 1
    runner = (_run_ray(todo, src, out, opts, ctx, ray_address, inputs) if use_ray
              else _run_local(todo, src, out, opts, ctx, workers, inputs))
    started = time.perf_counter()
    bar = tqdm(total=sum(len(t.samples) for t in todo), unit="clip", desc=f"build {dataset}", disable=not progress)
    finished = 0
    try:
        for part in runner:
            parts[part["shard"]] = part
            finished += 1
            bar.update(len(part["rows"]) + sum(not r["kept"] for r in part["rejects"]))
    except KeyboardInterrupt:
        raise BuildInterrupted(
            f"interrupted: {len(tasks) - len(todo) + finished} of {len(tasks)} shards of {dataset} are finished "
            f"in {out} ({finished} in this run); rerun the same command to resume") from None
    finally:
        runner.close()  # stops the worker pool at once on an error or Ctrl-C
        bar.close()
    elapsed = time.perf_counter() - started
    info = merge_parts(out, corpus, [(t.name, t.split) for t in tasks], parts, opts, src, text_info)
    n_new = sum(len(t.samples) for t in todo)
    n_rejected = sum(info.splits[s]["rejected"] for s in info.splits)
    log.info("built %d clips in %.1f s (%.1f clips/s); %d samples, %d rejects -> %s",
             n_new, elapsed, n_new / elapsed if elapsed > 0 else 0.0,
             sum(info.splits[s]["samples"] for s in info.splits), n_rejected, out)
    if n_rejected:
        rejects = pq.read_table(out / "rejects.parquet").to_pylist()
        log.info("most common reject reasons:%s", reject_summary([r for r in rejects if not r["kept"]]))
    empty = info.build.get("empty_classes", [])
    if empty:
        log.warning("%d of %d classes have no sample in %s (%s%s); check the annotations or the class list",
                    len(empty), len(info.classes), out, ", ".join(map(repr, empty[:5])), ", ..." if len(empty) > 5 else "")
    return info


def reject_summary(rejects: list[dict], top: int = 5, indent: str = "\n  ") -> str:
    """The most common reasons with counts and one example each, e.g. "15 x source path points outside
    --src: images/train/a/a_1.jpg -> /elsewhere/...", plus a hint for the reasons that have one."""
    groups: dict[str, list[dict]] = {}
    for r in rejects:
        groups.setdefault(f"{r['stage']}: {r['reason'].split(': ', 1)[0].split(' (', 1)[0]}", []).append(r)
    lines = []
    for _, rows in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))[:top]:
        first = rows[0]
        where = f" ({first['source']})" if first["source"] and first["source"] not in first["reason"] else ""
        lines.append(f"{len(rows)} x {first['reason']}{where}")
    if any("points outside --src" in r["reason"] for r in rejects):
        lines.append("hint: links under --src must point inside --src; pass the folder that holds the real "
                     "files as --src, or copy them in")
    if any(r["reason"].startswith("unknown split") for r in rejects):
        lines.append(f"hint: splits must be one of {', '.join(SPLITS)} (or the adapter's own names)")
    return "".join(indent + line for line in lines)


def _log_adapter_notes(corpus: Corpus) -> None:
    """Say what the adapter left out or changed without a reject row: other classes, replaced bytes."""
    if corpus.skipped_labels:
        total = sum(corpus.skipped_labels.values())
        common = ", ".join(f"{k!r} x {v}" for k, v in Counter(corpus.skipped_labels).most_common(5))
        log.info("%s: %d annotation rows of %d classes outside the class list left out (%s%s)", corpus.name, total,
                 len(corpus.skipped_labels), common, ", ..." if len(corpus.skipped_labels) > 5 else "")
    for name, n in sorted(corpus.annotation_replaced.items()):
        log.warning("%s: %d invalid UTF-8 sequence(s) replaced by U+FFFD", name, n)
