"""The loaders the shard loaders are measured against, beside raw mp4 decoding, on the same shards.

- `ogm`: the loader of the field's research code, as GeWu-Lab/OGM-GE_CVPR2022 writes it
  (https://github.com/GeWu-Lab/OGM-GE_CVPR2022, `dataset/dataset.py` `AVDataset`, the class its `main.py`
  uses for Kinetics-Sound and AVE; `dataset/CramedDataset.py` transforms the frames the same way but
  computes its spectrogram from the WAV with librosa at load time). Before training,
  frames are extracted once as JPEG files, one folder per clip (`visual/<id>/frame_00001.jpg`, ...; the
  repository's `pre-processing/*/video2frame-1fps.py`), and the spectrogram once as one array per clip
  (`audio_spec/<id>.npy`; `data/KineticSound/process_audio.py` saves `.npy`, `AVDataset` reads a pickle of
  the same array). `__getitem__` loads the array, lists the clip's folder, picks `pick_num = 3` frames
  (`seg = file_num // 3`, `frame_0000{seg * i + 1}.jpg`) and builds a torchvision
  `Compose([RandomResizedCrop(224), RandomHorizontalFlip(), ToTensor(), Normalize(ImageNet)])` per
  sample, applied to each frame on its own (each frame draws its own crop and flip, from 8-100% of the
  area as torchvision's default), concatenated as `[3, T, H, W]`; the spectrogram comes back as stored
  (`[n_mels, n_frames]`; the training loop adds the channel with `spec.unsqueeze(1)`). `main.py` wraps it in
  `DataLoader(batch_size, shuffle=True, num_workers=32, pin_memory=True)`; here `num_workers` is the
  benchmark's and memory is pinned only where CUDA is. torchvision does not import beside this torch build,
  so the four transforms are reimplemented below after torchvision's code, with PIL, numpy and torch.
  Here the extraction reads the shards (the same JPEG bytes the shard loaders decode) and the array is the
  project's log-mel (`shards.features.log_mel`), so both sides decode the same data to the same features.
- `wds`: a plain `webdataset` pipeline over the same tars, as its documentation writes one:
  `WebDataset(urls).shuffle().decode("pil").map(...).batched(B)` in a `WebLoader` with the same workers;
  the map makes the shard loaders' tensors (one random-resized crop of 35-100% and one flip for all frames,
  ImageNet normalisation; the WAV's log-mel by `shards.features.log_mel`, i.e. `torch.stft` and the shard
  loaders' mel parameters). With fewer
  tars than workers (the quick profile's one tar) every worker reads every tar and keeps every
  `num_workers`-th sample before decoding (`wds.split_by_worker` on samples), else the tars are split.
- `floor`: the decoding alone, in one process with one torch thread, every member's bytes read into memory
  beforehand: 3 JPEG decodes (Pillow) with the same random-resized crop and flip (bilinear, to uint8), and
  the WAV's log-mel (`shards.features.log_mel`); no file I/O, no workers, no batching, no float conversion
  or normalisation of the frames. It is the least CPU time a Python loader of these tensors can spend on
  them with these decoders (DALI's own JPEG decoder and spectrogram may go below it).

Missing-modality augmentation: `ogm` and `wds` do what modality-dropout code added to such loaders does
(decode everything, then zero what the mask drops); `floor`, like the shard loaders, skips what is dropped.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import shutil
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from shards.features import AudioParams, VisualParams, crop_rng, log_mel, mel_filters, random_resized_box
from shards.format import DatasetInfo, frame_member
from shards.masks import DropSpec, augment_keep, resolve_present
from shards.sample_refs import SampleRef, split_samples

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------------------------- shared
def read_member(ref: SampleRef, ext: str) -> bytes:
    """One member's bytes, by the offset the shard's index records."""
    offset, size = ref.members[ext]
    with open(ref.tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def wav_audio(data: bytes) -> np.ndarray:
    """float32 mono in [-1, 1] from a PCM16 WAV member."""
    with wave.open(io.BytesIO(data)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def crop_frames(images: list[Image.Image], crop: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, crop, crop, 3]: one random resized crop (bilinear) and one flip for all frames, drawn as the
    shard loaders draw them."""
    box = random_resized_box(*images[0].size, rng, 0.35)  # the shard loaders' training crop
    clip = np.stack([np.asarray(im.resize((crop, crop), Image.BILINEAR, box=box)) for im in images])
    return np.ascontiguousarray(clip[:, :, ::-1]) if rng.random() < 0.5 else clip


def train_frames(images: list[Image.Image], p: VisualParams, rng: np.random.Generator) -> np.ndarray:
    """[T, 3, crop, crop] float32: `crop_frames`, then ImageNet mean/std, as the shard loaders make them."""
    clip = crop_frames(images, p.crop, rng).astype(np.float32)
    clip = (clip - 255.0 * np.array(p.mean, np.float32)) / (255.0 * np.array(p.std, np.float32))
    return np.ascontiguousarray(clip.transpose(0, 3, 1, 2))


def drop_mask(key: str, has: list[bool], modalities: list[str], spec: DropSpec, seed: int, epoch: int) -> np.ndarray:
    """bool [M]: the modalities a training sample keeps (augmentation on what it has; never all dropped)."""
    has_row = np.array([has])
    keep = augment_keep([key], modalities, spec, seed, epoch) if spec.active else np.ones_like(has_row)
    return resolve_present(has_row, keep, never_all=True)[0]


# ----------------------------------------------------------------------------------------------- ogm: files
def extract_ogm(dataset_dir: Path, info: DatasetInfo, split: str, out: Path) -> dict:
    """The one-off pre-extraction OGM-GE's loader reads: `visual/<key>/frame_%05d.jpg` (the shard's JPEGs, as
    stored), `audio_spec/<key>.npy` (float32 [n_mels, n_frames] log-mel of the WAV), `stat.txt` (class names)
    and `my_<split>.txt` (`class,key` rows). Rewritten from scratch; returns its root, size and seconds."""
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    (out / "audio_spec").mkdir(parents=True)
    audio = AudioParams.from_info(info.audio)
    filters = torch.from_numpy(mel_filters(audio.sample_rate, audio.n_fft, audio.n_mels))
    rows = []
    for ref in split_samples(dataset_dir, info, split):
        label = int(np.load(io.BytesIO(read_member(ref, "label.npy")))[0])
        frames = sorted(int(ext[1:-4]) for ext in ref.members if ext[:1] == "f" and ext.endswith(".jpg"))
        if frames:
            folder = out / "visual" / ref.key
            folder.mkdir(parents=True)
            for t in frames:
                (folder / f"frame_{t + 1:05d}.jpg").write_bytes(read_member(ref, frame_member(t)))
        if "wav" in ref.members:
            spec = log_mel(wav_audio(read_member(ref, "wav")), audio, filters)[0].numpy()
            np.save(out / "audio_spec" / f"{ref.key}.npy", spec)
        rows.append((info.classes[label], ref.key))
    with open(out / "stat.txt", "w", newline="") as f:
        csv.writer(f).writerows([c] for c in info.classes)
    with open(out / f"my_{split}.txt", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"root": str(out), "bytes": size, "seconds": round(time.perf_counter() - started, 2),
            "clips": len(rows)}


# ----------------------------------------------------------------------------------------------- ogm: transforms
class Compose:
    """torchvision.transforms.Compose."""

    def __init__(self, transforms: list[Callable]) -> None:
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class RandomResizedCrop:
    """torchvision.transforms.RandomResizedCrop(size) on a PIL image: `get_params` with the global torch
    generator (scale 0.08-1, ratio 3/4-4/3, integer box, centre-crop fallback), then crop + bilinear resize."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> None:
        self.size, self.scale, self.ratio = (size, size), scale, ratio

    def get_params(self, img: Image.Image) -> tuple[int, int, int, int]:
        width, height = img.size
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.get_params(img)
        return img.crop((j, i, j + w, i + h)).resize(self.size[::-1], Image.BILINEAR)


class RandomHorizontalFlip:
    """torchvision.transforms.RandomHorizontalFlip(0.5) on a PIL image."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else img


class ToTensor:
    """torchvision.transforms.ToTensor on an RGB PIL image: float [3, H, W] in [0, 1]."""

    def __call__(self, pic: Image.Image) -> torch.Tensor:
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True)).view(pic.size[1], pic.size[0], 3)
        return img.permute((2, 0, 1)).contiguous().to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    """torchvision.transforms.Normalize(mean, std) on a tensor image (not in place, as its default)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean, self.std = mean, std

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype)
        std = torch.as_tensor(self.std, dtype=tensor.dtype)
        return tensor.sub_(mean[:, None, None]).div_(std[:, None, None])


class Resize:
    """torchvision.transforms.Resize(size=(h, w)) on a PIL image (bilinear)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.resize(self.size[::-1], Image.BILINEAR)


# ----------------------------------------------------------------------------------------------- ogm: dataset
class OGMDataset(Dataset):
    """OGM-GE's `AVDataset` (dataset/dataset.py) over an `extract_ogm` folder: (spectrogram, [3, T, H, W]
    frames, label, clip id). Clips without both files are left out, as there."""

    def __init__(self, root: Path, mode: str = "train", crop: int = 224, pick_num: int = 3) -> None:
        classes, data, data2class = [], [], {}
        self.mode, self.crop, self.pick_num = mode, crop, pick_num
        self.visual_feature_path = os.path.join(root, "visual/")
        self.audio_feature_path = os.path.join(root, "audio_spec/")
        with open(os.path.join(root, "stat.txt")) as f1:
            for row in csv.reader(f1):
                classes.append(row[0])
        with open(os.path.join(root, f"my_{mode}.txt")) as f2:
            for item in csv.reader(f2):
                audio_path = os.path.join(self.audio_feature_path, item[1] + ".npy")
                visual_path = os.path.join(self.visual_feature_path, item[1])
                if os.path.exists(audio_path) and os.path.exists(visual_path):
                    data.append(item[1])
                    data2class[item[1]] = item[0]
        self.classes = sorted(classes)
        self.data2class = data2class
        self.av_files = list(data)

    def __len__(self) -> int:
        return len(self.av_files)

    def __getitem__(self, idx: int):
        av_file = self.av_files[idx]
        spectrogram = np.load(os.path.join(self.audio_feature_path, av_file + ".npy"))
        visual_path = os.path.join(self.visual_feature_path, av_file)
        file_num = len(os.listdir(visual_path))
        if self.mode == "train":
            transform = Compose([RandomResizedCrop(self.crop), RandomHorizontalFlip(), ToTensor(),
                                 Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        else:
            transform = Compose([Resize(size=(self.crop, self.crop)), ToTensor(),
                                 Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        seg = int(file_num / self.pick_num)
        image_n = None
        for i in range(self.pick_num):
            path = os.path.join(visual_path, f"frame_{seg * i + 1:05d}.jpg")  # 'frame_0000' + str(t[i]) there
            image = transform(Image.open(path).convert("RGB")).unsqueeze(1).float()
            image_n = copy.copy(image) if i == 0 else torch.cat((image_n, image), 1)
        return spectrogram, image_n, self.classes.index(self.data2class[av_file]), av_file


class ModalityDropout(Dataset):
    """The usual modality dropout added around such a dataset: every item is decoded whole, then what the
    (key, seed, epoch) mask drops is zeroed. Items become the loader dicts (key, present, visual, audio)."""

    def __init__(self, dataset: OGMDataset, spec: DropSpec, seed: int) -> None:
        self.dataset, self.spec, self.seed, self.epoch = dataset, spec, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        spectrogram, images, label, key = self.dataset[idx]
        present = drop_mask(key, [True, True], ["visual", "audio"], self.spec, self.seed, self.epoch)
        return {"key": key, "label": label, "present": present,
                "visual": images if present[0] else torch.zeros_like(images),
                "audio": spectrogram if present[1] else np.zeros_like(spectrogram)}


class OGMLoader:
    """Epochs of OGM-GE's DataLoader (shuffle, `workers` processes, default prefetch, last batch kept)."""

    def __init__(self, root: Path, batch_size: int, workers: int, spec: DropSpec, seed: int, crop: int = 224,
                 pick_num: int = 3) -> None:
        self.dataset = ModalityDropout(OGMDataset(root, "train", crop, pick_num), spec, seed)
        self.batch_size, self.workers, self.seed = batch_size, workers, seed

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator().manual_seed(self.seed + self.dataset.epoch))
        yield from loader
        self.dataset.epoch += 1


# ----------------------------------------------------------------------------------------------- wds
def webdataset_available() -> bool:
    try:
        import webdataset  # noqa: F401
    except ImportError:
        return False
    return True


class WdsSample:
    """The map of the webdataset pipeline: a decoded sample (PIL frames, WAV bytes, `cls`) -> the loader dict.
    Decoded whole, then the dropped modalities zeroed."""

    def __init__(self, visual: VisualParams, audio: AudioParams, spec: DropSpec, seed: int, epoch: int) -> None:
        self.visual, self.audio, self.spec, self.seed, self.epoch = visual, audio, spec, seed, epoch
        self.filters = torch.from_numpy(mel_filters(audio.sample_rate, audio.n_fft, audio.n_mels))

    def __call__(self, sample: dict) -> dict:
        key, v, a = sample["__key__"], self.visual, self.audio
        has = [frame_member(0) in sample, "wav" in sample]
        present = drop_mask(key, has, ["visual", "audio"], self.spec, self.seed, self.epoch)
        rng = crop_rng(key, self.seed, self.epoch)
        frames = train_frames([sample[frame_member(t)] for t in range(v.frames)], v, rng) if has[0] else None
        mel = log_mel(wav_audio(sample["wav"]), a, self.filters) if has[1] else None
        return {"key": key, "label": torch.tensor(int(sample["cls"])), "present": torch.from_numpy(present),
                "visual": torch.from_numpy(frames) if present[0] else torch.zeros(v.frames, 3, v.crop, v.crop),
                "audio": mel if present[1] else torch.zeros(1, a.n_mels, a.n_frames)}


class WdsLoader:
    """Epochs of `wds.WebDataset(tars).shuffle(1000).decode("pil").map(...).batched(B)` in a `wds.WebLoader`."""

    def __init__(self, tars: list[str], visual: VisualParams, audio: AudioParams, batch_size: int, workers: int,
                 spec: DropSpec, seed: int) -> None:
        self.tars, self.visual, self.audio = tars, visual, audio
        self.batch_size, self.workers, self.spec, self.seed, self.epoch = batch_size, workers, spec, seed, 0

    def pipeline(self):
        import webdataset as wds

        split_samples_by_worker = len(self.tars) < self.workers
        dataset = wds.WebDataset(self.tars, shardshuffle=len(self.tars), seed=self.seed + self.epoch,
                                 workersplitter=None if split_samples_by_worker else wds.split_by_worker,
                                 empty_check=False)
        if split_samples_by_worker:
            dataset = dataset.compose(wds.split_by_worker)
        return (dataset.shuffle(1000).decode("pil")
                .map(WdsSample(self.visual, self.audio, self.spec, self.seed, self.epoch))
                .batched(self.batch_size, partial=True))

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        yield from wds.WebLoader(self.pipeline(), batch_size=None, num_workers=self.workers,
                                 prefetch_factor=4 if self.workers else None)
        self.epoch += 1


# ----------------------------------------------------------------------------------------------- floor
class Floor:
    """The decoding alone: per sample, the JPEGs decoded and cropped (uint8 [T, crop, crop, 3], the same crop
    and flip; the float conversion and normalisation are left to the loaders) and the WAV's log-mel, from
    bytes already in memory, in this process with one torch thread; a sample at a time (batches of one,
    nothing stacked). `limit` samples (the first ones in reader order) are enough: the figure is per sample."""

    def __init__(self, dataset_dir: Path, info: DatasetInfo, split: str, spec: DropSpec, seed: int,
                 crop: int | None, limit: int | None = None) -> None:
        self.visual, self.audio = VisualParams.from_info(info.visual, crop), AudioParams.from_info(info.audio)
        self.filters = torch.from_numpy(mel_filters(self.audio.sample_rate, self.audio.n_fft, self.audio.n_mels))
        self.spec, self.seed, self.epoch = spec, seed, 0
        refs = split_samples(dataset_dir, info, split)[:limit]
        self.samples = [(ref.key,
                         [read_member(ref, frame_member(t)) for t in range(self.visual.frames)]
                         if frame_member(0) in ref.members else None,
                         read_member(ref, "wav") if "wav" in ref.members else None) for ref in refs]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[dict]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            for key, jpegs, wav in self.samples:
                present = drop_mask(key, [jpegs is not None, wav is not None], ["visual", "audio"], self.spec,
                                    self.seed, self.epoch)
                item = {"key": [key]}
                if present[0]:
                    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
                    item["visual"] = torch.from_numpy(crop_frames(images, self.visual.crop,
                                                                  crop_rng(key, self.seed, self.epoch)))
                if present[1]:
                    item["audio"] = log_mel(wav_audio(wav), self.audio, self.filters)
                yield item
        finally:
            torch.set_num_threads(threads)
        self.epoch += 1
