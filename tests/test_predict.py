"""`python -m trainer.predict` on fixture shards: one Parquet row per sample with probabilities, top-1,
the present flags actually used (natural missingness AND the requested masks) and the true label; shards
that do not fit the model and bad paths exit 2 with one `error:` line saying what differs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from shards.format import read_dataset_info  # noqa: E402
from shards.masks import parse_scenario, scenario_keep  # noqa: E402
from trainer.config import Config, DataConfig, EvalConfig, ModelConfig  # noqa: E402
from trainer.export import save_model  # noqa: E402
from trainer.models import model_for_dataset  # noqa: E402
from trainer.predict import main as predict_main  # noqa: E402

SPLIT = "train"  # the fixture's split with clips that have no audio track
SEED = 1  # the model's evaluation seed; on this split seed 0 would drop other samples' audio


@pytest.fixture(scope="module")
def model_dir(kinetics_sound_built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = Config(data=DataConfig(dataset_dir=str(kinetics_sound_built.path), crop_size=64),
                    model=ModelConfig(width=4, encoders={"visual": "resnet18_frames", "audio": "resnet18_spec"}),
                    eval=EvalConfig(seed=SEED))
    info = read_dataset_info(kinetics_sound_built.path)
    torch.manual_seed(0)
    return save_model(model_for_dataset(config.model, info), info, config,
                      tmp_path_factory.mktemp("predict") / "chosen", name="chosen")


@pytest.fixture(scope="module")
def natural(kinetics_sound_built) -> dict[str, dict]:
    """key -> manifest row (label, has_visual, has_audio) of the split."""
    rows = pq.read_table(kinetics_sound_built.path / "manifest.parquet").to_pylist()
    return {r["key"]: r for r in rows if r["split"] == SPLIT}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.predict", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def read(path: Path) -> tuple[dict[str, list], dict]:
    table = pq.read_table(path)
    return table.to_pydict(), json.loads(table.schema.metadata[b"ume_mma"])


def check_rows(columns: dict[str, list], natural: dict[str, dict], classes: list[str]) -> np.ndarray:
    """Columns, labels and probabilities every prediction file has; returns the probabilities [N, C]."""
    assert list(columns)[:5] == ["key", "label", "label_class", "pred", "pred_class"]
    assert list(columns)[5:7] == ["present_visual", "present_audio"]
    assert list(columns)[7:] == [f"prob_{c}" for c in classes]
    assert sorted(columns["key"]) == sorted(natural)
    assert columns["label"] == [natural[k]["label"] for k in columns["key"]]
    assert columns["label_class"] == [classes[i] for i in columns["label"]]
    prob = np.stack([columns[f"prob_{c}"] for c in classes], axis=1)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-5)
    anything = np.array(columns["present_visual"]) | np.array(columns["present_audio"])
    assert [p for p, a in zip(columns["pred"], anything) if a] == list(prob.argmax(axis=1)[anything])
    assert all(p is None for p, a in zip(columns["pred"], anything) if not a)
    assert [c for c, p in zip(columns["pred_class"], columns["pred"]) if p is not None] == \
        [classes[p] for p in columns["pred"] if p is not None]
    return prob


def test_cli_writes_probabilities_top1_present_flags_and_labels(model_dir: Path, kinetics_sound_built, natural,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "full.parquet"
    done = run_cli("--model", str(model_dir), "--shards", str(kinetics_sound_built.path), "--split", SPLIT,
                   "--backend", "torch", "--device", "cpu", "--batch-size", "2", "--num-workers", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    columns, record = read(out)
    classes = read_dataset_info(kinetics_sound_built.path).classes
    check_rows(columns, natural, classes)
    assert columns["present_visual"] == [natural[k]["has_visual"] for k in columns["key"]]
    assert columns["present_audio"] == [natural[k]["has_audio"] for k in columns["key"]]
    assert not all(columns["present_audio"])  # natural missingness is in the fixture
    assert record["scenarios"] == ["full"] and record["seed"] == SEED and record["classes"] == classes


def test_missing_visual_and_a_rate_scenario_mask_what_the_model_sees(model_dir: Path, kinetics_sound_built, natural,
                                                                      tmp_path: Path) -> None:
    shards = str(kinetics_sound_built.path)
    info = read_dataset_info(shards)
    common = ["--model", str(model_dir), "--shards", shards, "--split", SPLIT, "--backend", "torch", "--quiet",
              "--num-workers", "0"]
    assert predict_main([*common, "--missing", "visual", "--out", str(tmp_path / "mv.parquet")]) == 0
    columns, record = read(tmp_path / "mv.parquet")
    check_rows(columns, natural, info.classes)
    assert not any(columns["present_visual"])
    assert columns["present_audio"] == [natural[k]["has_audio"] for k in columns["key"]]
    assert record["scenarios"] == ["missing:visual"]
    # a sample with neither modality left: uniform probabilities, no prediction
    empty = [i for i, a in enumerate(columns["present_audio"]) if not a]
    assert empty and all(columns["pred"][i] is None for i in empty)

    assert predict_main([*common, "--scenario", "rate:audio=0.5", "--out", str(tmp_path / "rate.parquet")]) == 0
    columns, record = read(tmp_path / "rate.parquet")
    check_rows(columns, natural, info.classes)
    keep = scenario_keep(columns["key"], info.modalities, parse_scenario("rate:audio=0.5", info.modalities), SEED)
    expected = [natural[k]["has_audio"] and bool(kept) for k, kept in zip(columns["key"], keep[:, 1])]
    assert columns["present_audio"] == expected  # the model's evaluation seed picks the samples
    assert columns["present_visual"] == [natural[k]["has_visual"] for k in columns["key"]]
    assert sum(natural[k]["has_audio"] for k in columns["key"]) > sum(expected) > 0
    seed0 = scenario_keep(columns["key"], info.modalities, parse_scenario("rate:audio=0.5", info.modalities), 0)
    assert expected != [natural[k]["has_audio"] and bool(kept) for k, kept in zip(columns["key"], seed0[:, 1])]


def test_a_wrong_model_folder_exits_2_in_one_line(kinetics_sound_built, tmp_path: Path) -> None:
    done = run_cli("--model", str(tmp_path / "no-model"), "--shards", str(kinetics_sound_built.path),
                   "--out", str(tmp_path / "x.parquet"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert str(tmp_path / "no-model") in done.stderr and "model.json" in done.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_shards_of_another_dataset_or_other_parameters_exit_2_naming_what_differs(
        model_dir: Path, ave_built, kinetics_sound_raw, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "x.parquet")
    assert predict_main(["--model", str(model_dir), "--shards", str(ave_built.path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "classes: model 31 of kinetics_sound" in err and "shards 3 of ave" in err

    build_shards("kinetics_sound", kinetics_sound_raw.root, tmp_path / "mels", BuildOptions(shard_size=2, n_mels=64),
                 workers=1, progress=False)
    assert predict_main(["--model", str(model_dir), "--shards", str(tmp_path / "mels" / "kinetics_sound"),
                         "--split", SPLIT, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audio.n_mels: model 128, shards 64" in err and "classes" not in err
    assert predict_main(["--model", str(model_dir), "--shards", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "dataset.json not found" in capsys.readouterr().err
    assert not Path(out).exists()


def test_help_explains_every_option_with_an_example() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    for option in ("--model", "--shards", "--split", "--missing", "--scenario", "--batch-size", "--device",
                   "--backend", "--out", "e.g."):
        assert option in done.stdout
    assert "python -m trainer.predict --model" in done.stdout
