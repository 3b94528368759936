"""Session fixtures: tiny raw corpora in the kinetics_sound and ave layouts (made with ffmpeg by
`tests/media.py`) and one shard dataset built from each.

The built datasets are shared by many tests: a test that changes files copies the dataset first."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests` has no __init__.py; make `tests.media` importable either way
    sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from tests.media import ave_corpus, kinetics_sound_corpus  # noqa: E402

# The fixture datasets are built with these command-line options (all others default), so a test can
# rebuild the same corpus with the CLI and expect byte-identical output.
FIXTURE_BUILD_ARGS = ["--shard-size", "2"]
FIXTURE_OPTIONS = BuildOptions(shard_size=2)


@dataclass(frozen=True)
class RawCorpus:
    """A raw corpus on disk and the stems/ids of its special cases by kind (see tests/media.py)."""

    dataset: str
    root: Path
    kinds: dict[str, list[str]]


@dataclass(frozen=True)
class BuiltDataset:
    """A shard dataset built from a `RawCorpus` with FIXTURE_OPTIONS and one worker."""

    raw: RawCorpus
    out_root: Path  # the --out passed to build-shards
    path: Path  # OUT/<dataset>


def _build(raw: RawCorpus, out_root: Path) -> BuiltDataset:
    build_shards(raw.dataset, raw.root, out_root, FIXTURE_OPTIONS, workers=1, progress=False)
    return BuiltDataset(raw, out_root, out_root / raw.dataset)


@pytest.fixture(scope="session")
def kinetics_sound_raw(tmp_path_factory: pytest.TempPathFactory) -> RawCorpus:
    """Kinetics-400 layout: two Kinetics-Sound classes, one class outside it, good, no-audio,
    short-audio, truncated, garbage and annotated-but-missing clips."""
    root = tmp_path_factory.mktemp("raw") / "kinetics400"
    return RawCorpus("kinetics_sound", root, kinetics_sound_corpus(root))


@pytest.fixture(scope="session")
def ave_raw(tmp_path_factory: pytest.TempPathFactory) -> RawCorpus:
    """AVE layout: Annotations.txt, {train,val,test}Set.txt, AVE/<id>.mp4; one no-audio, one missing."""
    root = tmp_path_factory.mktemp("raw") / "AVE_Dataset"
    return RawCorpus("ave", root, ave_corpus(root))


@pytest.fixture(scope="session")
def kinetics_sound_built(kinetics_sound_raw: RawCorpus, tmp_path_factory: pytest.TempPathFactory) -> BuiltDataset:
    return _build(kinetics_sound_raw, tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def ave_built(ave_raw: RawCorpus, tmp_path_factory: pytest.TempPathFactory) -> BuiltDataset:
    return _build(ave_raw, tmp_path_factory.mktemp("shards"))


@pytest.fixture
def one_torch_thread():
    """Run torch on one thread: the tensors of these tests are tiny, and more threads only contend with the
    other processes of the test run."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
