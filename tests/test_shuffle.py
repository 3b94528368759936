"""Class mixing from the shards to the batches, and what `pipeline inspect` says about it.

Pinned: on a corpus whose keys sort by class (Food-101's `train_<class>_<n>`, so a build in key order would
cluster classes), every shard mixes classes; the first batches of a DALI training epoch mix classes as
much as the torch loader's (mean label entropy per batch within 10%); a training epoch is one permutation
of the whole split fixed by (seed, epoch), the same for both backends (masks too); workers take strided
slices of it with equal step counts; a resume inside an epoch goes on exactly on the same workers and,
on another number of workers, with every sample not yet seen, once; `inspect` prints the per-shard class
mix and the build's skipped labels, replaced annotations and empty classes.

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
from shards.format import read_dataset_info  # noqa: E402
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


# ----------------------------------------------------------------------------------------------- order
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]


def loader_of(path: Path, backend: str, **kwargs):
    kwargs = {"seed": 0, "crop": CROP, "num_workers": 0 if backend == "torch" else 1, **kwargs}
    return make_loader(path, "train", BATCH, backend=backend, train=True, **kwargs)


def epoch_keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_epoch_is_one_permutation_of_the_split_fixed_by_seed_and_epoch(backend: str, corpus: Corpus) -> None:
    """Both backends batch the epoch's permutation of the whole split (`epoch_order`), the same order."""
    from shards.batches import epoch_order
    from shards.sample_refs import split_samples

    keys = [r.key for r in split_samples(corpus.path, read_dataset_info(corpus.path), "train")]
    loader = loader_of(corpus.path, backend)
    epochs = [epoch_keys(loader) for _ in range(3)]
    steps = len(keys) // BATCH
    for epoch, got in enumerate(epochs):
        assert got == [keys[i] for i in epoch_order(len(keys), 0, epoch)[:steps * BATCH]]
    assert epochs[0] != epochs[1] != epochs[2]
    assert epoch_keys(loader_of(corpus.path, backend, epoch=1)) == epochs[1]  # a fresh loader at epoch 1
    assert epoch_keys(loader_of(corpus.path, backend, seed=1)) != epochs[0]


@needs_dali
def test_dali_and_torch_train_on_the_same_batches_with_the_same_masks(corpus: Corpus) -> None:
    from shards.masks import DropSpec

    drop = DropSpec("independent", {"visual": 0.4, "text": 0.4})
    got = {backend: [(b["key"], b["present"].tolist()) for b in loader_of(corpus.path, backend, augment=drop, epoch=3)]
           for backend in ("dali", "torch")}
    assert got["dali"] == got["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epoch", [0, 1])
def test_workers_take_strided_slices_of_the_epoch_with_equal_steps(backend: str, epoch: int, corpus: Corpus) -> None:
    one = epoch_keys(loader_of(corpus.path, backend, epoch=epoch))
    loaders = [loader_of(corpus.path, backend, epoch=epoch, shard_id=s, num_shards=3) for s in range(3)]
    assert len({len(loader) for loader in loaders}) == 1
    parts = [epoch_keys(loader) for loader in loaders]
    steps = len(loaders[0])
    assert all(len(part) == steps * BATCH for part in parts)
    for s, part in enumerate(parts):  # worker s of 3 takes every third sample of the one-worker order
        assert part == [one[i] for i in range(s, 3 * steps * BATCH, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_a_resume_inside_an_epoch_on_another_number_of_workers_sees_every_sample_once(
        backend: str, before: int, after: int, corpus: Corpus) -> None:
    """Stopped after 2 steps on `before` workers, the epoch goes on from its global position on `after`
    workers: the keys of both parts are disjoint, and together the prefix of the epoch's order that the
    steps consumed."""
    seen = []
    states = []
    for s in range(before):
        loader = loader_of(corpus.path, backend, epoch=1, shard_id=s, num_shards=before)
        batches = iter(loader)
        seen += [k for _ in range(2) for k in next(batches)["key"]]
        states.append(loader.state_dict())
    assert {st["samples_done"] for st in states} == {2 * BATCH * before}
    rest = []
    for s in range(after):
        loader = loader_of(corpus.path, backend, epoch=0, shard_id=s, num_shards=after)
        loader.load_state_dict(states[0])
        assert loader.epoch == 1
        rest += epoch_keys(loader)
        assert loader.epoch == 2 and len(loader) == len(corpus.train_keys) // (after * BATCH)  # next epoch whole
    order = epoch_keys(loader_of(corpus.path, backend, epoch=1, num_shards=1))
    assert len(seen) + len(rest) == len(set(seen) | set(rest))  # nothing twice
    assert sorted(seen) == sorted(order[:len(seen)])  # the steps done: a prefix of the order
    assert sorted(seen + rest) == sorted(order[:len(seen) + len(rest)])  # and the rest goes on from it
    n = len(corpus.train_keys)
    remaining_steps = max(1, ((n - 2 * BATCH * before) // after) // BATCH)
    assert len(rest) == remaining_steps * BATCH * after


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resized_resume_with_less_than_a_step_left_ends_the_epoch_on_every_worker(backend: str,
                                                                                   corpus: Corpus) -> None:
    """2 samples left for 4 workers: no worker takes a step (DDP workers must all take the same number),
    as an uninterrupted epoch drops its tail; the next epoch is whole again."""
    n = len(corpus.train_keys)
    state = {"epoch": 1, "batches_done": 0, "start": 0, "num_shards": 1, "batch_size": BATCH, "samples_done": n - 2}
    for s in range(4):
        loader = loader_of(corpus.path, backend, shard_id=s, num_shards=4)
        loader.load_state_dict(state)
        assert len(loader) == 0 and loader.steps_per_epoch == n // 4 // BATCH
        assert list(loader) == [] and loader.epoch == 2 and len(loader) == n // 4 // BATCH


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resume_on_the_same_workers_goes_on_exactly(backend: str, corpus: Corpus) -> None:
    whole = [b["key"] for b in loader_of(corpus.path, backend, epoch=2, shard_id=1, num_shards=2)]
    loader = loader_of(corpus.path, backend, epoch=2, shard_id=1, num_shards=2)
    batches = iter(loader)
    head = [next(batches)["key"] for _ in range(2)]
    resumed = loader_of(corpus.path, backend, shard_id=1, num_shards=2)
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
