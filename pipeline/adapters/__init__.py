"""Dataset adapters, one module per family: each reads a raw corpus in its public release's own layout
and lists its samples (`Corpus`), with the `SampleKind` that encodes them."""
from __future__ import annotations

from typing import Callable

from pipeline.adapters.arrays import av_mnist
from pipeline.adapters.manifest import manifest
from pipeline.adapters.corpus import SPLITS, Corpus, Reject, Sample, SampleKind, SourceError
from pipeline.adapters.video import av_digits, ave, kinetics_sound
from pipeline.adapters.vision_language import MMIMDB_GENRES, food101, mm_imdb

ADAPTERS: dict[str, Callable[..., Corpus]] = {
    "kinetics_sound": kinetics_sound,
    "ave": ave,
    "av_digits": av_digits,
    "mm_imdb": mm_imdb,
    "food101": food101,
    "av_mnist": av_mnist,
    "manifest": manifest,
}

__all__ = ["ADAPTERS", "MMIMDB_GENRES", "SPLITS", "Corpus", "Reject", "Sample", "SampleKind", "SourceError"]
