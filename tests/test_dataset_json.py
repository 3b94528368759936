"""dataset.json's modality sections are typed once (shards.format.VisualInfo, AudioInfo, TextInfo): the build
writes them, the loaders and the trainer read attributes, and the file holds exactly their JSON form."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shards.format import AudioInfo, FormatError, VisualInfo, read_dataset_info


def test_the_sections_read_back_typed_and_write_the_same_json(kinetics_sound_built, tmp_path: Path) -> None:
    info = read_dataset_info(kinetics_sound_built.path)
    assert isinstance(info.visual, VisualInfo) and isinstance(info.audio, AudioInfo) and info.text is None
    assert (info.visual.frames, info.audio.kind, info.audio.codec) == (3, "waveform", "wav")
    on_disk = json.loads((kinetics_sound_built.path / "dataset.json").read_text())
    assert info.visual.to_json() == on_disk["visual"] and info.audio.to_json() == on_disk["audio"]
    assert on_disk["text"] == {} and dict(info.audio) == on_disk["audio"]  # a Mapping: the JSON object
    assert "fps" in on_disk["visual"] and "source" not in on_disk["visual"]  # None fields are left out
    assert json.loads(info.to_json()) == on_disk


def test_a_section_this_version_does_not_know_is_one_line_saying_rebuild(kinetics_sound_built, tmp_path: Path) -> None:
    copy = tmp_path / "ks"
    shutil.copytree(kinetics_sound_built.path, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    doc["audio"]["n_mel"] = doc["audio"].pop("n_mels")  # a typo, or another version's key
    (copy / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"dataset\.json \[audio\]: unknown keys \['n_mel'\]; rebuild the shards"):
        read_dataset_info(copy)
    del doc["visual"]["frames"]
    doc["audio"]["n_mels"] = doc["audio"].pop("n_mel")
    (copy / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"\[visual\]: missing keys \['frames'\]; rebuild the shards"):
        read_dataset_info(copy)
