"""The ordered sample list of a split, read from the shards' indexes, and its split across workers.

Each sample also carries the frame size the build recorded for it (manifest.parquet `frame_height`,
`frame_width`), read once per loader, so the loaders can check every decoded frame against it cheaply."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from shards.format import DatasetInfo, FormatError, read_index


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie: the tar, the key and extension -> (offset, size); and the
    (height, width) of its frames as recorded by the build (None: no frames, or not recorded)."""

    tar: str
    key: str
    members: dict[str, tuple[int, int]]
    frame_size: tuple[int, int] | None = None


class FrameSizeError(ValueError):
    """A frame that decodes to another size than the build recorded for its sample."""

    def __init__(self, member: str, got: tuple[int, int], recorded: tuple[int, int]) -> None:
        super().__init__(f"member .{member} decodes to {got[0]}x{got[1]} (height x width), "
                         f"the build recorded {recorded[0]}x{recorded[1]}")


def recorded_frame_sizes(dataset_dir: Path, split: str | None = None) -> dict[tuple[str, str], tuple[int, int]]:
    """(shard, key) -> (height, width) of the stored frames, from manifest.parquet, for the samples with
    frames (of `split`, or all). Empty for a dataset built before the sizes were recorded: nothing to check."""
    path = dataset_dir / "manifest.parquet"
    if not path.is_file() or not {"frame_height", "frame_width"} <= set(pq.read_schema(path).names):
        return {}
    columns = ["shard", "key", "frame_height", "frame_width"]
    table = pq.read_table(path, columns=columns, filters=None if split is None else [("split", "==", split)])
    shard, key, height, width = (table.column(c).to_pylist() for c in columns)
    return {(s, k): (h, w) for s, k, h, w in zip(shard, key, height, width) if h and w}


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
    """Every sample of a split in reader order (shard order, then position in the tar), with its recorded
    frame size."""
    sizes = recorded_frame_sizes(dataset_dir, split)
    refs = []
    for shard, (tar, idx) in zip(info.shards_of(split), split_shards(dataset_dir, info, split)):
        refs.extend(SampleRef(str(tar), key, members, sizes.get((shard.path, key)))
                    for key, members in read_index(idx))
    return refs


def shard_range(n: int, shard_id: int, num_shards: int) -> range:
    """The contiguous part of n samples that worker `shard_id` of `num_shards` reads in evaluation (the rule
    of DALI's readers)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} outside 0..{num_shards - 1}")
    return range(n * shard_id // num_shards, n * (shard_id + 1) // num_shards)


def training_steps(n: int, num_shards: int, batch_size: int) -> int:
    """Full batches per training epoch, the same on every worker (the smallest part decides), so DDP
    workers run the same number of steps and none waits forever in an all-reduce."""
    return max(1, (n // num_shards) // batch_size) if n else 0
