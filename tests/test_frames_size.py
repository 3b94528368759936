"""Every decoded frame is checked against the size the build recorded for its sample (`frame_height`,
`frame_width` in manifest.parquet; `frame_size` in the sample's json): `pipeline verify`, the torch loader
and the DALI loader name the shard, the key and the member of a frame whose JPEG header claims another
size, instead of passing it on (torch) or failing without a name (DALI).

The bad frames are made by rewriting the height in a JPEG's frame header (SOF) inside a copy of the
fixture dataset: same byte length, so the index stays valid, and the shard's sha256 in dataset.json is
updated, so only the size check can catch it. A smaller height still decodes (the decoder stops early)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from shards.format import jpeg_size, read_dataset_info
from shards.loader import dali_available, make_loader
from shards.sample_refs import SampleRef, split_samples
from shards.verify import verify_dataset
from shards.writer import sha256_file
from tests.conftest import BuiltDataset

SPLIT = "train"
SHRINK = 16  # rows taken off the height the header claims
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
pytestmark = pytest.mark.filterwarnings(
    "ignore:Checkpointing enabled in a pipeline with external source:UserWarning")


def sof_offset(jpeg: bytes) -> int:
    """Offset of the frame header (SOFn marker) in a JPEG."""
    i = 2
    while jpeg[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
    return i


def shrink_frames(dataset: Path, ref: SampleRef, members: list[str]) -> tuple[int, int]:
    """Make `members` of one sample claim SHRINK fewer rows, in place; fix the shard's sha256. Returns the
    size they now decode to."""
    with open(ref.tar, "r+b") as f:
        for member in members:
            offset, size = ref.members[member]
            f.seek(offset)
            jpeg = f.read(size)
            height, width = jpeg_size(jpeg)
            f.seek(offset + sof_offset(jpeg) + 5)
            f.write((height - SHRINK).to_bytes(2, "big"))
    doc = json.loads((dataset / "dataset.json").read_text())
    shard = Path(ref.tar).relative_to(dataset).as_posix()
    next(s for s in doc["shards"] if s["path"] == shard)["sha256"] = sha256_file(Path(ref.tar))
    (dataset / "dataset.json").write_text(json.dumps(doc, indent=2))
    return height - SHRINK, width


@pytest.fixture
def dataset(kinetics_sound_built: BuiltDataset, tmp_path: Path) -> Path:
    """A copy of the fixture dataset, which records the frame sizes (checked here, as the build's contract)."""
    path = Path(shutil.copytree(kinetics_sound_built.path, tmp_path / "kinetics_sound"))
    manifest = pq.read_table(path / "manifest.parquet").to_pylist()
    assert all(r["frame_height"] > 0 and r["frame_width"] > 0 for r in manifest if r["has_visual"])
    assert verify_dataset(path, progress=False) == []
    return path


def bad_sample(dataset: Path) -> SampleRef:
    """The sample whose frames the tests rewrite: the third of the split (in its second shard)."""
    ref = split_samples(dataset, read_dataset_info(dataset), SPLIT)[2]
    assert "f1.jpg" in ref.members
    return ref


def load_all(dataset: Path, backend: str) -> list[dict]:
    """One evaluation pass; the torch loader in-process (test_loader.py covers worker processes)."""
    return list(make_loader(dataset, SPLIT, 2, backend=backend, crop=32, num_workers=0 if backend == "torch" else 1))


def assert_names(message: str, ref: SampleRef, member: str, got: tuple[int, int]) -> None:
    assert ref.tar in message and ref.key in message and f".{member}" in message, message
    assert f"decodes to {got[0]}x{got[1]}" in message and "pipeline verify" in message, message


def test_verify_names_shard_key_and_member_of_a_frame_of_another_size(dataset: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    ref = bad_sample(dataset)
    got = shrink_frames(dataset, ref, ["f1.jpg"])
    assert main(["-q", "verify", str(dataset)]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
    shard = Path(ref.tar).relative_to(dataset).as_posix()
    assert fails == [f"FAIL {shard}: key {ref.key} member .f1.jpg decodes to {got[0]}x{got[1]} (height x width), "
                     f"the build recorded {ref.frame_size[0]}x{ref.frame_size[1]}"]


@pytest.mark.parametrize("members", [["f1.jpg"], ["f0.jpg", "f1.jpg", "f2.jpg"]], ids=["one_frame", "every_frame"])
def test_torch_loader_names_shard_key_and_member_of_a_frame_of_another_size(members: list[str],
                                                                            dataset: Path) -> None:
    from shards.torch_loader import SampleDecodeError

    ref = bad_sample(dataset)
    got = shrink_frames(dataset, ref, members)
    with pytest.raises(SampleDecodeError) as err:
        load_all(dataset, "torch")
    assert_names(str(err.value), ref, members[0], got)


@needs_dali
@pytest.mark.parametrize("members", [["f1.jpg"], ["f0.jpg", "f1.jpg", "f2.jpg"]], ids=["one_frame", "every_frame"])
def test_dali_loader_names_shard_key_and_member_of_a_frame_of_another_size(members: list[str],
                                                                           dataset: Path) -> None:
    """One frame: the frames cannot be stacked, the pipeline fails and the failure locator names it. Every
    frame: the pipeline runs (a consistent wrong size), and the shapes check after the run names it."""
    from shards.dali_loader import DecodeFailure

    ref = bad_sample(dataset)
    got = shrink_frames(dataset, ref, members)
    with pytest.raises(DecodeFailure) as err:
        load_all(dataset, "dali")
    assert_names(str(err.value), ref, members[0], got)
    assert (err.value.__cause__ is None) == (len(members) > 1)  # which of the two checks caught it


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torch"])
def test_a_dataset_without_recorded_frame_sizes_still_loads_unchecked(backend: str, dataset: Path) -> None:
    manifest = pq.read_table(dataset / "manifest.parquet")
    pq.write_table(manifest.drop_columns(["frame_height", "frame_width"]), dataset / "manifest.parquet")
    ref = bad_sample(dataset)
    assert ref.frame_size is None
    shrink_frames(dataset, ref, ["f0.jpg", "f1.jpg", "f2.jpg"])
    assert verify_dataset(dataset, progress=False) == []
    assert ref.key in [k for batch in load_all(dataset, backend) for k in batch["key"]]
