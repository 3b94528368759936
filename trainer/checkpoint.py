"""Checkpoints: one directory per epoch holding `state.pt` (rank 0: model, optimizer, scheduler, epoch,
RNG, config, metrics, the checkpoint the stage started from) and `loader-rank<r>.pt` (each worker's loader
position). Everything is saved as tensors and plain Python values so `torch.load(weights_only=True)` reads
it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model being built (another dataset, encoder or fusion)."""


def save_state(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               scheduler: Any, epoch: int, stage: str, config: dict, metrics: dict,
               init: dict | None = None, progress: dict | None = None) -> None:
    """Write state.pt (model weights unwrapped from DDP); `init` names the checkpoint the stage started
    from (mma: the UME checkpoint's directory name and epoch), so a rerun can tell when it changed.
    `progress` is set in a checkpoint written inside an epoch (`train.checkpoint_every_steps`): `epoch`
    epochs are done and the next one has run `progress["steps"]` steps, with its running loss sum, samples,
    data wait and time so far, and the world size it ran on."""
    state = {
        "init": init,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "epoch": epoch,
        "stage": stage,
        "config": config,
        "metrics": metrics,
        "torch_rng": torch.get_rng_state(),
        "progress": progress,
    }
    torch.save(state, directory / STATE_FILE)


def save_loader_state(directory: Path, rank: int, loader_state: dict) -> None:
    torch.save(loader_state, directory / f"loader-rank{rank}.pt")


def load_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a checkpoint written by trainer/launch.py")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_loader_state(directory: str | Path, rank: int) -> dict | None:
    path = Path(directory) / f"loader-rank{rank}.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load model weights, or explain which keys or shapes do not match and why that happens."""
    own = unwrap(model).state_dict()
    theirs = state["model"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = [k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape mismatch {sorted(shapes)[:3]}" if shapes else "") if part)
        raise CheckpointMismatch(
            f"checkpoint {source} does not fit this model ({detail}); it was trained with another dataset, "
            f"encoder, width or fusion - use the matching config or a checkpoint of this one")
    unwrap(model).load_state_dict(theirs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel, or the model itself."""
    return getattr(model, "module", model)
