"""One entry point for both loaders: `make_loader(dataset_dir, split, batch_size, ...)`.

Everything about the data comes from `dataset.json`; the caller chooses the backend, device, training
augmentation or evaluation scenario, its part of the data (shard id / number of shards), seed and
epoch. Both backends yield the dicts of DESIGN.md: visual, audio, text (those the dataset has), present,
label, key."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from shards.format import read_dataset_info
from shards.samples import split_samples
from shards.scenarios import DropSpec, ScenarioError, parse_scenario, scenario_keep

log = logging.getLogger(__name__)
BACKENDS = ("auto", "dali", "torch")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def make_loader(dataset_dir: str | Path, split: str, batch_size: int, *, backend: str = "auto",
                device: str = "cpu", train: bool = False, augment: DropSpec | None = None,
                scenario: str = "full", shard_id: int = 0, num_shards: int = 1, seed: int = 0, epoch: int = 0,
                crop: int | None = None, num_workers: int = 2, device_id: int | None = None,
                on_error: str = "raise", min_crop_area: float = 0.35, flip: bool = True):
    """A DaliLoader or TorchLoader over this worker's part of `split`.

    `augment` applies in training only; `scenario` (full, missing:<m>, rate:<m>=<eta>) in evaluation only.
    Training frames get a random-resized crop of `min_crop_area`..100% of the frame and, with `flip`, a
    horizontal flip (turn it off for digits and text-like images).
    `device="gpu"` needs DALI and a CUDA device (`device_id`, e.g. from `ray.train.torch.get_device()`)."""
    dataset_dir = Path(dataset_dir)
    info = read_dataset_info(dataset_dir)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device {device!r}: use cpu or gpu")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error {on_error!r}: use raise or skip")
    if train and scenario != "full":
        raise ScenarioError("evaluation scenarios apply to evaluation loaders; use `augment` for training")
    if augment is not None:
        augment.check(info.modalities)
    refs = split_samples(dataset_dir, info, split)
    eval_keep = None
    if not train:
        keep = scenario_keep([r.key for r in refs], info.modalities, parse_scenario(scenario, info.modalities), seed)
        eval_keep = None if keep.all() else keep
    if backend == "dali" and on_error == "skip":
        raise ValueError("on_error='skip' needs backend='torch': a DALI pipeline stops at the first bad member")
    if backend == "auto":
        backend = "dali" if dali_available() and on_error == "raise" else "torch"
    if backend == "dali":
        if not dali_available():
            raise RuntimeError("backend 'dali' needs nvidia-dali (pip install nvidia-dali-cuda120==2.4.0); "
                               "or use backend='torch'")
        from shards.dali_loader import DaliLoader

        if eval_keep is None and not train:
            eval_keep = np.ones((len(refs), len(info.modalities)), dtype=bool)
        return DaliLoader(info, refs, batch_size, device=device, train=train, augment=augment, eval_keep=eval_keep,
                          shard_id=shard_id, num_shards=num_shards, seed=seed, epoch=epoch, crop=crop,
                          num_threads=max(1, num_workers), device_id=device_id if device_id is not None else 0,
                          min_crop_area=min_crop_area, flip=flip)
    if device == "gpu":
        log.warning("the torch loader decodes on the CPU; move batches to the GPU in the training loop")
    from shards.torch_loader import TorchLoader

    return TorchLoader(info, refs, batch_size, train=train, augment=augment, eval_keep=eval_keep,
                       shard_id=shard_id, num_shards=num_shards, seed=seed, epoch=epoch, crop=crop,
                       num_workers=num_workers, on_error=on_error, min_crop_area=min_crop_area, flip=flip)
