"""Exported models (`trainer/export.py`): a checkpoint exported to model.safetensors + model.json loads in a
fresh process that imports only `trainer.export` (no Ray, no trainer config or training code) and gives
exactly the logits and scores `trainer.evaluate` computes for the same model and scenarios; bad folders and
files that do not fit are one-line errors naming the file."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shards.format import read_dataset_info  # noqa: E402
from shards.loader import make_loader  # noqa: E402
from shards.masks import parse_scenario, scenario_keep  # noqa: E402
from trainer.checkpoint import save_state  # noqa: E402
from trainer.config import Config, DataConfig, EvalConfig, ModelConfig  # noqa: E402
from trainer.evaluate import Method, evaluate  # noqa: E402
from trainer.export import ModelLoadError, export_checkpoint, load_model, save_model  # noqa: E402
from trainer.metrics import score  # noqa: E402
from trainer.models import model_for_dataset  # noqa: E402

SPLIT = "train"  # the kinetics_sound fixture's train split has clips without audio (natural missingness)
SCENARIOS = ["full", "missing:visual", "missing:audio", "rate:audio=0.5"]
NOT_NEEDED = {"ray", "trainer.train", "trainer.launch", "trainer.evaluate", "trainer.config", "trainer.checkpoint",
              "trainer.baselines", "trainer.resources"}
FRESH = """
import sys, torch
from trainer.export import load_model
model, meta = load_model(sys.argv[1])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "trainer"))
from shards.loader import make_loader
out = {"modules": loaded, "meta": meta["name"]}
for spec in sys.argv[4:]:
    loader = make_loader(sys.argv[2], sys.argv[3], 3, backend="torch", num_workers=0, scenario=spec,
                         crop=meta["inputs"]["crop"], seed=meta["inputs"]["scenario_seed"])
    logits, keys = [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(model(batch)["logits"])
            keys += batch["key"]
    out[spec] = {"logits": torch.cat(logits), "keys": keys}
torch.save(out, sys.argv[1] + "/fresh.pt")
"""
# the classical baselines that evaluate() fits warn on this tiny split (a class with one sample)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


def small_config(dataset: Path) -> Config:
    return Config(data=DataConfig(dataset_dir=str(dataset), batch_size=3, backend="torch", num_workers=0, crop_size=64),
                  model=ModelConfig(width=4, encoders={"visual": "resnet18_frames", "audio": "resnet18_spec"}),
                  eval=EvalConfig(scenarios=["full", "missing", "rate"], rates=[0.5], split=SPLIT, seed=3))


@pytest.fixture(scope="module")
def exported(kinetics_sound_built, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path, Path]:
    """A small model whose BatchNorm statistics moved off their initial values, checkpointed as a training
    stage would and exported with export_checkpoint."""
    config = small_config(kinetics_sound_built.path)
    info = read_dataset_info(config.data.dataset_dir)
    torch.manual_seed(0)
    model = model_for_dataset(config.model, info)
    model.train()
    with torch.no_grad():
        for batch in make_loader(config.data.dataset_dir, SPLIT, 3, backend="torch", num_workers=0, train=True,
                                 crop=64, seed=1):
            model(batch)
    tmp = tmp_path_factory.mktemp("export")
    checkpoint = tmp / "checkpoint_000001"
    checkpoint.mkdir()
    save_state(checkpoint, model=model, optimizer=None, scheduler=None, epoch=1, stage="unimodal",
               config=dataclasses.asdict(config), metrics={"val_acc": 0.5})
    out = export_checkpoint(checkpoint, config, tmp / "results" / "ume", "ume")
    return config, checkpoint, out


def test_export_writes_weights_and_what_the_shards_must_provide(exported) -> None:
    config, checkpoint, out = exported
    meta = json.loads((out / "model.json").read_text())
    info = read_dataset_info(config.data.dataset_dir)
    assert (out / "model.safetensors").is_file()
    assert meta["modalities"] == info.modalities and meta["classes"] == info.classes and meta["multilabel"] is False
    assert meta["model"] == {"encoders": config.model.encoders, "width": 4, "fusion": "sum", "pretrained": {}}
    assert meta["shards"]["visual"]["frames"] == info.visual["frames"]
    assert meta["shards"]["visual"]["mean"] == info.visual["mean"]
    assert meta["shards"]["audio"]["n_mels"] == info.audio["n_mels"]
    assert meta["shards"]["audio"]["hop_length"] == info.audio["hop_length"]
    assert meta["inputs"] == {"crop": 64, "scenario_seed": 3}
    assert meta["extra"]["stage"] == "unimodal" and meta["extra"]["checkpoint"] == str(checkpoint)


def test_a_fresh_process_reproduces_the_evaluation_logits_and_scores(exported) -> None:
    config, checkpoint, out = exported
    subprocess.run([sys.executable, "-c", FRESH, str(out), config.data.dataset_dir, SPLIT, *SCENARIOS],
                   cwd=ROOT, check=True, timeout=120)
    fresh = torch.load(out / "fresh.pt", weights_only=True)
    assert "trainer.export" in fresh["modules"]
    assert not set(fresh["modules"]) & NOT_NEEDED  # no Ray, no config, checkpoint, training or evaluation code

    # What trainer.evaluate computes: features of one natural-missingness pass, then the scenario's mask
    # before the heads and fusion (its module docstring); and its scores for the same checkpoint.
    model, _ = load_model(out)
    info = read_dataset_info(config.data.dataset_dir)
    feats, keys, labels, has = {m: [] for m in info.modalities}, [], [], []
    with torch.no_grad():
        for batch in make_loader(config.data.dataset_dir, SPLIT, 3, backend="torch", num_workers=0, crop=64):
            for i, m in enumerate(info.modalities):
                feats[m].append(model.encode(m, batch[m], batch["present"][:, i]))
            keys += batch["key"]
            labels.append(batch["label"])
            has.append(batch["present"])
    feats = {m: torch.cat(f) for m, f in feats.items()}
    labels, has = torch.cat(labels), torch.cat(has)
    results = evaluate(config, [Method("UME", str(checkpoint))])
    for spec in SCENARIOS:
        keep = torch.from_numpy(scenario_keep(keys, info.modalities, parse_scenario(spec, info.modalities), 3))
        with torch.no_grad():
            expected = model.fuse(feats, has & keep)["logits"]
        assert fresh[spec]["keys"] == keys
        torch.testing.assert_close(fresh[spec]["logits"], expected, rtol=1e-6, atol=1e-6)
        assert score(fresh[spec]["logits"], labels, False) == results["methods"]["UME"][spec]


def test_missing_or_damaged_files_are_one_line_errors_naming_them(exported, tmp_path: Path) -> None:
    config, _, out = exported
    with pytest.raises(ModelLoadError, match=r"no such model folder"):
        load_model(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(ModelLoadError, match=r"model\.json not found"):
        load_model(broken)
    (broken / "model.json").write_text((out / "model.json").read_text())
    with pytest.raises(ModelLoadError, match=r"model\.safetensors not found"):
        load_model(broken)
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"sha256 differs") as caught:
        load_model(broken)
    assert "\n" not in str(caught.value) and str(broken / "model.safetensors") in str(caught.value)
    (broken / "model.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"model\.json is not valid JSON"):
        load_model(broken)


def test_weights_that_do_not_fit_model_json_are_refused_with_the_fix(exported, tmp_path: Path) -> None:
    config, _, out = exported
    info = read_dataset_info(config.data.dataset_dir)
    wider = dataclasses.replace(config, model=dataclasses.replace(config.model, width=8))
    save_model(model_for_dataset(wider.model, info), info, wider, tmp_path / "wide", name="wide")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "model.safetensors").write_bytes((tmp_path / "wide" / "model.safetensors").read_bytes())
    meta = json.loads((out / "model.json").read_text())
    meta.pop("weights_sha256")  # a hand-assembled folder without the checksum: the shapes decide
    (mixed / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"does not fit the model .*shape.*export the model again") as caught:
        load_model(mixed)
    assert "\n" not in str(caught.value)
