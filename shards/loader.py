"""One entry point for both loaders: `make_loader(dataset_dir, split, batch_size, ...)`.

Everything about the data comes from `dataset.json`; the caller chooses the backend, device, training
augmentation or evaluation scenario, its part of the data (shard id / number of shards), seed and
epoch. Both backends yield the dicts of DESIGN.md: visual, audio, text (those the dataset has), present,
label, key; with `device="gpu"` their tensors are on the GPU. The arguments become a `LoaderOptions` and a
`WorkerPart` (`shards.batches`), which both loaders take."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from shards.batches import LoaderOptions, WorkerPart
from shards.format import read_dataset_info
from shards.masks import DropSpec, ScenarioError, parse_scenario, scenario_keep
from shards.sample_refs import split_samples


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
    `device="gpu"` needs a CUDA device (`device_id`, e.g. from `ray.train.torch.get_device()`): DALI decodes
    there; the torch loader decodes on the CPU and copies pinned batches to it without blocking."""
    dataset_dir = Path(dataset_dir)
    info = read_dataset_info(dataset_dir)
    options = LoaderOptions(backend, device, num_workers, crop, min_crop_area, flip, on_error, device_id)
    part = WorkerPart(shard_id, num_shards, seed, epoch)
    if train and scenario != "full":
        raise ScenarioError("evaluation scenarios apply to evaluation loaders; use `augment` for training")
    if augment is not None:
        augment.check(info.modalities)
    refs = split_samples(dataset_dir, info, split)
    eval_keep = None
    if not train:
        keep = scenario_keep([r.key for r in refs], info.modalities, parse_scenario(scenario, info.modalities), seed)
        eval_keep = None if keep.all() else keep
    if options.backend == "auto":
        options = dataclasses.replace(options, backend="dali" if dali_available() and on_error == "raise" else "torch")
    if options.backend == "dali":
        if not dali_available():
            raise RuntimeError("backend 'dali' needs nvidia-dali (pip install nvidia-dali-cuda120==2.4.0); "
                               "or use backend='torch'")
        from shards.dali_loader import DaliLoader

        return DaliLoader(info, refs, batch_size, train=train, augment=augment, eval_keep=eval_keep, part=part,
                          options=options)
    if options.gpu and not torch.cuda.is_available():
        raise RuntimeError("device='gpu' with backend='torch' needs a CUDA build of PyTorch and a visible GPU "
                           "(torch.cuda.is_available() is False); use device='cpu'")
    from shards.torch_loader import TorchLoader

    return TorchLoader(info, refs, batch_size, train=train, augment=augment, eval_keep=eval_keep, part=part,
                       options=options)
