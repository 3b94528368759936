"""What the DALI and torch loaders share beyond what their libraries force on them.

`LoaderOptions` (how to load: backend, device, workers, crop, flip, error policy) and `WorkerPart` (which
part of the split and which random stream: shard id, number of shards, seed, epoch) are what
`shards.loader.make_loader` builds from its arguments; `EpochLoader` is the epoch and resume protocol
(`len`, `set_epoch`, `state_dict`, `load_state_dict`, epochs that end and advance themselves), and
`assemble_batch` the batch dict of DESIGN.md. Each loader only says how it decodes a batch."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from shards.features import ModalityParams
from shards.format import MODALITIES
from shards.masks import DropSpec, augment_keep, resolve_present
from shards.sample_refs import SampleRef, shard_range, training_steps

BACKENDS = ("auto", "dali", "torch")
DEVICES = ("cpu", "gpu")
ERROR_POLICIES = ("raise", "skip")
_END = object()  # no more batches this epoch


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are made. `workers`: DataLoader processes (torch) or DALI threads; training frames get a
    random-resized crop of `min_crop_area`..100% of the frame and, with `flip`, a horizontal flip; `crop`
    None means dataset.json's; `on_error="skip"` (torch only) drops samples that do not decode;
    `device_id` is the CUDA device of `device="gpu"`."""

    backend: str = "auto"
    device: str = "cpu"
    workers: int = 2
    crop: int | None = None
    min_crop_area: float = 0.35
    flip: bool = True
    on_error: str = "raise"
    device_id: int | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("backend", self.backend, BACKENDS), ("device", self.device, DEVICES),
                                     ("on_error", self.on_error, ERROR_POLICIES)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: use one of {', '.join(allowed)}")
        if self.backend == "dali" and self.on_error == "skip":
            raise ValueError("on_error='skip' needs backend='torch': a DALI pipeline stops at the first bad member")

    @property
    def gpu(self) -> bool:
        return self.device == "gpu"


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of a training epoch over a split's n samples: one permutation fixed by (seed, epoch), the same
    on every worker whatever the number of workers."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class WorkerPart:
    """One worker's share: worker `shard_id` of `num_shards`, the `seed` of its shuffles and masks, and the
    epoch it starts at. In evaluation a worker reads a contiguous part of the split (`of`, the rule of
    `shards.sample_refs.shard_range`); in training a strided slice of the epoch's order (`positions`)."""

    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        shard_range(0, self.shard_id, self.num_shards)  # raises for a shard id outside the world

    def of(self, n: int) -> range:
        """The indices of this part among n samples."""
        return shard_range(n, self.shard_id, self.num_shards)

    def positions(self, n: int, epoch: int, start: int, count: int) -> np.ndarray:
        """The split indices this worker trains on in `epoch`, from global position `start` of the epoch's order
        on: every `num_shards`-th one, `count` of them. A step of W workers with batch B consumes positions
        [start + k W B, start + (k + 1) W B) of the order, so the samples consumed are a prefix of the order
        for any W, and a run resumed at position `start` on another number of workers sees each of the
        others exactly once."""
        return epoch_order(n, self.seed, epoch)[start + self.shard_id::self.num_shards][:count]


class EpochLoader:
    """Epochs of batches with resume: `len` is the steps of an epoch (in training the same on every worker,
    so DDP workers step together), an epoch that runs to its end moves on to the next, `state_dict` /
    `load_state_dict` carry (epoch, batches consumed, and in training the global position in the epoch's
    order), and `set_epoch` starts another epoch from its first batch. `part` and `options` are kept as
    make_loader built them. A subclass yields the current epoch's batches from batch `batches_done` on
    (`_epoch_batches`), reading the samples `indices()` names.

    Resume on another number of workers (or batch size): a training state also holds `samples_done`, the
    epoch's samples consumed by all workers together (a prefix of the epoch's order, see
    `WorkerPart.positions`); a loader of another world size goes on from there (`start`), with the epoch's
    remaining samples split among its workers, each seen once."""

    def __init__(self, total: int, batch_size: int, train: bool, part: WorkerPart, options: LoaderOptions) -> None:
        self.batch_size, self.train, self.part, self.options = batch_size, train, part, options
        self._total, self._part_size = total, len(part.of(total))
        self.epoch, self.batches_done = part.epoch, 0
        self.start = 0  # training: the epoch's samples consumed before this loader's pass (a resume), all workers

    def __len__(self) -> int:
        """The steps of the current epoch from `start` on: after a resize, the full batches of every worker
        that the rest of the order holds (none when less than a step's samples is left: an uninterrupted
        epoch drops such a tail too, and every worker must run the same number of steps)."""
        if self.train and self.start:
            return (self._total - self.start) // self.part.num_shards // self.batch_size
        return self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """The steps of a whole epoch (the same on every worker in training)."""
        if self.train:
            return training_steps(self._total, self.part.num_shards, self.batch_size)
        return -(-self._part_size // self.batch_size)

    def indices(self) -> np.ndarray:
        """The split indices of this worker's samples in the current epoch, in the order they are batched."""
        if self.train:
            return self.part.positions(self._total, self.epoch, self.start, len(self) * self.batch_size)
        part = self.part.of(self._total)
        return np.arange(part.start, part.stop)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "batches_done": self.batches_done}
        if self.train:
            state.update(start=self.start, num_shards=self.part.num_shards, batch_size=self.batch_size,
                         samples_done=self.start + self.batches_done * self.batch_size * self.part.num_shards)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        same = (state.get("num_shards", self.part.num_shards) == self.part.num_shards
                and state.get("batch_size", self.batch_size) == self.batch_size)
        if same or not self.train:
            self.start, self.batches_done = state.get("start", 0), state["batches_done"]
        else:  # another world size: go on from the epoch's global position
            self.start, self.batches_done = min(state["samples_done"], self._total), 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done, self.start = epoch, 0, 0

    def __iter__(self) -> Iterator[dict]:
        batches = self._epoch_batches()
        try:
            while self.batches_done < len(self):
                batch = next(batches, _END)
                if batch is _END:
                    break
                self.batches_done += 1
                if batch is not None:
                    yield batch
        finally:  # also when the consumer stops early
            batches.close()
        self._epoch_done()
        self.epoch, self.batches_done, self.start = self.epoch + 1, 0, 0

    def _epoch_batches(self) -> Iterator[dict | None]:
        """The current epoch's batches from batch `batches_done` on; None for a batch with nothing to yield."""
        raise NotImplementedError

    def _epoch_done(self) -> None:
        """Called when an epoch has run to its end, before the epoch counter moves on."""


def present_flags(refs: list[SampleRef], indices: np.ndarray, params: ModalityParams, modalities: list[str], *,
                  train: bool, augment: DropSpec | None, eval_keep: np.ndarray | None, seed: int,
                  epoch: int) -> np.ndarray:
    """bool [B, M]: which modalities each sample `refs[i]` (i in `indices`, split positions) is decoded with:
    what its members hold, kept by the evaluation scenario's mask or the epoch's training draws (by key), and
    in training never nothing of what it has. Both loaders decide with this, so they agree sample by sample."""
    batch = [refs[i] for i in indices]
    has = np.array([params.has(ref.members, modalities) for ref in batch], dtype=bool).reshape(len(batch), -1)
    if eval_keep is not None:
        keep = eval_keep[indices]
    elif train and augment is not None and augment.active:
        keep = augment_keep([ref.key for ref in batch], modalities, augment, seed, epoch)
    else:
        keep = np.ones_like(has)
    return resolve_present(has, keep, never_all=train)


def assemble_batch(tensors: dict[str, torch.Tensor], present: torch.Tensor | np.ndarray, labels: np.ndarray,
                   keys: list[str], multilabel: bool) -> dict:
    """The batch dict of DESIGN.md in its order: visual, audio, text (those in `tensors`; text as int64),
    present (bool [B, M]), label (int64 [B], or float32 [B, C] multi-hot), key."""
    batch = {m: tensors[m] for m in MODALITIES if m in tensors}
    if "text" in batch:
        batch["text"] = batch["text"].long()
    batch["present"] = torch.as_tensor(present).bool()
    labels = np.asarray(labels)
    batch["label"] = torch.from_numpy(labels.astype(np.float32) if multilabel else labels.reshape(-1).astype(np.int64))
    batch["key"] = list(keys)
    return batch
