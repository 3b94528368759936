"""The options of `pipeline build-shards` (everything that changes the output bytes, recorded in
dataset.json) and the context a shard task carries to its worker."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class SourceError(ValueError):
    """The raw corpus, an option or --out is not what the build expects; the message says how to fix it."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the bytes of the output; recorded in dataset.json."""

    frames: int = 3
    fps: float = 1.0
    size: int = 256  # short side of stored frames (never upscaled)
    jpeg_quality: int = 90
    sample_rate: int = 16000
    audio_codec: str = "wav"
    shard_size: int = 256
    n_mels: int = 128  # log-mel parameters the loaders use, recorded for them
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    max_len: int = 128  # text: token ids per sample (truncated or zero-padded)
    vocab_size: int = 30000  # text: words in the default tokenizer's vocabulary (with [PAD] and [UNK])
    tokenizer: str = ""  # text: a local Hugging Face tokenizer directory instead of the default
    order_seed: int = 0  # the seeded hash of the key that orders each split before it is cut into shards
    audio_features: str = "waveform"  # or "logmel": the loaders' log-mel stored as float16 (`logmel.npy`)
    audio_seconds: float = 0.0  # logmel: the length every clip's audio is cut or zero-padded to

    def check(self) -> None:
        if self.audio_codec not in ("wav", "flac"):
            raise SourceError(f"--audio-codec {self.audio_codec!r}: use wav or flac")
        if self.audio_features not in ("waveform", "logmel"):
            raise SourceError(f"--audio-features {self.audio_features!r}: use waveform or logmel")
        if self.audio_features == "logmel" and self.audio_seconds <= 0:
            raise SourceError("--audio-features logmel needs --audio-seconds S, the length every clip's audio is "
                              "cut or zero-padded to before its log-mel (the median clip length is a good choice)")
        for name in ("frames", "size", "sample_rate", "shard_size", "n_mels", "n_fft", "hop_length", "max_len"):
            if getattr(self, name) <= 0:
                raise SourceError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.fps <= 0:
            raise SourceError(f"--fps must be positive, got {self.fps}")
        if self.vocab_size < 3:
            raise SourceError(f"--vocab-size must be at least 3 ([PAD], [UNK] and a word), got {self.vocab_size}")
        if self.tokenizer and not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise SourceError(f"--tokenizer {self.tokenizer}: no tokenizer.json there; pass a local Hugging Face "
                              f"tokenizer directory")


@dataclass(frozen=True)
class BuildContext:
    """What shard tasks need beyond the options: how the corpus' samples are encoded (its kind's module-level
    `encode` function, so it travels to worker processes and Ray tasks), the label shape and the tokenizer."""

    num_classes: int
    multilabel: bool
    tokenizer: str = ""  # the `text.tokenizer` of dataset.json; "" when the dataset has no text
    encode: Callable | None = None  # SampleKind.encode of the corpus
