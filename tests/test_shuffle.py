"""Class mixing from the shards to the batches, and what `pipeline inspect` says about it.

Pinned: on a corpus whose keys sort by class (Food-101's `train_<class>_<n>`, so a build in key order would
cluster classes), every shard mixes classes; the first batches of a DALI training epoch mix classes as
much as the torch loader's (mean label entropy per batch within 10%); the DALI reader visits the tars in
an order fixed by (seed, epoch), the same on every worker, with a shuffle buffer of two shards; workers
still partition the split with equal step counts, and a resume reproduces a later epoch; `inspect`
prints the per-shard class mix and the build's skipped labels, replaced annotations and empty classes.

The corpus: the UPMC Food-101 layout with 8 classes of 16 train images (24x32 px) and one of 1 test image
each, plus a class folder with no images (an empty class), built into shards of 8 samples."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests` has no __init__.py; make `tests.media` importable either way
    sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from shards.format import DatasetInfo, ShardInfo, read_dataset_info  # noqa: E402
from shards.loader import dali_available, make_loader  # noqa: E402
from shards.verify import inspect_dataset  # noqa: E402
from tests.media import class_image  # noqa: E402

CLASSES = [f"dish{c}" for c in range(8)]
EMPTY_CLASS = "zz_empty"  # a class folder without images: kept in the class list, no samples
PER_CLASS = 16  # train images per class (a fixed 10% of them become val)
SHARD_SIZE = 8
OPTIONS = BuildOptions(size=24, shard_size=SHARD_SIZE, max_len=8)
BATCH, CROP = 8, 16
FIRST_BATCHES, EPOCHS = 4, 5  # the statistic: the first 4 batches of 5 epochs
ENTROPY_TOLERANCE = 0.10  # DALI's mean label entropy per batch may be at most 10% below torch's

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")

pytestmark = pytest.mark.filterwarnings(
    "ignore:Checkpointing enabled in a pipeline with external source:UserWarning")


@dataclass(frozen=True)
class Corpus:
    path: Path  # OUT/food101
    labels: dict[str, int]  # key -> class index, from manifest.parquet
    train_keys: list[str]  # the train split's keys, sorted (so by class)
    shard_labels: dict[str, list[int]]  # train shard -> labels of its samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The Food-101 layout (images/{train,test}/<class>/<class>_<n>.jpg, header-less
    texts/{train,test}_titles.csv rows `file,title,class`), built once for the module."""
    root = tmp_path_factory.mktemp("shuffle_raw") / "food101"
    (root / "texts").mkdir(parents=True)
    for split, per_class in (("train", PER_CLASS), ("test", 1)):
        rows = []
        for c, name in enumerate(CLASSES):
            for n in range(per_class):
                class_image(root / "images" / split / name / f"{name}_{n}.jpg", c, n, size=(32, 24))
                rows.append(f'"{name}_{n}.jpg","{name} on a plate {n}",{name}')
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(rows) + "\n")
    (root / "images" / "train" / EMPTY_CLASS).mkdir()
    out = tmp_path_factory.mktemp("shuffle_out")
    build_shards("food101", root, out, OPTIONS, workers=1, progress=False)
    path = out / "food101"
    manifest = pq.read_table(path / "manifest.parquet", columns=["key", "split", "shard", "label"]).to_pylist()
    shard_labels: dict[str, list[int]] = {}
    for row in manifest:
        if row["split"] == "train":
            shard_labels.setdefault(row["shard"], []).append(row["label"])
    train_keys = sorted(r["key"] for r in manifest if r["split"] == "train")
    return Corpus(path, {r["key"]: r["label"] for r in manifest}, train_keys, shard_labels)


def entropy(labels: list[int]) -> float:
    """Shannon entropy (bits) of the labels' distribution: log2(8) = 3 for eight classes in equal parts."""
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def first_batches(path: Path, backend: str, epoch: int, n: int = FIRST_BATCHES, **kwargs) -> list[dict]:
    loader = make_loader(path, "train", BATCH, backend=backend, train=True, seed=0, epoch=epoch, crop=CROP,
                         num_workers=0 if backend == "torch" else 1, **kwargs)
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def dali_loader(path: Path, **kwargs):
    kwargs = {"seed": 0, "crop": CROP, "num_workers": 1, **kwargs}
    return make_loader(path, "train", BATCH, backend="dali", train=True, **kwargs)


# ----------------------------------------------------------------------------------------------- shards
def test_every_shard_mixes_classes_although_keys_sort_by_class(corpus: Corpus) -> None:
    info = read_dataset_info(corpus.path)
    in_key_order = [corpus.labels[k] for k in corpus.train_keys]
    assert in_key_order == sorted(in_key_order)  # cut in key order, shards would hold one or two classes
    full = [labels for shard, labels in corpus.shard_labels.items() if len(labels) == SHARD_SIZE]
    assert len(full) == len(corpus.shard_labels) - 1 == len(info.shards_of("train")) - 1
    distinct = [len(set(labels)) for labels in full]
    assert min(distinct) >= 4 and np.median(distinct) >= 5, distinct  # most of the 8 classes in every shard


# ----------------------------------------------------------------------------------------------- DALI vs torch
@needs_dali
def test_first_dali_batches_mix_classes_as_much_as_the_torch_loaders(corpus: Corpus) -> None:
    """Mean label entropy per batch over the first batches of several epochs: DALI within 10% of torch
    (which permutes its whole part), both far above batches cut in key order."""
    mean = {backend: float(np.mean([entropy(b["label"].tolist()) for epoch in range(EPOCHS)
                                    for b in first_batches(corpus.path, backend, epoch)]))
            for backend in ("dali", "torch")}
    keys = corpus.train_keys
    clustered = float(np.mean([entropy([corpus.labels[k] for k in keys[i:i + BATCH]])
                               for i in range(0, len(keys) - BATCH + 1, BATCH)]))
    assert mean["torch"] > 2.0 and clustered < 1.2, (mean, clustered)
    assert mean["dali"] >= (1 - ENTROPY_TOLERANCE) * mean["torch"], mean


# ----------------------------------------------------------------------------------------------- DALI order
@needs_dali
def test_dali_reads_the_tars_in_an_order_fixed_by_seed_and_epoch_the_same_on_every_worker(corpus: Corpus) -> None:
    stored = [str(corpus.path / s.path) for s in read_dataset_info(corpus.path).shards_of("train")]
    loader = dali_loader(corpus.path)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        orders.append(loader.reader_tars())
    assert all(sorted(order) == sorted(stored) for order in orders)  # a permutation of the split's tars
    assert orders[0] != stored and orders[1] != orders[0] and orders[2] != orders[1]
    for shard_id in range(3):  # every worker gets the same list: shard_id/num_shards cut it into parts
        assert dali_loader(corpus.path, epoch=1, shard_id=shard_id, num_shards=3).reader_tars() == orders[1]
    assert dali_loader(corpus.path, seed=1).reader_tars() != orders[0]
    evaluation = make_loader(corpus.path, "train", BATCH, backend="dali", crop=CROP, num_workers=1)
    assert evaluation.reader_tars() == stored  # evaluation reads in dataset.json order


@needs_dali
def test_dali_shuffle_buffer_holds_two_shards_and_first_batches_come_from_the_epochs_first_tars(
        corpus: Corpus) -> None:
    """DALI fills `initial_fill` samples in reader order and draws each output from the buffer, refilling it:
    the k-th output comes from the first initial_fill + k samples, so the first batch shows both the buffer
    size and the epoch's tar order."""
    fill = 2 * SHARD_SIZE
    loader = dali_loader(corpus.path)
    first_tars = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        order = [ref.key for ref in loader.epoch_samples()]
        batch = next(iter(loader))
        assert max(order.index(k) for k in batch["key"]) < fill + BATCH - 1, (epoch, batch["key"])
        tar_of = {ref.key: ref.tar for ref in loader.epoch_samples()}
        first_tars.append(frozenset(tar_of[k] for k in batch["key"]))
    assert len(set(first_tars)) == 4  # each epoch starts elsewhere
    assert loader.initial_fill == fill


@needs_dali
def test_shuffle_buffer_is_sized_from_the_recorded_shards_and_bounded() -> None:
    from shards.dali_loader import FILL_MAX_BYTES, shuffle_buffer

    def info(samples: int, sample_bytes: int, shards: int = 4) -> tuple[DatasetInfo, list[str]]:
        recorded = [ShardInfo(f"train/{i:06d}.tar", "train", samples, "", samples * sample_bytes)
                    for i in range(shards)]
        return DatasetInfo("d", ["visual"], ["a"], False, shards=recorded), [f"/data/d/{s.path}" for s in recorded]

    assert shuffle_buffer(*info(256, 1000), batch_size=64, part=10_000) == 512  # two shards
    assert shuffle_buffer(*info(256, 1000), batch_size=64, part=300) == 300  # never more than the part
    assert shuffle_buffer(*info(8, 1000), batch_size=64, part=10_000) == 64  # at least one batch
    big = 4 * 2**20  # 4 MiB per stored sample: 512 samples would be 2 GiB
    assert shuffle_buffer(*info(256, big), batch_size=16, part=10_000) == FILL_MAX_BYTES // big


# ----------------------------------------------------------------------------------------------- DALI workers
@needs_dali
@pytest.mark.parametrize("epoch", [0, 1])
def test_dali_workers_partition_every_epoch_with_equal_steps(epoch: int, corpus: Corpus) -> None:
    train_keys = set(corpus.train_keys)
    loaders = [dali_loader(corpus.path, epoch=epoch, shard_id=s, num_shards=3) for s in range(3)]
    parts = [{ref.key for ref in loader.epoch_samples()} for loader in loaders]
    assert sum(map(len, parts)) == len(train_keys) and set().union(*parts) == train_keys  # disjoint, complete
    assert len({len(loader) for loader in loaders}) == 1
    for loader, part in zip(loaders, parts):
        got = [k for b in loader for k in b["key"]]
        assert len(got) == len(loader) * BATCH == len(set(got)) and set(got) <= part


@needs_dali
def test_dali_resumes_a_later_epoch_mid_epoch_in_the_same_tar_order(corpus: Corpus) -> None:
    whole = [b["key"] for b in dali_loader(corpus.path, epoch=2)]
    loader = dali_loader(corpus.path, epoch=2)
    batches = iter(loader)
    head = [next(batches)["key"] for _ in range(3)]
    resumed = dali_loader(corpus.path)
    resumed.load_state_dict(loader.state_dict())
    assert head + [b["key"] for b in resumed] == whole


# ----------------------------------------------------------------------------------------------- inspect
def test_inspect_prints_the_class_mix_of_the_full_shards_per_split(corpus: Corpus) -> None:
    full = {shard: labels for shard, labels in corpus.shard_labels.items() if 2 * len(labels) >= SHARD_SIZE}
    assert len(full) == len(corpus.shard_labels) - 1  # the remainder shard (1 sample) is left out
    distinct = [len(set(labels)) for labels in full.values()]
    shares = {shard: np.bincount(labels).max() / len(labels) for shard, labels in full.items()}
    text = inspect_dataset(corpus.path)
    best = [shard for shard, share in shares.items() if share == max(shares.values())]
    assert any(f"  train: {len(full)} shards, distinct classes min {min(distinct)} / median "
               f"{np.median(distinct):.1f} / max {max(distinct)} of {len(CLASSES) + 1}, largest single-class "
               f"share {max(shares.values()):.1%} ({shard}: " in text for shard in best), text
    assert "  val: " in text and "  test: " in text


def test_inspect_prints_skipped_labels_replaced_annotations_and_empty_classes(corpus: Corpus,
                                                                            tmp_path: Path) -> None:
    text = inspect_dataset(corpus.path)
    assert f"empty_classes: kept classes with no samples (1): '{EMPTY_CLASS}'" in text  # from the build itself
    assert "skipped_labels" not in text and "annotation_replaced" not in text
    copy = tmp_path / "food101"
    shutil.copytree(corpus.path, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    doc["build"].update(skipped_labels={"abseiling": 6, "yoga": 2},  # as pipeline/merge.py records them
                        annotation_replaced={"annotations/test.csv": 2})
    doc["build"].pop("empty_classes")
    (copy / "dataset.json").write_text(json.dumps(doc))
    text = inspect_dataset(copy)
    assert "skipped_labels: 8 annotation rows of 2 labels outside the class list: 'abseiling' x 6, 'yoga' x 2" in text
    assert "annotation_replaced: invalid UTF-8 replaced by U+FFFD in annotations/test.csv (2 sequences)" in text
    assert "empty_classes" not in text
    doc["build"].pop("skipped_labels")
    doc["build"].pop("annotation_replaced")
    (copy / "dataset.json").write_text(json.dumps(doc))
    assert "build notes" not in inspect_dataset(copy)
