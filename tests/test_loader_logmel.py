"""Stored log-mel (`audio.kind = "logmel_array"`): both loaders read the float16 `logmel.npy` member as the
audio tensor, and it equals what they compute from the waveform within float16 precision.

The stored dataset is made here from the waveform fixture dataset, as `pipeline build-shards --audio-features
logmel` lays it out: each sample's WAV member replaced by `logmel.npy`, the float16 [n_mels, n_frames] of
`shards.features.log_mel` of its samples, written with `shards.writer`, and dataset.json's audio section
rewritten (shards' sha256 and sizes updated; manifest and rejects unchanged)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.features import AudioParams, log_mel
from shards.format import encode_npy, read_dataset_info, read_index
from shards.loader import dali_available, make_loader
from shards.members import decode_audio_member
from shards.verify import verify_dataset
from shards.writer import ShardWriter, write_shard
from tests.conftest import BuiltDataset

SPLIT = "train"
TOLERANCE = 2e-3  # float16 keeps 11 significant bits: 1e-3 at the log-mel's largest values (about 2)
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")),
            "torch"]
pytestmark = pytest.mark.filterwarnings(
    "ignore:Checkpointing enabled in a pipeline with external source:UserWarning")


def to_stored_logmel(src: Path, dst: Path) -> Path:
    """A copy of the waveform dataset `src` whose audio members are stored log-mel arrays."""
    info = read_dataset_info(src)
    audio = AudioParams.from_info(info.audio)
    codec = info.audio.get("codec", "wav")
    doc = json.loads((src / "dataset.json").read_text())
    for shard in doc["shards"]:
        writer = ShardWriter()
        with open(src / shard["path"], "rb") as tar:
            for key, members in read_index((src / shard["path"]).with_suffix(".idx")):
                converted = {}
                for ext, (offset, size) in members.items():
                    tar.seek(offset)
                    data = tar.read(size)
                    if ext == codec:
                        samples = decode_audio_member(data).astype(np.float32) / 32768.0
                        ext, data = "logmel.npy", encode_npy(log_mel(samples, audio)[0].numpy().astype(np.float16))
                    converted[ext] = data
                writer.add(key, converted)
        (dst / shard["path"]).parent.mkdir(parents=True, exist_ok=True)
        shard["sha256"], shard["bytes"] = write_shard(dst / shard["path"], writer)
    section = {k: v for k, v in doc["audio"].items() if k != "codec"}
    doc["audio"] = {**section, "kind": "logmel_array", "member": "logmel.npy", "dtype": "float16",
                    "shape": [audio.n_mels, audio.n_frames]}
    (dst / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    for name in ("manifest.parquet", "rejects.parquet"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def stored(kinetics_sound_built: BuiltDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_stored_logmel(kinetics_sound_built.path, tmp_path_factory.mktemp("logmel") / "kinetics_sound")


def epoch(path: Path, backend: str) -> list[dict]:
    return list(make_loader(path, SPLIT, 2, backend=backend, crop=32, num_workers=1))


def test_the_stored_dataset_is_what_the_build_writes(stored: Path) -> None:
    info = read_dataset_info(stored)
    assert info.audio["kind"] == "logmel_array" and info.audio["dtype"] == "float16"
    members = {ext for idx in stored.glob("*/*.idx") for _, m in read_index(idx) for ext in m}
    assert "logmel.npy" in members and "wav" not in members
    assert verify_dataset(stored, progress=False) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_stored_log_mel_gives_the_waveforms_audio_tensor(backend: str, stored: Path,
                                                         kinetics_sound_built: BuiltDataset) -> None:
    waveform, logmel = epoch(kinetics_sound_built.path, backend), epoch(stored, backend)
    assert [b["key"] for b in logmel] == [b["key"] for b in waveform]
    present = torch.cat([b["present"] for b in logmel])
    assert torch.equal(present, torch.cat([b["present"] for b in waveform]))
    assert present[:, 1].any() and not present[:, 1].all()  # clips with and without audio
    got, want = torch.cat([b["audio"] for b in logmel]), torch.cat([b["audio"] for b in waveform])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= TOLERANCE
    assert torch.count_nonzero(got[~present[:, 1]]) == 0  # absent audio is zeros
    assert torch.equal(torch.cat([b["visual"] for b in logmel]), torch.cat([b["visual"] for b in waveform]))
