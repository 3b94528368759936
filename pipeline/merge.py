"""The merge step of `pipeline build-shards`: the shards' part files become manifest.parquet,
rejects.parquet and dataset.json."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.adapters import Corpus
from pipeline.options import BuildOptions
from shards.format import DatasetInfo, ShardInfo, TextInfo
from shards.writer import atomic_write, atomic_write_bytes


def reject_table(rejects: list[dict]) -> pa.Table:
    return pa.table({
        "key": pa.array([r["key"] for r in rejects], pa.string()),
        "split": pa.array([r["split"] for r in rejects], pa.string()),
        "source": pa.array([r["source"] for r in rejects], pa.string()),
        "stage": pa.array([r["stage"] for r in rejects], pa.string()),
        "reason": pa.array([r["reason"] for r in rejects], pa.string()),
        "kept": pa.array([r["kept"] for r in rejects], pa.bool_()),
    })


def merge_parts(out: Path, corpus: Corpus, shards: list[tuple[str, str]], parts: dict[str, dict],
                opts: BuildOptions, src: Path, text_info: dict) -> DatasetInfo:
    """Merge the part files of `shards` ((name, split) in plan order) into manifest.parquet,
    rejects.parquet and dataset.json (each written atomically, dataset.json last)."""
    rows = sorted((r for name, _ in shards for r in parts[name]["rows"]), key=lambda r: (r["split"], r["key"]))
    rejects = [asdict(r) for r in corpus.rejects] + [r for name, _ in shards for r in parts[name]["rejects"]]
    rejects.sort(key=lambda r: (r["split"], r["key"], r["stage"]))
    manifest = pa.table({
        "key": [r["key"] for r in rows],
        "split": [r["split"] for r in rows],
        "shard": [r["shard"] for r in rows],
        "label": pa.array([r["label"] for r in rows], pa.int64()),
        "labels": pa.array([r.get("labels", [r["label"]]) for r in rows], pa.list_(pa.int64())),
        "label_name": [_label_name(corpus, r) for r in rows],
        "has_visual": [r["has_visual"] for r in rows],
        "has_audio": [r["has_audio"] for r in rows],
        "has_text": [r.get("has_text", False) for r in rows],
        "duration": pa.array([r["duration"] for r in rows], pa.float64()),
        "audio_seconds": pa.array([r["audio_seconds"] for r in rows], pa.float64()),
        "text_replaced": pa.array([r.get("text_replaced", 0) for r in rows], pa.int64()),
        "frame_height": pa.array([r.get("frame_size", [0, 0])[0] for r in rows], pa.int64()),
        "frame_width": pa.array([r.get("frame_size", [0, 0])[1] for r in rows], pa.int64()),
        "source": [r["source"] for r in rows],
    })
    write_parquet(out / "manifest.parquet", manifest)
    write_parquet(out / "rejects.parquet", reject_table(rejects))
    splits = {}
    for split in sorted({split for _, split in shards}):
        split_rows = [r for r in rows if r["split"] == split]
        splits[split] = {
            "samples": len(split_rows),
            "rejected": sum(1 for r in rejects if r["split"] == split and not r["kept"]),
            "has_visual": sum(r["has_visual"] for r in split_rows),
            "has_audio": sum(r["has_audio"] for r in split_rows),
        }
        if "text" in corpus.modalities:
            splits[split]["has_text"] = sum(r.get("has_text", False) for r in split_rows)
    shard_infos = [ShardInfo(name, split, parts[name]["samples"], parts[name]["sha256"], parts[name]["bytes"])
                   for name, split in shards if parts[name]["samples"]]
    build = {"src": src.name, "options": asdict(opts), "adapter_rejects": len(corpus.rejects)}
    if corpus.skipped_labels:
        build["skipped_labels"] = dict(sorted(corpus.skipped_labels.items()))
    if corpus.annotation_replaced:
        build["annotation_replaced"] = dict(sorted(corpus.annotation_replaced.items()))
    counts = Counter(i for r in rows for i in (r.get("labels") or [r["label"]]))
    empty = [name for i, name in enumerate(corpus.classes) if not counts[i]]
    if empty:
        build["empty_classes"] = empty
    if "text" in corpus.modalities:
        replaced = [r.get("text_replaced", 0) for r in rows]
        build["text_replaced"] = {"samples": sum(n > 0 for n in replaced), "sequences": sum(replaced)}
    info = DatasetInfo(
        dataset=corpus.name, modalities=corpus.modalities, classes=corpus.classes, multilabel=corpus.multilabel,
        visual=corpus.kind.visual_info(opts),
        audio=corpus.kind.audio_info(opts, rows) if "audio" in corpus.modalities else None,
        text=TextInfo(**text_info) if text_info else None, splits=splits, shards=shard_infos, build=build,
    )
    atomic_write_bytes(out / "dataset.json", info.to_json().encode())
    return info


def _label_name(corpus: Corpus, row: dict) -> str:
    if corpus.multilabel:
        return "|".join(corpus.classes[i] for i in row["labels"])
    return corpus.classes[row["label"]]


def write_parquet(path: Path, table: pa.Table) -> None:
    """`table` as zstd Parquet, written atomically."""
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
