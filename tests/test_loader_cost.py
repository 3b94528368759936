"""What a sample costs the loaders, pinned as behaviour (README "Performance" has the measured figures).

Torch loader: DataLoader workers persist from epoch to epoch; each tar is opened once per process, not once
per member; a training crop that keeps few enough of the stored pixels decodes the JPEG at a reduced scale
(`Image.draft`, never below the crop) and is close to the full decode; PyAV and Pillow's JPEG plugin are
imported before the workers fork; `device="gpu"` without CUDA is refused by name. DALI: training decodes
only the crop window (`random_crop_generator` + `decoders.image_slice`), evaluation whole frames (so its
pixels stay those of the resize-and-centre-crop that the parity test pins); an epoch's pipeline prefetches
within the epoch but never past its last batch; without random drops no mask operators are added; batches
(views of DALI's buffers, not copies) keep their values while later epochs run."""
from __future__ import annotations

import builtins
import io
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from shards.features import VisualParams
from shards.format import read_dataset_info
from shards.loader import dali_available, make_loader
from shards.masks import DropSpec
from tests.conftest import BuiltDataset

ROOT = Path(__file__).resolve().parent.parent
SPLIT = "train"
pytestmark = pytest.mark.filterwarnings(
    "ignore:Checkpointing enabled in a pipeline with external source:UserWarning")


def synthetic_jpeg(width: int = 340, height: int = 256) -> bytes:
    """A Kinetics-sized frame with gradients and texture, as the build stores it (quality 90)."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([(x * 0.7) % 256, (y * 0.9) % 256, 128 + 60 * np.sin(x / 9) * np.cos(y / 7)], -1)
    buf = io.BytesIO()
    Image.fromarray(frame.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- torch
def test_torch_workers_persist_across_epochs(kinetics_sound_built: BuiltDataset) -> None:
    before = {p.pid for p in multiprocessing.active_children()}
    loader = make_loader(kinetics_sound_built.path, SPLIT, 2, backend="torch", train=True, crop=32, num_workers=2)
    workers = []
    for _ in range(2):
        assert list(loader)
        workers.append({p.pid for p in multiprocessing.active_children()} - before)
    assert len(workers[0]) == 2 and workers[1] == workers[0]


def test_torch_loader_opens_each_tar_once_per_process(kinetics_sound_built: BuiltDataset,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def counting(real):
        def wrapper(path, *args, **kwargs):
            if str(path).endswith(".tar"):
                opened.append(str(path))
            return real(path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(os, "open", counting(os.open))
    loader = make_loader(kinetics_sound_built.path, SPLIT, 2, backend="torch", train=True, crop=32, num_workers=0)
    for _ in range(2):
        assert list(loader)
    tars = {str(kinetics_sound_built.path / s.path) for s in read_dataset_info(kinetics_sound_built.path).shards_of(SPLIT)}
    assert sorted(opened) == sorted(tars)


@pytest.mark.parametrize(("crop", "scale"), [(32, 4), (224, 1)])
def test_training_crops_decode_the_jpeg_at_a_reduced_scale_when_the_crop_allows(
        crop: int, scale: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crop of 32 from a box of at least ~150 px decodes at 1/4; a crop of 224 from a 256-px frame cannot
    (1/2 would leave fewer pixels than the crop). The reduced decode stays close to the full one."""
    from shards.torch_loader import decode_frames

    params = VisualParams(3, crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    jpegs = [synthetic_jpeg()] * 3
    scales: list[int] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def recording(self, mode, size):
        drafted = real(self, mode, size)
        scales.append(round(self.decoderconfig[0]) if drafted else 1)
        return drafted

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording)
    reduced = decode_frames(jpegs, params, np.random.default_rng(1))
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)
    full = decode_frames(jpegs, params, np.random.default_rng(1))
    assert scales == [scale] * 3
    assert reduced.shape == full.shape == (3, 3, crop, crop) and reduced.dtype == torch.float32
    difference = (reduced - full).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.15, (difference.mean(), difference.max())


def test_heavy_decoders_are_imported_before_the_workers_fork() -> None:
    code = ("import sys; import shards.torch_loader; "
            "print(all(m in sys.modules for m in ('av', 'PIL.JpegImagePlugin')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the torch loader copies batches to it")
def test_torch_loader_on_gpu_without_cuda_is_refused_by_name(kinetics_sound_built: BuiltDataset) -> None:
    with pytest.raises(RuntimeError, match="device='gpu' with backend='torch' needs a CUDA"):
        make_loader(kinetics_sound_built.path, SPLIT, 2, backend="torch", device="gpu")


# ----------------------------------------------------------------------------------------------- DALI
@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dali_training_decodes_only_the_crop_window(train: bool, kinetics_sound_built: BuiltDataset) -> None:
    loader = make_loader(kinetics_sound_built.path, SPLIT, 2, backend="dali", train=train, crop=32, num_workers=1)
    operators = set(re.findall(rb"decoders__\w+|RandomCropGenerator|PeekImageShape",
                               loader.make_pipeline().serialize()))
    images = {op for op in operators if op.startswith(b"decoders__Image")}
    assert images == ({b"decoders__ImageSlice"} if train else {b"decoders__Image"})
    assert b"RandomCropGenerator" not in operators and b"PeekImageShape" in operators  # the window comes from the host


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_prefetches_within_the_epoch_but_never_past_it(kinetics_sound_built: BuiltDataset) -> None:
    """The source ends each pass at its last batch (StopIteration), so no iteration is scheduled past it (what
    `Pipeline.run` would prefetch and decode for nothing); batches before it are prefetched."""
    loader = make_loader(kinetics_sound_built.path, SPLIT, 1, backend="dali", train=True, crop=32, num_workers=1)
    steps = len(loader)
    assert steps >= 3
    in_flight = []
    for _batch in loader:
        in_flight.append(not loader._pipe.empty())
    assert in_flight == [True] * (steps - 1) + [False]


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_masks_add_no_operators(kinetics_sound_built: BuiltDataset) -> None:
    """The present flags are resolved on the host (natural missingness, draws, "never drop everything") and
    fed with the members: the graph has no mask arithmetic, with or without random drops."""
    def expressions(augment: DropSpec | None) -> list[bytes]:
        loader = make_loader(kinetics_sound_built.path, SPLIT, 2, backend="dali", train=True, augment=augment,
                             crop=32, num_workers=1)
        return sorted(re.findall(rb"([a-z]+)\(&", loader.make_pipeline().serialize()))

    assert expressions(None) == expressions(DropSpec("independent", {"visual": 0.3, "audio": 0.3})) == []


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_batches_keep_their_values_after_later_epochs(kinetics_sound_built: BuiltDataset) -> None:
    """CPU batches are views of DALI's output buffers (no copy): they must stay intact while later batches
    and epochs (new pipelines) run. Compared with a fresh loader's epoch 0, copied batch by batch."""
    def loader():
        return make_loader(kinetics_sound_built.path, SPLIT, 2, backend="dali", train=True, crop=32, num_workers=1)

    reference = [{k: v.clone() for k, v in batch.items() if torch.is_tensor(v)} for batch in loader()]
    held_loader = loader()
    held = list(held_loader)
    for _ in range(2):
        assert list(held_loader)
    assert len(held) == len(reference)
    for batch, expected in zip(held, reference):
        for name, tensor in expected.items():
            assert torch.equal(batch[name], tensor), name
