"""`pipeline verify` and `pipeline inspect`: check a built dataset and summarise it.

Verify checks checksums, indexes against the tars, the manifest's keys, that every member decodes, and
that every frame decodes to the size recorded in the manifest (`frame_height`, `frame_width`)."""
from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from shards.format import DatasetInfo, FormatError, read_dataset_info, read_index
from shards.members import check_member
from shards.sample_refs import FrameSizeError, recorded_frame_sizes
from shards.writer import sha256_file


def _tar_index(tar_path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Index of a tar computed from its headers, in the shape `read_index` returns."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = (member.offset_data, member.size)
    return samples


def verify_dataset(dataset_dir: Path, decode: bool = True, progress: bool = True) -> list[str]:
    """All problems found, each naming the shard (and key, member); empty when the dataset is sound. With
    `decode`, every member is decoded and every frame's size checked against the one recorded in the manifest."""
    info = read_dataset_info(dataset_dir)
    problems: list[str] = []
    manifest_path = dataset_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise FormatError(f"{manifest_path} not found; rebuild with `pipeline build-shards`")
    manifest = pq.read_table(manifest_path, columns=["key", "shard"]).to_pylist()
    by_shard: dict[str, list[str]] = {}
    for row in manifest:
        by_shard.setdefault(row["shard"], []).append(row["key"])
    frame_sizes = recorded_frame_sizes(dataset_dir) if decode else {}
    listed = {s.path for s in info.shards}
    for shard in sorted(set(by_shard) - listed):
        problems.append(f"{shard}: in manifest.parquet but not in dataset.json")
    for shard in tqdm(info.shards, desc="verify", unit="shard", disable=not progress):
        tar_path = dataset_dir / shard.path
        if not tar_path.is_file():
            problems.append(f"{shard.path}: shard file missing")
            continue
        if sha256_file(tar_path) != shard.sha256:
            problems.append(f"{shard.path}: sha256 differs from dataset.json (file changed or corrupt)")
        idx_path = tar_path.with_suffix(".idx")
        try:
            index = read_index(idx_path)
            actual = _tar_index(tar_path)
        except (OSError, FormatError, tarfile.TarError, ValueError) as exc:
            problems.append(f"{shard.path}: cannot read tar or index ({exc})")
            continue
        if index != actual:
            bad = next((k for (k, m), (k2, m2) in zip(index, actual) if (k, m) != (k2, m2)), "?")
            problems.append(f"{shard.path}: index {idx_path.name} disagrees with the tar (first at key {bad})")
        keys = [k for k, _ in actual]
        if len(keys) != shard.samples:
            problems.append(f"{shard.path}: {len(keys)} samples, dataset.json says {shard.samples}")
        if sorted(keys) != sorted(by_shard.get(shard.path, [])):
            extra = sorted(set(keys) ^ set(by_shard.get(shard.path, [])))[:3]
            problems.append(f"{shard.path}: keys differ from manifest.parquet (e.g. {extra})")
        if decode:
            problems.extend(_decode_shard(tar_path, shard.path, actual, frame_sizes))
    return problems


def _decode_shard(tar_path: Path, name: str, index: list[tuple[str, dict[str, tuple[int, int]]]],
                  frame_sizes: dict[tuple[str, str], tuple[int, int]]) -> list[str]:
    problems = []
    with open(tar_path, "rb") as f:
        blob = f.read()
    for key, members in index:
        recorded = frame_sizes.get((name, key))
        for ext, (offset, size) in members.items():
            try:
                got = check_member(ext, blob[offset:offset + size])
            except Exception as exc:  # any decoder failure is a finding, never a crash of verify
                problems.append(f"{name}: key {key} member .{ext} does not decode ({type(exc).__name__}: {exc})")
                continue
            if got is not None and recorded is not None and got != recorded:
                problems.append(f"{name}: key {key} {FrameSizeError(ext, got, recorded)}")
    return problems


def inspect_dataset(dataset_dir: Path) -> str:
    """A plain-text summary: per split counts, missing-modality rates, class histogram, the class mix of the
    shards, what the build skipped, replaced or left empty (dataset.json `build`), sizes and rejects."""
    info = read_dataset_info(dataset_dir)
    manifest = pq.read_table(dataset_dir / "manifest.parquet").to_pylist()
    rejects_path = dataset_dir / "rejects.parquet"
    rejects = pq.read_table(rejects_path).to_pylist() if rejects_path.is_file() else []
    described = {}
    if info.visual:
        described["visual"] = f"frames: {info.visual.frames} x short side {info.visual.short_side} px JPEG"
    if info.text:
        described["text"] = (f"text: {info.text.tokenizer}, {info.text.vocab_size} tokens, {info.text.max_len} ids "
                             f"per sample")
    if info.audio and info.audio.kind == "spectrogram_array":
        described["audio"] = f"audio: stored spectrograms {info.audio.shape}"
    elif info.audio and info.audio.kind == "logmel_array":
        described["audio"] = f"audio: stored log-mel {info.audio.shape} {info.audio.dtype}"
    elif info.audio:
        described["audio"] = f"audio: {info.audio.sample_rate} Hz {info.audio.codec}, median {info.audio.seconds} s"
    lines = [f"dataset {info.dataset} (format v{info.format_version}) at {dataset_dir}",
             f"modalities: {', '.join(info.modalities)}; {info.num_classes} classes"
             f"{' (multi-label)' if info.multilabel else ''}",
             "; ".join(described[m] for m in info.modalities),
             "", f"{'split':<8}{'samples':>9}{'shards':>8}{'MiB':>9}"
             + "".join(f"{'no ' + m:>11}" for m in info.modalities) + f"{'rejected':>10}"]
    for split, counts in info.splits.items():
        shards = info.shards_of(split)
        mib = sum(s.bytes for s in shards) / 2**20
        n = max(counts["samples"], 1)
        lines.append(f"{split:<8}{counts['samples']:>9}{len(shards):>8}{mib:>9.1f}"
                     + "".join(f"{(counts['samples'] - counts['has_' + m]) / n:>11.1%}" for m in info.modalities)
                     + f"{counts['rejected']:>10}")
    lines += ["", "samples per class and split:"]
    per = Counter((name, r["split"]) for r in manifest
                  for name in (r["label_name"].split("|") if info.multilabel else [r["label_name"]]))
    splits = list(info.splits)
    lines.append(f"{'class':<28}" + "".join(f"{s:>8}" for s in splits))
    for name in info.classes:
        lines.append(f"{name[:27]:<28}" + "".join(f"{per[(name, s)]:>8}" for s in splits))
    lines += ["", *_class_mix_lines(info, manifest)]
    lines += _build_note_lines(info.build)
    if rejects:
        lines += ["", "rejects by stage and reason:"]
        for (stage, reason), n in Counter((r["stage"], r["reason"].split(" (")[0]) for r in rejects).most_common(10):
            lines.append(f"{n:>6}  {stage}: {reason}")
    return "\n".join(lines)


def shard_class_mix(info: DatasetInfo, manifest: list[dict]) -> dict[str, list[tuple[str, int, int, float, str]]]:
    """Per split, per shard in dataset.json order: (shard, samples, distinct classes, largest single-class
    share, that class). A share counts the shard's samples carrying the class (multi-label: any label)."""
    by_shard: dict[str, Counter] = {}
    for row in manifest:
        by_shard.setdefault(row["shard"], Counter()).update(row.get("labels") or [row["label"]])
    mix: dict[str, list[tuple[str, int, int, float, str]]] = {}
    for shard in info.shards:
        counts = by_shard.get(shard.path, Counter())
        if not counts or not shard.samples:
            continue
        top, n = counts.most_common(1)[0]
        mix.setdefault(shard.split, []).append(
            (shard.path, shard.samples, len(counts), n / shard.samples, info.classes[top]))
    return mix


def _class_mix_lines(info: DatasetInfo, manifest: list[dict]) -> list[str]:
    """The class mix of each split's shards, leaving out shards under half the largest one (the remainder
    of the cut, whose few samples say little): a reader that shuffles only inside a buffer (DALI) needs
    every shard to mix classes."""
    lines = ["class mix per shard (shards of at least half the split's largest; a short remainder is left out):"]
    for split, shards in shard_class_mix(info, manifest).items():
        full = [s for s in shards if 2 * s[1] >= max(t[1] for t in shards)]
        distinct = [s[2] for s in full]
        name, _, _, share, cls = max(full, key=lambda s: s[3])
        lines.append(f"  {split}: {len(full)} shards, distinct classes min {min(distinct)} / median "
                     f"{float(np.median(distinct)):.1f} / max {max(distinct)} of {info.num_classes}, "
                     f"largest single-class share {share:.1%} ({name}: {cls})")
    return lines


def _build_note_lines(build: dict) -> list[str]:
    """What the build left out or changed, when dataset.json's `build` records it: annotation rows of classes
    outside the class list (by label), annotation files whose invalid UTF-8 was replaced, empty classes."""
    lines = []
    skipped = build.get("skipped_labels") or {}
    if skipped:
        common = Counter(skipped).most_common(10)
        more = f", and {len(skipped) - len(common)} more labels" if len(skipped) > len(common) else ""
        lines.append(f"skipped_labels: {sum(skipped.values())} annotation rows of {len(skipped)} labels outside the "
                     f"class list: " + ", ".join(f"{label!r} x {n}" for label, n in common) + more)
    replaced = build.get("annotation_replaced") or {}
    if replaced:
        lines.append("annotation_replaced: invalid UTF-8 replaced by U+FFFD in "
                     + ", ".join(f"{name} ({n} sequences)" for name, n in sorted(replaced.items())))
    empty = build.get("empty_classes") or []
    if empty:
        shown = ", ".join(repr(c) for c in empty[:20]) + (f", and {len(empty) - 20} more" if len(empty) > 20 else "")
        lines.append(f"empty_classes: kept classes with no samples ({len(empty)}): {shown}")
    return ["", "build notes:", *(f"  {line}" for line in lines)] if lines else []
