"""What the two loaders share (`shards.batches`, `shards.members`, `ModalityParams.shape`) and the direction of
the dependencies: `shards/` reads the format and never imports `pipeline/`, whose encoder uses the member
codec of `shards.members`.

Pinned: no module of shards/ imports pipeline/; one audio-member codec; make_loader's arguments become one
`LoaderOptions` and one `WorkerPart` that both loaders keep; both loaders are `EpochLoader`s, whose protocol
(len, epochs that advance only when run to the end, resume from (epoch, batches consumed), set_epoch,
batches with nothing to yield counted but not yielded) is checked on a loader of plain dicts; absent
modalities are zeros of `ModalityParams.shape`."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shards.batches import EpochLoader, LoaderOptions, WorkerPart
from shards.features import modality_params
from shards.format import read_dataset_info
from shards.loader import dali_available, make_loader
from tests.conftest import BuiltDataset

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")),
            "torch"]
pytestmark = pytest.mark.filterwarnings(
    "ignore:Checkpointing enabled in a pipeline with external source:UserWarning")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_nothing_in_shards_imports_pipeline() -> None:
    offenders = {path.name: sorted(m for m in imported_modules(path) if m.split(".")[0] == "pipeline")
                 for path in sorted((ROOT / "shards").glob("*.py"))}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_build_encodes_with_the_member_codec_of_shards() -> None:
    from pipeline import encode
    from shards import members

    assert encode.decode_audio_member is members.decode_audio_member


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_loader_builds_one_options_object_and_one_worker_part(backend: str,
                                                                   kinetics_sound_built: BuiltDataset) -> None:
    loader = make_loader(kinetics_sound_built.path, "train", 2, backend=backend, train=True, crop=32, num_workers=1,
                         flip=False, min_crop_area=0.5, shard_id=1, num_shards=2, seed=7, epoch=3)
    assert isinstance(loader, EpochLoader) and type(loader).__module__ == f"shards.{backend}_loader"
    assert loader.options == LoaderOptions(backend, "cpu", 1, 32, 0.5, False, "raise", None)
    assert loader.part == WorkerPart(1, 2, 7, 3) and loader.epoch == 3


def test_options_and_parts_refuse_what_no_loader_can_do() -> None:
    with pytest.raises(ValueError, match="device 'tpu'"):
        LoaderOptions(device="tpu")
    with pytest.raises(ValueError, match="on_error='skip' needs backend='torch'"):
        LoaderOptions(backend="dali", on_error="skip")
    with pytest.raises(ValueError, match="shard_id 3"):
        WorkerPart(3, 2)
    assert WorkerPart(1, 3).of(10) == range(3, 6)


class ListLoader(EpochLoader):
    """An EpochLoader over fixed batches: batch i of epoch e is {"key": [f"{e}:{i}"]}, None when i == skip."""

    def __init__(self, n_batches: int, skip: int | None = None, **part) -> None:
        super().__init__(2 * n_batches, 2, False, WorkerPart(**part), LoaderOptions())
        self.skip = skip

    def _epoch_batches(self) -> Iterator[dict | None]:
        for i in range(self.batches_done, len(self)):
            yield None if i == self.skip else {"key": [f"{self.epoch}:{i}"]}


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_the_epoch_protocol_advances_resumes_and_restarts() -> None:
    loader = ListLoader(4, epoch=2)
    assert len(loader) == 4
    it = iter(loader)
    assert keys([next(it), next(it)]) == ["2:0", "2:1"]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_done": 2}
    del it  # stopped early: the epoch does not advance
    assert loader.epoch == 2
    resumed = ListLoader(4)
    resumed.load_state_dict(state)
    assert keys(resumed) == ["2:2", "2:3"] and resumed.state_dict() == {"epoch": 3, "batches_done": 0}
    assert keys(resumed) == ["3:0", "3:1", "3:2", "3:3"]
    resumed.set_epoch(7)
    assert keys(resumed) == [f"7:{i}" for i in range(4)]


def test_a_batch_with_nothing_to_yield_counts_as_a_step() -> None:
    loader = ListLoader(3, skip=1)
    assert keys(loader) == ["0:0", "0:2"] and loader.epoch == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_absent_modalities_are_zeros_of_the_modality_shape(backend: str, kinetics_sound_built: BuiltDataset) -> None:
    info = read_dataset_info(kinetics_sound_built.path)
    params = modality_params(info, 32)
    assert params.shape("visual") == (info.visual["frames"], 3, 32, 32)
    assert params.shape("audio") == (1, params.audio.n_mels, params.audio.n_frames)
    batches = list(make_loader(kinetics_sound_built.path, "train", 2, backend=backend, crop=32, num_workers=1,
                               scenario="missing:audio"))
    audio = torch.cat([b["audio"] for b in batches])
    assert audio.shape[1:] == params.shape("audio") and torch.count_nonzero(audio) == 0
    assert torch.cat([b["visual"] for b in batches]).shape[1:] == params.shape("visual")
