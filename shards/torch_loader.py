"""The torch loader: the same batches as the DALI loader from PyTorch DataLoader workers.

It reads members by the offsets in the `.idx` files (random access into the tars), decodes JPEG with
Pillow and WAV/FLAC with the project's decoder, and computes the log-mel with `shards.features`, which
reproduces DALI's operators; stored spectrograms and token ids are read as typed payloads. It is the
fallback where DALI is absent and the baseline in benchmarks. Masks come from hashes of the keys, so a
dropped modality is never decoded here either. Every decoded frame is checked against the size the build
recorded for its sample (`SampleRef.frame_size`). In training a worker's part is permuted as a whole per
(seed, epoch) (`EpochSampler`); the DALI reader shuffles inside a buffer instead (see `shards.dali_loader`)."""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from shards.features import ModalityParams, VisualParams, log_mel, mel_filters, modality_params
from shards.format import NPY_HEADER_BYTES, DatasetInfo, frame_member, npy_payload
from shards.samples import FrameSizeError, SampleRef, shard_range, training_steps
from shards.scenarios import DropSpec, augment_keep, key_uniform, resolve_present

log = logging.getLogger(__name__)


class SampleDecodeError(RuntimeError):
    """A member that does not decode, or decodes to another frame size than recorded, with the shard and key."""


def read_member(ref: SampleRef, ext: str) -> bytes:
    offset, size = ref.members[ext]
    with open(ref.tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def decode_frames(jpegs: list[bytes], p: VisualParams, rng: np.random.Generator | None,
                  min_crop_area: float = 0.35, flip: bool = True,
                  recorded: tuple[int, int] | None = None) -> np.ndarray:
    """[T, 3, crop, crop] normalised float32; `rng` given means training crop (+ flip), shared by all frames.
    Raises FrameSizeError when a frame does not decode to the `recorded` (height, width)."""
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
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
        if min(region[:2]) < 0:  # rounding up made the region wider than the image (e.g. 340x256 -> 224):
            pad = int(np.ceil(-min(region[:2])))  # Pillow refuses it; DALI clamps its samples to the edge
            images = [_pad_edge(im, pad) for im in images]
            region = tuple(r + pad for r in region)
        images = [im if im.size == size else im.resize(size, Image.BILINEAR, box=region) for im in images]
        left, top = int((size[0] - p.crop) / 2 + 0.5), int((size[1] - p.crop) / 2 + 0.5)  # DALI rounds half up
        box, flip = (left, top, left + p.crop, top + p.crop), False
        images = [im.crop(box) for im in images]
    else:
        box = _random_resized_box(w, h, rng, min_crop_area)
        flip = bool(rng.random() < 0.5) and flip
        images = [im.resize((p.crop, p.crop), Image.BILINEAR, box=box) for im in images]
    clip = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # T H W C
    if flip:
        clip = clip[:, :, ::-1]
    clip = (clip - 255.0 * np.array(p.mean, np.float32)) / (255.0 * np.array(p.std, np.float32))
    return np.ascontiguousarray(clip.transpose(0, 3, 1, 2))


def _pad_edge(image: Image.Image, pad: int) -> Image.Image:
    """`image` with `pad` pixels of replicated edge on every side."""
    return Image.fromarray(np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))


def _random_resized_box(w: int, h: int, rng: np.random.Generator,
                        min_area: float) -> tuple[float, float, float, float]:
    """Random crop of min_area..100% of the area, aspect ratio 3/4..4/3 (as DALI's random_resized_crop)."""
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = np.sqrt(area * ratio), np.sqrt(area / ratio)
        if cw <= w and ch <= h:
            x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return (x, y, x + cw, y + ch)
    side = min(w, h)
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def decode_audio(data: bytes) -> np.ndarray:
    """float32 mono in [-1, 1] from a WAV or FLAC member."""
    from pipeline.encode import decode_audio_member

    return decode_audio_member(data).astype(np.float32) / 32768.0


class ShardSamples(Dataset):
    """Map-style view of one worker's samples; each item is decoded with its masks applied."""

    def __init__(self, info: DatasetInfo, refs: list[SampleRef], params: ModalityParams,
                 train: bool, augment: DropSpec | None, eval_keep: np.ndarray | None, seed: int,
                 on_error: str, min_crop_area: float = 0.35, flip: bool = True) -> None:
        self.info, self.refs, self.params = info, refs, params
        self.visual, self.audio = params.visual, params.audio
        self.train, self.augment, self.eval_keep, self.seed, self.on_error = train, augment, eval_keep, seed, on_error
        self.modalities = list(info.modalities)
        self.audio_ext = params.audio_member
        audio = params.audio
        self.filters = torch.from_numpy(mel_filters(audio.sample_rate, audio.n_fft, audio.n_mels)) if audio else None
        self.epoch = 0
        self.min_crop_area, self.flip = min_crop_area, flip

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict | None:
        ref = self.refs[i]
        has = np.array([[self._has(ref, m) for m in self.modalities]])
        if self.eval_keep is not None:
            keep = self.eval_keep[i:i + 1]
        elif self.train and self.augment is not None and self.augment.active:
            keep = augment_keep([ref.key], self.modalities, self.augment, self.seed, self.epoch)
        else:
            keep = np.ones_like(has)
        present = resolve_present(has, keep, never_all=self.train)[0]
        try:
            return self._decode(ref, dict(zip(self.modalities, present)))
        except Exception as exc:  # any decoder error: name where, then raise or skip
            what = exc if isinstance(exc, FrameSizeError) else f"does not decode ({type(exc).__name__}: {exc})"
            message = f"shard {ref.tar}: sample {ref.key} {what}"
            if self.on_error == "skip":
                log.warning("skipping: %s", message)
                return None
            raise SampleDecodeError(message + "; run `pipeline verify` and rebuild that shard") from exc

    def _has(self, ref: SampleRef, modality: str) -> bool:
        if modality == "visual":
            return frame_member(0) in ref.members
        if modality == "audio":
            return self.audio_ext in ref.members
        return "text.npy" in ref.members

    def _decode(self, ref: SampleRef, present: dict[str, bool]) -> dict:
        v, a, spec, text = self.visual, self.audio, self.params.spectrogram, self.params.text
        item = {"key": ref.key, "present": np.array([present[m] for m in self.modalities])}
        if "visual" in present:
            if present["visual"]:
                rng = None
                if self.train:
                    rng = np.random.default_rng(int(key_uniform(ref.key, self.seed, f"crop:{self.epoch}") * 2**63))
                item["visual"] = decode_frames([read_member(ref, frame_member(t)) for t in range(v.frames)], v, rng,
                                               self.min_crop_area, self.flip, ref.frame_size)
            else:
                item["visual"] = np.zeros((v.frames, 3, v.crop, v.crop), np.float32)
        if "audio" in present and spec is not None:
            if present["audio"]:
                values = npy_payload(read_member(ref, spec.member), np.float32).reshape(1, *spec.shape)
                item["audio"] = values * np.float32(spec.scale)
            else:
                item["audio"] = np.zeros((1, *spec.shape), np.float32)
        elif "audio" in present:
            if present["audio"]:
                item["audio"] = log_mel(decode_audio(read_member(ref, self.audio_ext)), a, self.filters).numpy()
            else:
                item["audio"] = np.zeros((1, a.n_mels, a.n_frames), np.float32)
        if "text" in present:
            if present["text"]:
                item["text"] = npy_payload(read_member(ref, text.member), np.int32).astype(np.int64)
            else:
                item["text"] = np.zeros(text.max_len, np.int64)
        label = read_member(ref, "label.npy")
        if self.info.multilabel:
            item["label"] = np.frombuffer(label, np.float32, offset=NPY_HEADER_BYTES).copy()
        else:
            item["label"] = int(np.frombuffer(label, np.int64, offset=NPY_HEADER_BYTES)[0])
        return item


def collate(items: list[dict | None]) -> dict:
    """Stack decoded samples; skipped (None) samples are counted in `skipped`."""
    good = [it for it in items if it is not None]
    batch: dict = {"skipped": len(items) - len(good)}
    if not good:
        return batch
    for name in ("visual", "audio", "text"):
        if name in good[0]:
            batch[name] = torch.from_numpy(np.stack([it[name] for it in good]))
    batch["present"] = torch.from_numpy(np.stack([it["present"] for it in good]))
    labels = np.stack([it["label"] for it in good])
    batch["label"] = torch.from_numpy(labels.astype(np.float32 if labels.ndim == 2 else np.int64))
    batch["key"] = [it["key"] for it in good]
    return batch


class EpochSampler(Sampler[int]):
    """Sequential in evaluation; in training a permutation fixed by (seed, epoch); skips consumed items."""

    def __init__(self, n: int, train: bool, seed: int) -> None:
        self.n, self.train, self.seed = n, train, seed
        self.epoch, self.skip = 0, 0

    def order(self) -> np.ndarray:
        if not self.train:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip:].tolist())

    def __len__(self) -> int:
        return self.n - self.skip


class TorchLoader:
    """Iterates batches of one worker's part of a split (same dicts as DaliLoader)."""

    def __init__(self, info: DatasetInfo, refs: list[SampleRef], batch_size: int, *, train: bool,
                 augment: DropSpec | None, eval_keep: np.ndarray | None, shard_id: int, num_shards: int,
                 seed: int, epoch: int, crop: int | None, num_workers: int, on_error: str = "raise",
                 min_crop_area: float = 0.35, flip: bool = True) -> None:
        part = shard_range(len(refs), shard_id, num_shards)
        self._total, self._num_shards = len(refs), num_shards
        keep = None if eval_keep is None else eval_keep[part.start:part.stop]
        self.batch_size, self.train = batch_size, train
        self.dataset = ShardSamples(info, [refs[i] for i in part], modality_params(info, crop), train, augment,
                                    keep, seed, on_error, min_crop_area, flip)
        self.sampler = EpochSampler(len(self.dataset), train, seed)
        self.num_workers = num_workers
        self.epoch = epoch
        self.batches_done = 0
        self.skipped = 0

    def __len__(self) -> int:
        if self.train:
            return training_steps(self._total, self._num_shards, self.batch_size)
        return -(-len(self.dataset) // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def __iter__(self) -> Iterator[dict]:
        self.dataset.epoch = self.sampler.epoch = self.epoch
        self.sampler.skip = self.batches_done * self.batch_size
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=collate,
                            num_workers=self.num_workers, drop_last=self.train and len(self.dataset) >= self.batch_size,
                            persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        self.skipped = 0
        batches = iter(loader)
        try:
            for batch in batches:
                if self.batches_done >= len(self):
                    break
                self.batches_done += 1
                self.skipped += batch.pop("skipped")
                if "key" in batch:
                    yield batch
        finally:  # also when the consumer stops early: shut the worker processes down now
            del batches
        if self.skipped:
            log.warning("epoch %d: skipped %d samples that did not decode", self.epoch, self.skipped)
        self.epoch += 1
        self.batches_done = 0
