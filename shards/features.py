"""The decoding parameters both loaders share, and the torch reference of DALI's audio features.

Audio: mono float in [-1, 1], cropped or zero-padded to `seconds`, power spectrogram (DALI's Hann window of
`win_length` zero-padded to `n_fft`, hop `hop_length`, centred windows with reflect padding), Slaney mel
filter bank (area-normalised), decibels floored at -`db_cutoff`, then scaled by fixed constants.
Frames: RGB, resized so the short side is the crop size, centre crop (evaluation), ImageNet mean/std.
Precomputed spectrograms (`audio.kind = "spectrogram_array"`, AV-MNIST): the stored float32 array times
`scale`, as [1, H, W]. Stored log-mel (`audio.kind = "logmel_array"`, `--audio-features logmel`): the
float16 array of this module's own normalised log-mel, read as float32 [1, n_mels, n_frames] without a scale,
so it equals the waveform path's tensor within float16 precision. Text: the stored int32 ids, as int64
[max_len] (0 = padding).

`modality_params` reads all of it from dataset.json, so neither loader (nor the trainer) special-cases a
dataset."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from shards.format import AudioInfo, TextInfo, VisualInfo, frame_member
from shards.masks import key_uniform

DB_OFFSET = 40.0  # log-mel (dB) -> (dB + DB_OFFSET) / DB_SCALE, so typical values lie in [-1, 2]
DB_SCALE = 40.0


@dataclass(frozen=True)
class AudioParams:
    sample_rate: int
    seconds: float
    n_mels: int
    n_fft: int
    win_length: int
    hop_length: int
    db_cutoff: float

    @property
    def n_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length + 1

    @classmethod
    def from_info(cls, audio: AudioInfo) -> AudioParams:
        return cls(audio.sample_rate, audio.seconds, audio.n_mels, audio.n_fft, audio.win_length, audio.hop_length,
                   audio.db_cutoff)


@dataclass(frozen=True)
class VisualParams:
    frames: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_info(cls, visual: VisualInfo, crop: int | None = None) -> VisualParams:
        return cls(visual.frames, crop or visual.crop, tuple(visual.mean), tuple(visual.std))


STORED_AUDIO_KINDS = {"spectrogram_array": ("spec.npy", "float32"), "logmel_array": ("logmel.npy", "float16")}


@dataclass(frozen=True)
class SpectrogramParams:
    """A spectrogram stored as a `.npy` member (float32 or float16) of shape `shape`, read as float32 times
    `scale` (1 for a stored log-mel: it holds the loaders' own normalised values)."""

    shape: tuple[int, int]
    scale: float
    member: str = "spec.npy"
    dtype: str = "float32"

    @classmethod
    def from_info(cls, audio: AudioInfo) -> SpectrogramParams:
        member, dtype = STORED_AUDIO_KINDS[audio.kind]
        scale = float(audio.scale if audio.scale is not None else 1.0) if audio.kind == "spectrogram_array" else 1.0
        return cls(tuple(audio.shape), scale, audio.member or member, audio.dtype or dtype)


@dataclass(frozen=True)
class TextParams:
    """Token ids stored as an int32 `.npy` member of `max_len` ids (0 = padding)."""

    max_len: int
    vocab_size: int
    member: str = "text.npy"

    @classmethod
    def from_info(cls, text: TextInfo) -> TextParams:
        return cls(int(text.max_len), int(text.vocab_size))


@dataclass(frozen=True)
class ModalityParams:
    """What the loaders decode per modality; None for a modality the dataset does not have."""

    visual: VisualParams | None
    audio: AudioParams | None  # a waveform decoded to log-mel
    spectrogram: SpectrogramParams | None  # or a stored spectrogram
    text: TextParams | None
    audio_ext: str = "wav"

    @property
    def audio_member(self) -> str:
        return self.spectrogram.member if self.spectrogram else self.audio_ext

    def member(self, modality: str) -> str:
        """The member whose presence says that a sample has `modality` (the first frame for visual)."""
        if modality == "visual":
            return frame_member(0)
        return self.audio_member if modality == "audio" else self.text.member

    def has(self, members: dict, modalities: list[str]) -> list[bool]:
        """Natural missingness: per modality, whether a sample's members (`SampleRef.members`) hold it."""
        return [members.get(self.member(m), (0, 0))[1] > 0 for m in modalities]

    def shape(self, modality: str) -> tuple[int, ...]:
        """One sample's tensor shape for `modality`: what a present modality decodes to and what an absent
        one is filled with (zeros)."""
        if modality == "visual":
            return (self.visual.frames, 3, self.visual.crop, self.visual.crop)
        if modality == "audio":
            return (1, *self.spectrogram.shape) if self.spectrogram else (1, self.audio.n_mels, self.audio.n_frames)
        return (self.text.max_len,)


def modality_params(info, crop: int | None = None) -> ModalityParams:
    """The decoding parameters of a dataset (a `shards.format.DatasetInfo`)."""
    mods = info.modalities
    visual = VisualParams.from_info(info.visual, crop) if "visual" in mods else None
    audio = spectrogram = None
    if "audio" in mods:
        if info.audio.kind in STORED_AUDIO_KINDS:
            spectrogram = SpectrogramParams.from_info(info.audio)
        else:
            audio = AudioParams.from_info(info.audio)
    text = TextParams.from_info(info.text) if "text" in mods else None
    return ModalityParams(visual, audio, spectrogram, text, (info.audio.codec if info.audio else None) or "wav")


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log_part, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular Slaney filters, area-normalised (as DALI's normalize=True)."""
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (center - lower)
    down = (upper - freqs[None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(up, down))
    weights *= (2.0 / (upper - lower))
    return weights.astype(np.float32)


@lru_cache(maxsize=8)
def hann_window(length: int) -> torch.Tensor:
    """The Hann window DALI's spectrogram uses: sin^2(pi (i + 0.5) / N), symmetric about the centre (made once
    per length; read-only)."""
    return torch.sin(torch.pi * (torch.arange(length, dtype=torch.float64) + 0.5) / length).pow(2).float()


def fit_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Crop to, or zero-pad up to, exactly n_samples (from the start of the clip)."""
    out = np.zeros(n_samples, dtype=np.float32)
    n = min(n_samples, len(audio))
    out[:n] = audio[:n]
    return out


def log_mel(audio: np.ndarray, p: AudioParams, filters: torch.Tensor | None = None) -> torch.Tensor:
    """[1, n_mels, n_frames] normalised log-mel of float mono audio, matching the DALI pipeline (the power
    as re^2 + im^2 and the decibels in place: a third of the time of |X|^2 and fresh tensors)."""
    x = torch.from_numpy(fit_length(audio, p.n_samples))
    spec = torch.stft(x, n_fft=p.n_fft, hop_length=p.hop_length, win_length=p.win_length,
                      window=hann_window(p.win_length), center=True, pad_mode="reflect", return_complex=True)
    power = spec.real.square().add_(spec.imag.square())
    if filters is None:
        filters = torch.from_numpy(mel_filters(p.sample_rate, p.n_fft, p.n_mels))
    mel = filters @ power
    db = mel.clamp_(min=10.0 ** (-p.db_cutoff / 10.0)).log10_().mul_(10.0)
    return db.add_(DB_OFFSET).div_(DB_SCALE).unsqueeze(0)


def random_resized_box(w: int, h: int, rng: np.random.Generator,
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


def crop_rng(key: str, seed: int, epoch: int) -> np.random.Generator:
    """The random stream of one sample's training crop and flip in one epoch: fixed by (key, seed, epoch), so
    a sample gets the same window on any worker, world size and backend."""
    return np.random.default_rng(int(key_uniform(key, seed, f"crop:{epoch}") * 2**63))


def training_window(w: int, h: int, rng: np.random.Generator, min_area: float,
                    flip: bool) -> tuple[tuple[float, float, float, float], bool]:
    """The training crop box (x0, y0, x1, y1) of a w x h frame and whether it is mirrored, drawn from `rng`."""
    box = random_resized_box(w, h, rng, min_area)
    return box, bool(rng.random() < 0.5) and flip
