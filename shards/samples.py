"""The ordered sample list of a split, read from the shards' indexes, and its split across workers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shards.format import DatasetInfo, FormatError, read_index


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie: the tar, the key and extension -> (offset, size)."""

    tar: str
    key: str
    members: dict[str, tuple[int, int]]


def split_shards(dataset_dir: Path, info: DatasetInfo, split: str) -> list[tuple[Path, Path]]:
    """(tar, idx) paths of a split in dataset.json order; errors name a missing file and the fix."""
    shards = info.shards_of(split)
    if not shards:
        known = ", ".join(sorted(info.splits)) or "none"
        raise FormatError(f"{dataset_dir}: no shards for split {split!r} (splits: {known})")
    pairs = []
    for shard in shards:
        tar = dataset_dir / shard.path
        idx = tar.with_suffix(".idx")
        for path, what in ((tar, "shard"), (idx, "index")):
            if not path.is_file():
                raise FormatError(f"{what} {path} is missing; rerun `pipeline build-shards` into the same --out "
                                  f"after deleting {dataset_dir / '.build'} part files of that shard, or rebuild")
        pairs.append((tar, idx))
    return pairs


def split_samples(dataset_dir: Path, info: DatasetInfo, split: str) -> list[SampleRef]:
    """Every sample of a split in reader order (shard order, then position in the tar)."""
    refs = []
    for tar, idx in split_shards(dataset_dir, info, split):
        refs.extend(SampleRef(str(tar), key, members) for key, members in read_index(idx))
    return refs


def shard_range(n: int, shard_id: int, num_shards: int) -> range:
    """The contiguous part of n samples that worker `shard_id` of `num_shards` reads (DALI's rule)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} outside 0..{num_shards - 1}")
    return range(n * shard_id // num_shards, n * (shard_id + 1) // num_shards)


def training_steps(n: int, num_shards: int, batch_size: int) -> int:
    """Full batches per training epoch, the same on every worker (the smallest part decides), so DDP
    workers run the same number of steps and none waits forever in an all-reduce."""
    return max(1, (n // num_shards) // batch_size) if n else 0
