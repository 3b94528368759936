"""Dataset adapters, one module per family: each reads a raw corpus in its public release's own layout
and lists its samples (`Corpus`), with the `SampleKind` that encodes them.

Another package adds an adapter without editing this one by declaring an entry point in the group
`ume_mma.adapters` (`name = "module:function"`, the function taking `src: Path` and keyword options and
returning a `Corpus`); `pipeline build-shards --help` lists it. In its pyproject.toml:

    [project.entry-points."ume_mma.adapters"]
    my_corpus = "my_package.adapter:my_corpus"
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points

from pipeline.adapters.arrays import av_mnist
from pipeline.adapters.corpus import SPLITS, Corpus, Reject, Sample, SampleKind, SourceError
from pipeline.adapters.manifest import manifest
from pipeline.adapters.video import av_digits, ave, crema_d, kinetics_sound, vggsound
from pipeline.adapters.vision_language import MMIMDB_GENRES, food101, mm_imdb

ADAPTERS: dict[str, Callable[..., Corpus]] = {
    "kinetics_sound": kinetics_sound,
    "ave": ave,
    "av_digits": av_digits,
    "mm_imdb": mm_imdb,
    "food101": food101,
    "av_mnist": av_mnist,
    "crema_d": crema_d,
    "vggsound": vggsound,
    "manifest": manifest,
}

ENTRY_POINT_GROUP = "ume_mma.adapters"
log = logging.getLogger(__name__)


def adapters() -> dict[str, Callable[..., Corpus]]:
    """The built-in adapters and those other installed packages declare in `ENTRY_POINT_GROUP` (a plugin
    may not replace a built-in name; one that fails to load is skipped with a warning)."""
    found = dict(ADAPTERS)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in found:
            log.warning("adapter plugin %s (%s) ignored: %r is a built-in adapter", ep.name, ep.value, ep.name)
            continue
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # a broken plugin must not break the built-in adapters
            log.warning("adapter plugin %s (%s) could not be loaded: %s: %s", ep.name, ep.value,
                        type(exc).__name__, exc)
    return found


__all__ = ["ADAPTERS", "ENTRY_POINT_GROUP", "MMIMDB_GENRES", "SPLITS", "Corpus", "Reject", "Sample", "SampleKind",
           "SourceError", "adapters"]
