"""The classical baselines of the results table (`trainer/baselines.py`): fitted on the train split by
`evaluate`, written under the methods in results.md/results.json, scored like the uni-modal models, and
the line under the table that names a branch scoring below its baseline."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests` has no __init__.py; make `tests.media` importable either way
    sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from shards.format import read_dataset_info  # noqa: E402
from tests.media import food101_corpus, mm_imdb_corpus  # noqa: E402
from trainer.baselines import baseline_name  # noqa: E402
from trainer.evaluate import Method, evaluate, method_claims, undertrained_branches, write_results  # noqa: E402

MAKERS = {"food101": food101_corpus, "mm_imdb": mm_imdb_corpus}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("baseline_shards")
    for name, make in MAKERS.items():
        raw = tmp_path_factory.mktemp(f"raw_{name}")
        make(raw)
        build_shards(name, raw, out, BuildOptions(size=64, shard_size=4, max_len=24), workers=1, progress=False)
    return {name: out / name for name in MAKERS}


def _untrained_checkpoint(path: Path, tmp_path: Path):
    """A config for the dataset and a checkpoint of an untrained model: its branches are weak by construction."""
    from trainer.checkpoint import save_state
    from trainer.config import config_from_dict
    from trainer.train import make_model

    config = config_from_dict({
        "data": {"dataset_dir": str(path), "batch_size": 4, "backend": "torch", "num_workers": 0, "crop_size": 32},
        "model": {"width": 8, "encoders": {"visual": "resnet18_frames", "text": "text_transformer"}},
        "ray": {"storage_path": str(tmp_path), "run_name": "baselines"},
        "eval": {"rates": [0.5]},
    }, source="test")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_state(ckpt, model=make_model(config, read_dataset_info(path)), optimizer=None, scheduler=None, epoch=0,
               stage="unimodal", config={}, metrics={})
    return config, str(ckpt)


@pytest.mark.parametrize("name", list(MAKERS))
def test_baseline_rows_are_fitted_on_train_scored_per_scenario_and_written(name: str, built: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    config, ckpt = _untrained_checkpoint(built[name], tmp_path)
    info = read_dataset_info(built[name])
    results = evaluate(config, [Method(f"{m}-only", ckpt, only=m) for m in info.modalities])

    assert set(results["baselines"]) == set(info.modalities)
    assert list(results["methods"]) == ["visual-only", "text-only"]  # the methods' rows are unchanged
    for m, baseline in results["baselines"].items():
        assert baseline["name"] == baseline_name(m)
        assert baseline["train_samples"] == info.splits["train"][f"has_{m}"]
        assert set(baseline["scores"]) == set(results["scenarios"])
        # scored as a uni-modal model: with its modality missing it has zero logits, like the untrained row
        assert baseline["scores"][f"missing:{m}"] == results["methods"][f"{m}-only"][f"missing:{m}"]
    if name == "food101":  # colour-coded images and class words in the titles: a linear model learns both
        assert results["baselines"]["text"]["scores"]["full"]["acc"] >= 0.8
        assert results["baselines"]["visual"]["scores"]["full"]["acc"] >= 0.6

    notes = method_claims(results)
    md = write_results(results, tmp_path / "results", notes).read_text()
    written = json.loads((tmp_path / "results" / "results.json").read_text())
    assert written["baselines"] == results["baselines"]
    for m in info.modalities:
        assert f"| {baseline_name(m)} | " in md
    if name == "food101":  # the untrained text branch is far below tf-idf + logistic regression
        assert any(line.startswith("the text branch is under-trained: text-only ") for line in notes)
        assert "- the text branch is under-trained" in md


def _results(branch: float, baseline: float) -> dict:
    full = lambda acc: {"full": {"acc": acc}}  # noqa: E731
    return {"multilabel": False, "scenarios": ["full"], "modalities": ["text"],
            "methods": {"text-only": full(branch)},
            "baselines": {"text": {"name": baseline_name("text"), "train_samples": 10, "scores": full(baseline)}}}


def test_a_branch_below_its_baseline_on_full_data_is_called_under_trained() -> None:
    assert undertrained_branches(_results(0.727, 0.896)) == [
        "the text branch is under-trained: text-only 72.7 vs 89.6 for tf-idf + logistic regression on full test "
        "data; a trained encoder should beat a linear model on down-sampled inputs (train it longer, or check "
        "what it is fed)"]
    assert method_claims(_results(0.727, 0.896)) == undertrained_branches(_results(0.727, 0.896))


@pytest.mark.parametrize("branch", [0.896, 0.95])
def test_a_branch_at_or_above_its_baseline_gets_no_line(branch: float) -> None:
    assert undertrained_branches(_results(branch, 0.896)) == []
    assert method_claims(_results(branch, 0.896)) == []
