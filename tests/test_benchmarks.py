"""Benchmark helpers that change what is measured: the tiled view of a dataset (longer epochs, same data)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from shards.format import read_dataset_info
from shards.loader import make_loader
from shards.samples import split_samples

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_corpus", ROOT / "benchmarks" / "corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)
tile_shards = corpus.tile_shards


def test_a_tiled_dataset_repeats_the_train_shards_and_keeps_the_other_splits(kinetics_sound_built,
                                                                            tmp_path: Path) -> None:
    src = kinetics_sound_built.path
    info = read_dataset_info(src)
    tiled = tile_shards(src, tmp_path / "x3" / src.name, 3)
    tiled_info = read_dataset_info(tiled)
    for split in info.splits:
        times = 3 if split == "train" else 1
        assert tiled_info.splits[split]["samples"] == times * info.splits[split]["samples"]
        keys = [r.key for r in split_samples(src, info, split)]
        assert [r.key for r in split_samples(tiled, tiled_info, split)] == keys * times
    tars = [Path(r.tar) for r in split_samples(tiled, tiled_info, "train")]
    assert all(t.stat().st_nlink > 1 for t in tars)  # hard links: no copy of the data
    batches = list(make_loader(tiled, "train", 2, backend="torch", train=True, num_workers=0))
    assert sum(len(b["key"]) for b in batches) == 2 * (3 * info.splits["train"]["samples"] // 2)
    assert json.loads((src / "dataset.json").read_text())["splits"]["train"]["samples"] == \
        info.splits["train"]["samples"]  # the source is untouched
    assert tile_shards(src, tmp_path / "x1", 1) == src
    with pytest.raises(ValueError):
        tile_shards(src, tmp_path / "x0", 0)
