"""The torch loader: the same batches as the DALI loader from PyTorch DataLoader workers.

It reads members by the offsets in the `.idx` files (random access into the tars, each tar opened once per
worker: `ShardFiles`), decodes JPEG with Pillow and WAV/FLAC with `shards.members`, and computes the log-mel
with `shards.features`, which reproduces DALI's operators; stored spectrograms and token ids are read as
typed payloads. It is the fallback where DALI is absent and the baseline in benchmarks. Masks come from
hashes of the keys, so a dropped modality is never decoded here either. Every decoded frame is checked
against the size the build recorded for its sample (`SampleRef.frame_size`). In training a worker reads its
strided slice of the epoch's permutation of the whole split (`WorkerPart.positions`), as the DALI loader
does: the two backends batch the same samples in the same order with the same masks and crop windows.

Cost per sample: the DataLoader workers persist across epochs (the sampler hands each its sample's epoch
with the index); training crops that keep at most half of the stored frame's pixels in each direction decode
the JPEG at 1/2, 1/4 or 1/8 scale (`Image.draft`, DCT scaling, never below the crop); frames are normalised
in place by torch; batches are stacked straight into shared memory; and on a GPU (`device="gpu"`) they are
pinned and copied without blocking. Pillow's JPEG plugin and PyAV are imported here, before the workers fork."""
from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, JpegImagePlugin  # noqa: F401  (the JPEG plugin loaded before the workers fork)
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from shards.batches import EpochLoader, LoaderOptions, WorkerPart, assemble_batch, present_flags
from shards.features import (
    ModalityParams,
    VisualParams,
    crop_rng,
    log_mel,
    mel_filters,
    modality_params,
    training_window,
)
from shards.format import MODALITIES, NPY_HEADER_BYTES, DatasetInfo, frame_member, npy_payload
from shards.masks import DropSpec
from shards.members import ShardFiles, decode_audio_member
from shards.sample_refs import FrameSizeError, SampleRef

log = logging.getLogger(__name__)


class SampleDecodeError(RuntimeError):
    """A member that does not decode, or decodes to another frame size than recorded, with the shard and key."""


def decode_frames(jpegs: list[bytes], p: VisualParams, rng: np.random.Generator | None,
                  min_crop_area: float = 0.35, flip: bool = True,
                  recorded: tuple[int, int] | None = None) -> torch.Tensor:
    """[T, 3, crop, crop] normalised float32; `rng` given means training crop (+ flip), shared by all frames.
    Raises FrameSizeError when a frame's JPEG header declares another (height, width) than `recorded`."""
    images = [Image.open(io.BytesIO(b)) for b in jpegs]
    if recorded is not None:
        for t, image in enumerate(images):
            if image.size != (recorded[1], recorded[0]):
                raise FrameSizeError(frame_member(t), (image.height, image.width), recorded)
    w, h = images[0].size
    if rng is None:
        scale = p.crop / min(w, h)
        size = (max(p.crop, round(w * scale)), max(p.crop, round(h * scale)))
        # DALI keeps one scale for both axes and centres the source region of the rounded output size
        src_w, src_h = size[0] / scale, size[1] / scale
        region = ((w - src_w) / 2, (h - src_h) / 2, (w + src_w) / 2, (h + src_h) / 2)
        images = [_rgb(im) for im in images]
        if min(region[:2]) < 0:  # rounding up made the region wider than the image (e.g. 340x256 -> 224):
            pad = int(np.ceil(-min(region[:2])))  # Pillow refuses it; DALI clamps its samples to the edge
            images = [_pad_edge(im, pad) for im in images]
            region = tuple(r + pad for r in region)
        images = [im if im.size == size else im.resize(size, Image.BILINEAR, box=region) for im in images]
        left, top = int((size[0] - p.crop) / 2 + 0.5), int((size[1] - p.crop) / 2 + 0.5)  # DALI rounds half up
        images = [im.crop((left, top, left + p.crop, top + p.crop)) for im in images]
    else:
        box, mirror = training_window(w, h, rng, min_crop_area, flip)
        images = [_rgb(im).resize((p.crop, p.crop), Image.BILINEAR, box=reduced_box)
                  for im, reduced_box in (_draft(im, box, p.crop) for im in images)]
        if mirror:
            images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    return _normalise(torch.from_numpy(np.stack([np.asarray(im) for im in images])), p)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _draft(image: Image.Image, box: tuple[float, float, float, float],
           crop: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """`image` set to decode at the smallest JPEG scale (1, 1/2, 1/4, 1/8) at which `box` still spans at least
    `crop` pixels each way, and `box` in the pixels of that scale (the crop is then still a downscale)."""
    width = image.width
    want = (math.ceil(image.width * crop / (box[2] - box[0])), math.ceil(image.height * crop / (box[3] - box[1])))
    drafted = image.draft("RGB", want) if image.format == "JPEG" else None
    if drafted is None:
        return image, box
    factor = drafted[1][2] / width  # 1 / scale
    return image, tuple(c * factor for c in box)


@lru_cache(maxsize=16)
def _mean_std(p: VisualParams) -> tuple[torch.Tensor, torch.Tensor]:
    """255 * mean and 255 * std as float32 [3, 1, 1] (pixel values are 0..255)."""
    mean, std = (255.0 * torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (p.mean, p.std))
    return mean, std


def _normalise(clip: torch.Tensor, p: VisualParams) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W], (x - mean) / std, in one conversion and two in-place ops."""
    mean, std = _mean_std(p)
    out = torch.empty((clip.shape[0], 3, clip.shape[1], clip.shape[2]), dtype=torch.float32)
    out.copy_(clip.permute(0, 3, 1, 2))
    return out.sub_(mean).div_(std)


def _pad_edge(image: Image.Image, pad: int) -> Image.Image:
    """`image` with `pad` pixels of replicated edge on every side."""
    return Image.fromarray(np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))


def decode_audio(data: bytes) -> np.ndarray:
    """float32 mono in [-1, 1] from a WAV or FLAC member."""
    return decode_audio_member(data).astype(np.float32) * np.float32(1 / 32768)


class ShardSamples(Dataset):
    """Map-style view of a split's samples; item (i, epoch) is sample i decoded with that epoch's masks
    and crop (the epoch travels with the index, so persistent workers need no message when it changes)."""

    def __init__(self, info: DatasetInfo, refs: list[SampleRef], params: ModalityParams, train: bool,
                 augment: DropSpec | None, eval_keep: np.ndarray | None, seed: int, options: LoaderOptions) -> None:
        self.info, self.refs, self.params = info, refs, params
        self.train, self.augment, self.eval_keep, self.seed = train, augment, eval_keep, seed
        self.options = options
        self.modalities = list(info.modalities)
        audio = params.audio
        self.filters = torch.from_numpy(mel_filters(audio.sample_rate, audio.n_fft, audio.n_mels)) if audio else None
        self.files = ShardFiles()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: tuple[int, int]) -> dict | None:
        i, epoch = item
        ref = self.refs[i]
        present = present_flags(self.refs, np.array([i]), self.params, self.modalities, train=self.train,
                                augment=self.augment, eval_keep=self.eval_keep, seed=self.seed, epoch=epoch)[0]
        try:
            return self._decode(ref, dict(zip(self.modalities, present)), epoch)
        except Exception as exc:  # any decoder error: name where, then raise or skip
            what = exc if isinstance(exc, FrameSizeError) else f"does not decode ({type(exc).__name__}: {exc})"
            message = f"shard {ref.tar}: sample {ref.key} {what}"
            if self.options.on_error == "skip":
                log.warning("skipping: %s", message)
                return None
            raise SampleDecodeError(message + "; run `pipeline verify` and rebuild that shard") from exc

    def _decode(self, ref: SampleRef, present: dict[str, bool], epoch: int) -> dict:
        item = {"key": ref.key, "present": np.array([present[m] for m in self.modalities])}
        decoders = {"visual": self._visual, "audio": self._audio, "text": self._text}
        for modality, use in present.items():
            if use:
                item[modality] = decoders[modality](ref, epoch)
            else:  # absent: zeros of the decoded shape
                item[modality] = torch.zeros(self.params.shape(modality),
                                             dtype=torch.int64 if modality == "text" else torch.float32)
        label = self.files.read(ref, "label.npy")
        if self.info.multilabel:
            item["label"] = np.frombuffer(label, np.float32, offset=NPY_HEADER_BYTES).copy()
        else:
            item["label"] = int(np.frombuffer(label, np.int64, offset=NPY_HEADER_BYTES)[0])
        return item

    def _visual(self, ref: SampleRef, epoch: int) -> torch.Tensor:
        v = self.params.visual
        rng = None
        if self.train:
            rng = crop_rng(ref.key, self.seed, epoch)
        return decode_frames([self.files.read(ref, frame_member(t)) for t in range(v.frames)], v, rng,
                             self.options.min_crop_area, self.options.flip, ref.frame_size)

    def _audio(self, ref: SampleRef, epoch: int) -> torch.Tensor:
        spec = self.params.spectrogram
        if spec is None:  # a waveform: its log-mel
            return log_mel(decode_audio(self.files.read(ref, self.params.audio_ext)), self.params.audio, self.filters)
        values = npy_payload(self.files.read(ref, spec.member), np.dtype(spec.dtype)).astype(np.float32)
        if spec.scale != 1.0:
            values *= np.float32(spec.scale)
        return torch.from_numpy(values.reshape(1, *spec.shape))

    def _text(self, ref: SampleRef, epoch: int) -> torch.Tensor:
        return torch.from_numpy(npy_payload(self.files.read(ref, self.params.text.member), np.int32).astype(np.int64))


def collate(items: list[dict | None]) -> dict:
    """Stack decoded samples into the batch dict (in a worker, straight into shared memory, as torch's
    `default_collate` does, so a batch crosses to the main process without another copy); skipped (None)
    samples are counted in `skipped`."""
    good = [it for it in items if it is not None]
    batch: dict = {"skipped": len(items) - len(good)}
    if not good:
        return batch
    tensors = {m: default_collate([it[m] for it in good]) for m in MODALITIES if m in good[0]}
    labels = np.stack([it["label"] for it in good])
    batch.update(assemble_batch(tensors, np.stack([it["present"] for it in good]), labels,
                                [it["key"] for it in good], multilabel=labels.ndim == 2))
    return batch


class EpochSampler(Sampler[tuple[int, int]]):
    """(split index, epoch) pairs of the samples the loader sets for the rest of its current epoch."""

    def __init__(self) -> None:
        self.indices, self.epoch = np.empty(0, dtype=np.int64), 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, self.epoch) for i in self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


class TorchLoader(EpochLoader):
    """Iterates batches of one worker's part of a split (same dicts as DaliLoader)."""

    def __init__(self, info: DatasetInfo, refs: list[SampleRef], batch_size: int, *, train: bool,
                 augment: DropSpec | None, eval_keep: np.ndarray | None, part: WorkerPart,
                 options: LoaderOptions) -> None:
        super().__init__(len(refs), batch_size, train, part, options)
        self.dataset = ShardSamples(info, refs, modality_params(info, options.crop), train, augment, eval_keep,
                                    part.seed, options)  # the whole split: `indices()` says which samples
        self.sampler = EpochSampler()
        self.num_workers = options.workers
        self.device = torch.device("cuda", options.device_id or 0) if options.gpu else None
        self.skipped = 0
        self._loader: DataLoader | None = None

    def _data_loader(self) -> DataLoader:
        """One DataLoader for the loader's life: its workers persist from epoch to epoch."""
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=collate,
                num_workers=workers, drop_last=False,  # a training epoch's indices are whole batches
                persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                pin_memory=self.device is not None)
        return self._loader

    def _epoch_batches(self) -> Iterator[dict | None]:
        self.sampler.epoch, self.sampler.indices = self.epoch, self.indices()[self.batches_done * self.batch_size:]
        self.skipped = 0
        for batch in self._data_loader():
            self.skipped += batch.pop("skipped")
            yield self._to_device(batch) if "key" in batch else None

    def _epoch_done(self) -> None:
        if self.skipped:
            log.warning("epoch %d: skipped %d samples that did not decode", self.epoch, self.skipped)

    def _to_device(self, batch: dict) -> dict:
        """On a GPU, the (pinned) tensors copied without blocking the host: the copy is ordered on the current
        stream before the consumer's kernels."""
        if self.device is None:
            return batch
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
