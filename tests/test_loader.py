"""The loaders of `shards/` (DALI CPU pipeline and torch loader) on a tiny kinetics_sound corpus.

Pinned: the batch contract of DESIGN.md for both backends; DALI/torch parity in evaluation (with and
without a resize); deterministic evaluation scenarios (across backends, runs and world sizes); sharding
by `shard_range`; training augmentation (never everything dropped, reproducible masks); dropped
modalities are never decoded; mid-epoch resume; and the errors for bad input.

The corpus is built once per module: 14 clips of 160x120 frames (stored with short side 120, so a
crop of 64 or 112 resizes and a crop of 120 does not), two classes, every fourth clip without audio,
4 samples per shard."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests` has no __init__.py; make `tests.media` importable either way
    sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from shards.format import FormatError, read_dataset_info  # noqa: E402
from shards.loader import dali_available, make_loader  # noqa: E402
from shards.masks import DropSpec, ScenarioError, parse_scenario, scenario_keep  # noqa: E402
from shards.sample_refs import shard_range, split_samples, training_steps  # noqa: E402
from tests.media import ffmpeg_clip  # noqa: E402

N_CLIPS = 14
CLASSES = ("playing drums", "playing piano")  # both Kinetics-Sound classes
SPLIT = "train"
OPTIONS = BuildOptions(size=120, shard_size=4)  # stored frames stay 160x120; 4 shards of 4, 4, 4, 2
NO_RESIZE_CROP = 120  # the stored short side: no resize, the backends must agree (almost) exactly
DROP_ONE = DropSpec("drop_one", {"full": 1 / 3, "visual": 1 / 3, "audio": 1 / 3})
SCENARIOS = ("full", "missing:audio", "missing:visual", "rate:audio=0.5")
# Evaluation parity, in normalised units (visual) and scaled log-mel units (audio). Measured on this
# corpus: visual max 0.10 / mean 0.002 with a resize to 64, 0.05 / 0.002 to 32 (where the source
# region of the rounded output size overshoots the image by 0.6 px), exactly 0 without a resize;
# audio max 1.5e-4.
VISUAL_MAX_TOL, VISUAL_MEAN_TOL, VISUAL_EXACT_TOL, AUDIO_TOL = 0.15, 0.01, 1e-5, 1e-3

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Checkpointing enabled in a pipeline with external source:UserWarning")


@dataclass(frozen=True)
class Corpus:
    """A built kinetics_sound dataset and what the raw corpus says about each sample."""

    path: Path  # OUT/kinetics_sound
    keys: list[str]  # the split's keys in reader order (shard order, then position in the tar)
    no_audio: frozenset[str]  # clips made without an audio track
    labels: dict[str, int]  # key -> class index, from manifest.parquet
    modalities: list[str]

    def index(self, modality: str) -> int:
        return self.modalities.index(modality)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Raw Kinetics-400 layout (mp4 + annotations/train.csv) built into shards once for the module."""
    root = tmp_path_factory.mktemp("loader_raw") / "kinetics400"
    rows, no_audio = [], set()
    for i in range(N_CLIPS):
        youtube_id = f"ld{i:02d}Xq-_{i}"
        stem = f"{youtube_id}_000000_000010"
        has_audio = i % 4 != 1
        ffmpeg_clip(root / SPLIT / f"{stem}.mp4", audio=has_audio, tone=300 + 25 * i,
                    pattern="testsrc2" if i % 2 else "smptebars")
        rows.append({"label": CLASSES[i % 2], "youtube_id": youtube_id, "time_start": 0, "time_end": 10,
                     "split": SPLIT})
        if not has_audio:
            no_audio.add(stem)
    (root / "annotations").mkdir(parents=True)
    with open(root / "annotations" / f"{SPLIT}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path_factory.mktemp("loader_out")
    build_shards("kinetics_sound", root, out, OPTIONS, workers=2, progress=False)
    path = out / "kinetics_sound"
    info = read_dataset_info(path)
    manifest = pq.read_table(path / "manifest.parquet", columns=["key", "label", "has_audio"]).to_pylist()
    assert {r["key"] for r in manifest if not r["has_audio"]} == no_audio  # the fixture is what it claims
    keys = [r.key for r in split_samples(path, info, SPLIT)]
    assert len(keys) == N_CLIPS and len(info.shards) == 4
    return Corpus(path, keys, frozenset(no_audio), {r["key"]: r["label"] for r in manifest}, list(info.modalities))


@pytest.fixture(scope="module")
def corrupt_dir(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A copy of the dataset where one sample's second JPEG is overwritten with zeros (same size, so
    the index and the tar structure stay valid). Returns (dataset dir, shard file, key)."""
    path = tmp_path_factory.mktemp("loader_corrupt") / "kinetics_sound"
    shutil.copytree(corpus.path, path)
    ref = split_samples(path, read_dataset_info(path), SPLIT)[5]  # in the second shard
    offset, size = ref.members["f1.jpg"]
    with open(ref.tar, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    return path, ref.tar, ref.key


@pytest.fixture(scope="module")
def epoch_of(corpus: Corpus) -> Callable[..., list[dict]]:
    """All batches of one pass of an evaluation loader, cached per arguments (loaders are read-only)."""
    cache: dict[tuple, list[dict]] = {}

    def get(backend: str, **kwargs) -> list[dict]:
        key = (backend, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = batches(corpus.path, backend, **kwargs)
        return cache[key]

    return get


# ----------------------------------------------------------------------------------------------- helpers
def batches(path: Path, backend: str, batch_size: int = 4, **kwargs) -> list[dict]:
    kwargs.setdefault("num_workers", 2)
    kwargs.setdefault("crop", 64)
    return list(make_loader(path, SPLIT, batch_size, backend=backend, **kwargs))


def rows(batch_list: list[dict]) -> list[tuple[str, tuple[bool, ...]]]:
    """(key, present flags) per sample, in the order yielded."""
    return [(k, tuple(p)) for b in batch_list for k, p in zip(b["key"], b["present"].tolist())]


def cat(batch_list: list[dict], name: str) -> torch.Tensor:
    return torch.cat([b[name] for b in batch_list])


def check_contract(corpus: Corpus, batch_list: list[dict], crop: int) -> None:
    """DESIGN.md's batch dict: keys, shapes, dtypes, modality order, zeros exactly where absent."""
    info = read_dataset_info(corpus.path)
    n_frames = info.visual["frames"]
    n_mels = info.audio["n_mels"]
    n_time = round(info.audio["seconds"] * info.audio["sample_rate"]) // info.audio["hop_length"] + 1
    v, a = corpus.index("visual"), corpus.index("audio")
    assert corpus.modalities == ["visual", "audio"]
    for b in batch_list:
        assert list(b) == ["visual", "audio", "present", "label", "key"]
        n = len(b["key"])
        assert n > 0 and all(isinstance(k, str) for k in b["key"])
        assert b["visual"].dtype == torch.float32 and tuple(b["visual"].shape) == (n, n_frames, 3, crop, crop)
        assert b["audio"].dtype == torch.float32 and tuple(b["audio"].shape) == (n, 1, n_mels, n_time)
        assert b["present"].dtype == torch.bool and tuple(b["present"].shape) == (n, 2)
        assert b["label"].dtype == torch.int64 and tuple(b["label"].shape) == (n,)
        assert b["label"].tolist() == [corpus.labels[k] for k in b["key"]]
        for i, key in enumerate(b["key"]):
            for m, name in ((v, "visual"), (a, "audio")):
                tensor = b[name][i]
                if b["present"][i, m]:
                    assert tensor.abs().max() > 0.1, f"{key}: {name} present but blank"
                else:
                    assert torch.count_nonzero(tensor) == 0, f"{key}: {name} absent but not zeros"
            if key in corpus.no_audio:
                assert not b["present"][i, a], f"{key} has no audio track but present[audio] is True"


# ----------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_batches_follow_the_design_contract_in_split_order(backend: str, corpus: Corpus, epoch_of) -> None:
    got = epoch_of(backend, crop=64)
    check_contract(corpus, got, crop=64)
    assert [len(b["key"]) for b in got] == [4, 4, 4, 2]  # the last batch is short, not padded
    assert [k for k, _ in rows(got)] == corpus.keys
    assert [p for _, p in rows(got)] == [(True, k not in corpus.no_audio) for k in corpus.keys]


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_batches_follow_the_design_contract(backend: str, corpus: Corpus) -> None:
    got = batches(corpus.path, backend, train=True, augment=DROP_ONE, crop=112, seed=5)
    assert len(got) == N_CLIPS // 4  # training drops the short last batch
    check_contract(corpus, got, crop=112)


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("crop", [64, 32, NO_RESIZE_CROP], ids=["resize", "resize_region_past_edge", "no_resize"])
@needs_dali
def test_dali_and_torch_agree_in_evaluation(scenario: str, crop: int, corpus: Corpus, epoch_of) -> None:
    dali, ref = epoch_of("dali", crop=crop, scenario=scenario), epoch_of("torch", crop=crop, scenario=scenario)
    assert rows(dali) == rows(ref)  # same keys, same order, same present flags
    assert torch.equal(cat(dali, "label"), cat(ref, "label"))
    visual = (cat(dali, "visual") - cat(ref, "visual")).abs()
    if crop == NO_RESIZE_CROP:
        assert visual.max() <= VISUAL_EXACT_TOL
    else:
        assert visual.max() <= VISUAL_MAX_TOL and visual.mean() <= VISUAL_MEAN_TOL, (visual.max(), visual.mean())
    assert (cat(dali, "audio") - cat(ref, "audio")).abs().max() <= AUDIO_TOL


# ----------------------------------------------------------------------------------------------- scenarios
def test_rate_scenario_drops_the_same_keys_for_backends_runs_and_world_sizes(corpus: Corpus, epoch_of) -> None:
    scenario = "rate:audio=0.5"
    runs = {"torch": rows(epoch_of("torch", scenario=scenario)),
            "torch again": rows(batches(corpus.path, "torch", scenario=scenario))}
    if dali_available():
        runs["dali"] = rows(epoch_of("dali", scenario=scenario))
        runs["dali again"] = rows(batches(corpus.path, "dali", scenario=scenario))
    for backend in ["torch"] + (["dali"] if dali_available() else []):
        halves = [rows(batches(corpus.path, backend, scenario=scenario, shard_id=s, num_shards=2)) for s in (0, 1)]
        runs[f"{backend} 2 shards"] = halves[0] + halves[1]
    expected = runs["torch"]
    for name, got in runs.items():
        assert got == expected, name
    a = corpus.index("audio")
    keep = scenario_keep(corpus.keys, corpus.modalities, parse_scenario(scenario, corpus.modalities), seed=0)
    assert [p[a] for _, p in expected] == [bool(kp) and k not in corpus.no_audio
                                           for k, kp in zip(corpus.keys, keep[:, a])]
    with_audio = [p[a] for k, p in expected if k not in corpus.no_audio]
    assert any(with_audio) and not all(with_audio)  # the scenario really drops some, not all


def test_rate_scenario_respects_the_rate_and_depends_on_the_seed() -> None:
    modalities = ["visual", "audio"]
    keys = [f"clip{i:05d}_{i * 7919 % 1000:06d}" for i in range(4000)]
    for eta in (0.1, 0.3, 0.5, 0.9):
        keep = scenario_keep(keys, modalities, parse_scenario(f"rate:audio={eta}", modalities), seed=0)
        assert keep[:, 0].all()  # the other modality is untouched
        assert abs((~keep[:, 1]).mean() - eta) < 0.03, eta
    scenario = parse_scenario("rate:audio=0.5", modalities)
    assert np.array_equal(scenario_keep(keys, modalities, scenario, 0), scenario_keep(keys, modalities, scenario, 0))
    other_seed = scenario_keep(keys, modalities, scenario, 1)
    assert not np.array_equal(scenario_keep(keys, modalities, scenario, 0), other_seed)
    # by key, not by position: a reordered list gives each key the same flags
    keep = dict(zip(keys, scenario_keep(keys, modalities, scenario, 0)[:, 1]))
    rev = keys[::-1]
    assert [keep[k] for k in rev] == scenario_keep(rev, modalities, scenario, 0)[:, 1].tolist()
    assert not scenario_keep(keys, modalities, parse_scenario("missing:visual", modalities), 0)[:, 0].any()
    assert scenario_keep(keys, modalities, parse_scenario("full", modalities), 0).all()


# ----------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("num_shards", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_partition_the_split_like_shard_range(backend: str, num_shards: int, corpus: Corpus) -> None:
    parts = [[k for k, _ in rows(batches(corpus.path, backend, shard_id=s, num_shards=num_shards, crop=32))]
             for s in range(num_shards)]
    for s, part in enumerate(parts):
        assert part == [corpus.keys[i] for i in shard_range(N_CLIPS, s, num_shards)]
    flat = [k for part in parts for k in part]
    assert len(flat) == len(set(flat)) and sorted(flat) == sorted(corpus.keys)


def test_shard_range_rejects_a_shard_id_outside_the_world() -> None:
    with pytest.raises(ValueError, match="shard_id 2"):
        shard_range(10, 2, 2)


# ----------------------------------------------------------------------------------------------- training masks
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_augmentation_never_drops_everything_but_drops_each_modality(backend: str, corpus: Corpus) -> None:
    loader = make_loader(corpus.path, SPLIT, 4, backend=backend, train=True, augment=DROP_ONE, seed=1, crop=32,
                         num_workers=2)
    v, a = corpus.index("visual"), corpus.index("audio")
    got = rows(list(loader)) + rows(list(loader))  # two epochs
    assert len(got) == 2 * (N_CLIPS // 4) * 4
    assert all(any(p) for _, p in got), "a sample with every modality dropped"
    assert all(p[v] for k, p in got if k in corpus.no_audio), "visual dropped from a clip without audio"
    assert any(not p[v] for _, p in got), "visual never dropped"
    assert any(not p[a] for k, p in got if k not in corpus.no_audio), "audio never dropped"
    assert any(all(p) for _, p in got), "never both kept"


def test_torch_training_masks_are_reproducible_per_seed_and_epoch(corpus: Corpus) -> None:
    def masks(epoch: int, seed: int = 7, batch_size: int = 4) -> dict[str, tuple[bool, ...]]:
        return dict(rows(batches(corpus.path, "torch", batch_size, train=True, augment=DROP_ONE, seed=seed,
                                 epoch=epoch, crop=32)))

    first = masks(0)
    assert masks(0) == first
    by_two = masks(0, batch_size=2)  # masks follow the key, not the batch or position
    assert all(by_two[k] == first[k] for k in first.keys() & by_two.keys())
    assert masks(1) != first
    assert masks(0, seed=8) != first
    # the second epoch of one loader is what a fresh loader at epoch 1 yields (order and masks)
    loader = make_loader(corpus.path, SPLIT, 4, backend="torch", train=True, augment=DROP_ONE, seed=7, crop=32)
    list(loader)
    fresh = batches(corpus.path, "torch", train=True, augment=DROP_ONE, seed=7, epoch=1, crop=32)
    assert rows(list(loader)) == rows(fresh)


@needs_dali
def test_dali_training_masks_are_reproducible_per_seed(corpus: Corpus) -> None:
    def run(seed: int) -> list[tuple[str, tuple[bool, ...]]]:
        return rows(batches(corpus.path, "dali", train=True, augment=DROP_ONE, seed=seed, crop=32))

    first = run(11)
    assert run(11) == first
    assert run(12) != first


def test_dali_training_epochs_are_fresh_passes_fixed_by_seed_and_epoch(corpus: Corpus) -> None:
    loader = make_loader(corpus.path, "train", 4, backend="dali", train=True, seed=5, crop=32, num_workers=1)
    epochs = [[k for b in loader for k in b["key"]] for _ in range(3)]
    assert all(len(keys) == len(set(keys)) == len(loader) * 4 for keys in epochs)  # no sample twice in an epoch
    assert epochs[1] != epochs[0]  # reshuffled every epoch
    fresh = make_loader(corpus.path, "train", 4, backend="dali", train=True, seed=5, crop=32, num_workers=1, epoch=1)
    assert [k for b in fresh for k in b["key"]] == epochs[1]


def test_dropspec_check_rejects_bad_probabilities_and_unknown_modalities(corpus: Corpus) -> None:
    modalities = ["visual", "audio"]
    DROP_ONE.check(modalities)
    DropSpec("independent", {"visual": 0.3, "audio": 0.3}).check(modalities)
    with pytest.raises(ScenarioError, match="sum to 1"):
        DropSpec("drop_one", {"full": 0.5, "visual": 0.2, "audio": 0.2}).check(modalities)
    with pytest.raises(ScenarioError, match="text"):
        DropSpec("drop_one", {"full": 0.5, "text": 0.5}).check(modalities)
    with pytest.raises(ScenarioError, match="text"):
        DropSpec("independent", {"text": 0.5}).check(modalities)
    with pytest.raises(ScenarioError, match=r"\[0, 1\]"):
        DropSpec("independent", {"audio": 1.5}).check(modalities)
    with pytest.raises(ScenarioError, match="sum to 1"):  # make_loader checks the spec before reading shards
        make_loader(corpus.path, SPLIT, 4, backend="torch", train=True, augment=DropSpec("drop_one", {"full": 0.9}))


# ----------------------------------------------------------------------------------------------- dropped = not decoded
@pytest.mark.parametrize(("scenario", "expected_frames", "expected_audio"), [
    ("full", N_CLIPS, N_CLIPS - 4), ("missing:visual", 0, N_CLIPS - 4), ("missing:audio", N_CLIPS, 0)])
def test_torch_loader_decodes_only_present_modalities(scenario: str, expected_frames: int, expected_audio: int,
                                                      corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    import shards.torch_loader as torch_loader

    calls = {"frames": 0, "audio": 0}

    def counting(name: str, real: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch_loader, "decode_frames", counting("frames", torch_loader.decode_frames))
    monkeypatch.setattr(torch_loader, "decode_audio", counting("audio", torch_loader.decode_audio))
    got = batches(corpus.path, "torch", scenario=scenario, num_workers=0, crop=32)  # in-process: counts visible
    assert len(rows(got)) == N_CLIPS
    assert calls == {"frames": expected_frames, "audio": expected_audio}


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_modality_bytes_are_never_decoded(backend: str, corrupt_dir: tuple[Path, str, str]) -> None:
    """The corrupt JPEG is never touched when visual is dropped, so the epoch loads without error."""
    path, _, key = corrupt_dir
    got = rows(batches(path, backend, scenario="missing:visual", crop=32))
    assert len(got) == N_CLIPS and all(not p[0] for _, p in got) and key in dict(got)


# ----------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_resumes_mid_epoch_exactly(backend: str, corpus: Corpus) -> None:
    kwargs = dict(backend=backend, train=True, augment=DROP_ONE, seed=3, crop=32, num_workers=2)
    whole = list(make_loader(corpus.path, SPLIT, 2, **kwargs))
    assert len(whole) == N_CLIPS // 2
    loader = make_loader(corpus.path, SPLIT, 2, **kwargs)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 3
    resumed = make_loader(corpus.path, SPLIT, 2, **kwargs)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert rows(head) == rows(whole[:3])
    assert rows(tail) == rows(whole[3:])
    assert torch.equal(cat(tail, "label"), cat(whole[3:], "label"))
    assert torch.allclose(cat(tail, "visual"), cat(whole[3:], "visual"))  # same random crops and flips
    assert resumed.state_dict()["epoch"] == 1


@needs_dali
def test_dali_evaluation_with_a_scenario_resumes_mid_epoch(corpus: Corpus) -> None:
    kwargs = dict(backend="dali", scenario="rate:audio=0.5", crop=32, num_workers=2)
    whole = rows(list(make_loader(corpus.path, SPLIT, 2, **kwargs)))
    loader = make_loader(corpus.path, SPLIT, 2, **kwargs)
    it = iter(loader)
    head = rows([next(it) for _ in range(3)])
    resumed = make_loader(corpus.path, SPLIT, 2, **kwargs)
    resumed.load_state_dict(loader.state_dict())
    assert head + rows(list(resumed)) == whole


# ----------------------------------------------------------------------------------------------- bad input
@needs_dali
def test_dali_names_shard_and_key_of_an_undecodable_member(corrupt_dir: tuple[Path, str, str]) -> None:
    from shards.dali_loader import DecodeFailure

    path, tar, key = corrupt_dir
    with pytest.raises(DecodeFailure) as err:
        batches(path, "dali")
    assert tar in str(err.value) and key in str(err.value) and "f1.jpg" in str(err.value)


@needs_dali
def test_dali_names_shard_and_key_of_a_tar_cut_short(corpus: Corpus, tmp_path: Path) -> None:
    from shards.dali_loader import DecodeFailure

    path = tmp_path / "kinetics_sound"
    shutil.copytree(corpus.path, path)
    ref = split_samples(path, read_dataset_info(path), SPLIT)[5]  # the first sample of its tar past the cut
    with open(ref.tar, "r+b") as f:
        f.truncate(ref.members["f1.jpg"][0] + 10)
    with pytest.raises(DecodeFailure, match=f"shard {ref.tar}: sample {ref.key} cannot be read"):
        batches(path, "dali", crop=32)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_names_shard_and_key_of_an_undecodable_sample(num_workers: int,
                                                            corrupt_dir: tuple[Path, str, str]) -> None:
    from shards.torch_loader import SampleDecodeError

    path, tar, key = corrupt_dir
    with pytest.raises(SampleDecodeError) as err:
        batches(path, "torch", num_workers=num_workers)
    assert tar in str(err.value) and key in str(err.value)


def test_torch_skip_mode_skips_and_counts_an_undecodable_sample(corrupt_dir: tuple[Path, str, str]) -> None:
    path, _, key = corrupt_dir
    loader = make_loader(path, SPLIT, 4, backend="torch", on_error="skip", crop=32, num_workers=2)
    keys = [k for k, _ in rows(list(loader))]
    assert loader.skipped == 1
    assert len(keys) == N_CLIPS - 1 and key not in keys


@pytest.mark.parametrize("missing", ["tar", "idx"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_shard_or_index_is_named(backend: str, missing: str, corpus: Corpus, tmp_path: Path) -> None:
    path = tmp_path / "kinetics_sound"
    shutil.copytree(corpus.path, path)
    gone = path / SPLIT / f"000002.{missing}"
    gone.unlink()
    with pytest.raises(FormatError, match=str(gone)):
        make_loader(path, SPLIT, 4, backend=backend)


def test_a_newer_format_version_is_refused(corpus: Corpus, tmp_path: Path) -> None:
    path = tmp_path / "kinetics_sound"
    shutil.copytree(corpus.path, path)
    doc = json.loads((path / "dataset.json").read_text())
    doc["format_version"] = 2
    (path / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="format_version 2"):
        make_loader(path, SPLIT, 4, backend="torch")


def test_a_scenario_naming_an_absent_modality_lists_the_valid_ones(corpus: Corpus) -> None:
    with pytest.raises(ScenarioError, match="missing:text.*visual, audio"):
        make_loader(corpus.path, SPLIT, 4, backend="torch", scenario="missing:text")


def test_unknown_backend_and_options_are_refused(corpus: Corpus) -> None:
    with pytest.raises(ValueError, match="backend 'jax'"):
        make_loader(corpus.path, SPLIT, 4, backend="jax")
    with pytest.raises(ValueError, match="on_error"):
        make_loader(corpus.path, SPLIT, 4, backend="torch", on_error="ignore")
    with pytest.raises(ScenarioError, match="evaluation"):
        make_loader(corpus.path, SPLIT, 4, backend="torch", train=True, scenario="missing:audio")


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_workers_run_the_same_number_of_steps(backend: str, corpus: Corpus) -> None:
    """Parts of 3 and 4 samples at batch 2 would give 1 or 2 steps; DDP needs every worker equal."""
    lengths = [len(make_loader(corpus.path, "train", 2, backend=backend, train=True, shard_id=i, num_shards=4,
                               crop=32, num_workers=0 if backend == "torch" else 1)) for i in range(4)]
    assert lengths == [1, 1, 1, 1]
    assert training_steps(len(corpus.keys), 4, 2) == 1 and training_steps(len(corpus.keys), 1, 2) == 7


@needs_dali
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_gpu_pipeline_graph_is_well_formed_without_a_gpu(train: bool, corpus: Corpus) -> None:
    """Defining the device="gpu" graph needs no GPU: it checks that both branches of every conditional end
    on the same device and layout (nvJPEG frames vs zero frames, GPU log-mel vs zeros)."""
    loader = make_loader(corpus.path, SPLIT, 4, backend="dali", device="gpu", train=train,
                         augment=DROP_ONE if train else None, scenario="full" if train else "rate:audio=0.5",
                         crop=64, num_workers=1, device_id=0)
    pipe = loader.make_pipeline()
    pipe._build_graph()  # raises on a CPU input to a GPU operator (e.g. a branch merge)
    devices = [out.device for out in pipe._graph_outputs]
    # visual, audio on the GPU; the decoded frames' shapes (checked on the host) on the CPU
    assert devices == ["gpu", "gpu", "cpu"]


@needs_dali
def test_dali_evaluation_builds_its_pipeline_once_for_every_pass(corpus: Corpus, epoch_of) -> None:
    """A validation loader is iterated once per training epoch: its later passes reuse the pipeline (no build,
    which costs seconds on a GPU host) and yield exactly what a fresh loader yields, masks included."""
    loader = make_loader(corpus.path, SPLIT, 4, backend="dali", scenario="rate:audio=0.5", crop=32, num_workers=2)
    builds = []
    make = loader.make_pipeline
    loader.make_pipeline = lambda: builds.append(1) or make()
    passes = [list(loader) for _ in range(3)]
    assert len(builds) == 1
    fresh = epoch_of("dali", crop=32, scenario="rate:audio=0.5")
    for got in passes:
        assert rows(got) == rows(fresh)
        assert torch.equal(cat(got, "visual"), cat(fresh, "visual"))
        assert torch.equal(cat(got, "audio"), cat(fresh, "audio"))
    half = next(iter(loader))  # a pass stopped early, then a new epoch: a fresh pipeline, the same batches
    loader.set_epoch(loader.epoch + 1)
    assert rows([half]) == rows(fresh[:1]) and rows(list(loader)) == rows(fresh)
    assert len(builds) == 2


@needs_dali
def test_dali_training_builds_one_pipeline_for_every_epoch(corpus: Corpus) -> None:
    """Epochs differ (order, masks, crops) but share the pipeline: the host feeds each epoch's draws."""
    kwargs = dict(train=True, augment=DROP_ONE, seed=4, crop=32, num_workers=2)
    loader = make_loader(corpus.path, SPLIT, 4, backend="dali", **kwargs)
    builds = []
    make = loader.make_pipeline
    loader.make_pipeline = lambda: builds.append(1) or make()
    epochs = [list(loader) for _ in range(3)]
    assert len(builds) == 1
    for epoch, got in enumerate(epochs):
        fresh = batches(corpus.path, "dali", epoch=epoch, **kwargs)
        assert rows(got) == rows(fresh)
        assert torch.equal(cat(got, "visual"), cat(fresh, "visual"))


# ----------------------------------------------------------------------------------------------- on a GPU
# Skipped without a CUDA device (CI has none); `pytest tests/test_loader.py -k gpu` on a GPU machine runs them.
# nvJPEG and the GPU resize/FFT are not bit-identical to their CPU counterparts: the tolerances are those
# of the DALI/torch parity above.
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_dali
@needs_gpu
@pytest.mark.parametrize("scenario", ["full", "rate:audio=0.5"])
@pytest.mark.parametrize("crop", [64, NO_RESIZE_CROP], ids=["resize", "no_resize"])
def test_dali_gpu_agrees_with_dali_cpu_in_evaluation(scenario: str, crop: int, corpus: Corpus, epoch_of) -> None:
    gpu = epoch_of("dali", crop=crop, scenario=scenario, device="gpu", device_id=0)
    cpu = epoch_of("dali", crop=crop, scenario=scenario)
    assert all(b["visual"].is_cuda and b["audio"].is_cuda for b in gpu)
    check_contract(corpus, [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in gpu], crop)
    assert rows(gpu) == rows(cpu)
    visual = (cat(gpu, "visual").cpu() - cat(cpu, "visual")).abs()
    audio = (cat(gpu, "audio").cpu() - cat(cpu, "audio")).abs()
    print(f"dali gpu vs cpu, crop {crop}, {scenario}: visual max {visual.max():.4g} mean {visual.mean():.3g}, "
          f"audio max {audio.max():.4g}")
    assert visual.max() <= VISUAL_MAX_TOL and visual.mean() <= VISUAL_MEAN_TOL, (visual.max(), visual.mean())
    assert audio.max() <= AUDIO_TOL, audio.max()


@needs_dali
@needs_gpu
def test_dali_gpu_training_masks_are_the_cpu_pipelines(corpus: Corpus) -> None:
    """The drop draws do not depend on the device: a GPU run resumed on a CPU (or compared with one) sees the
    same present flags for the same seed and epoch."""
    kwargs = dict(train=True, augment=DROP_ONE, seed=11, crop=32)
    gpu = batches(corpus.path, "dali", device="gpu", device_id=0, **kwargs)
    assert all(b["visual"].is_cuda for b in gpu)
    assert rows(gpu) == rows(batches(corpus.path, "dali", **kwargs))


@needs_gpu
def test_torch_loader_on_a_gpu_yields_the_cpu_batches_on_the_device(corpus: Corpus) -> None:
    gpu = batches(corpus.path, "torch", device="gpu", device_id=0, scenario="missing:audio")
    cpu = batches(corpus.path, "torch", scenario="missing:audio")
    assert rows(gpu) == rows(cpu)
    for name in ("visual", "audio", "present", "label"):
        assert cat(gpu, name).is_cuda
        assert torch.equal(cat(gpu, name).cpu(), cat(cpu, name)), name
