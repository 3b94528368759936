"""The recipe on Ray Train: stages, checkpoints, resume after a killed worker, evaluation, errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from pipeline.demo import make_demo  # noqa: E402
from shards.format import read_dataset_info  # noqa: E402
from shards.loader import make_loader  # noqa: E402
from trainer.checkpoint import load_state  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.launch import main as launch_main  # noqa: E402
from trainer.models import build_model  # noqa: E402

PYTHON = sys.executable


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small av_digits shard dataset (real digits and speech), 64 px frames, 64 mel bins."""
    raw = tmp_path_factory.mktemp("raw") / "av_digits"
    make_demo(raw, n_train=240, n_val=60, n_test=60, seed=1, progress=False)
    out = tmp_path_factory.mktemp("shards")
    build_shards("av_digits", raw, out, BuildOptions(size=64, n_mels=64, shard_size=64), progress=False)
    return out / "av_digits"


def overrides(dataset: Path, storage: Path, **extra: object) -> list[str]:
    values = {"data.dataset_dir": str(dataset), "ray.storage_path": str(storage), "data.batch_size": 16,
              "data.num_workers": 1, "train.epochs": 2, "mma.epochs": 1, "ray.cpus_per_worker": 1, **extra}
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={json.dumps(value) if isinstance(value, str) else value}"]
    return out


def launch(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(ROOT / "trainer" / "launch.py"), *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def metrics_rows(storage: Path, run: str) -> list[dict]:
    path = storage / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_whole_recipe_writes_table_and_mma_starts_as_the_ume_ensemble(digits: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    proc = launch(["--config", "trainer/configs/av_digits.toml",
                   *overrides(digits, storage, **{"ray.num_workers": 2, "data.backend": "dali"})])
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    results = json.loads((storage / "av_digits" / "results" / "results.json").read_text())
    assert list(results["methods"]) == ["visual-only", "audio-only", "joint late fusion",
                                        "joint + modality dropout", "UME", "UME-MMA"]
    assert "missing:audio" in results["scenarios"] and "rate:visual=0.5" in results["scenarios"]
    assert results["present"]["missing:audio"]["audio"] == 0
    assert (storage / "av_digits" / "results" / "missing_rate.png").stat().st_size > 10_000
    # an audio-only model scores at chance or below when audio is missing (it sees nothing)
    assert results["methods"]["audio-only"]["missing:audio"]["acc"] <= 0.35
    rows = metrics_rows(storage, "av_digits")
    assert {r["stage"] for r in rows} == {"unimodal", "joint", "joint_dropout", "mma"}
    assert all(r["world_size"] == 2 for r in rows)
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 and r["samples_per_s"] > 0 for r in rows)

    # checkpoints are plain tensors + python values
    unimodal = sorted(p for p in (storage / "av_digits-unimodal").glob("checkpoint_*") if p.is_dir())[-1]
    state = torch.load(unimodal / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["stage"] == "unimodal"

    # MMA step 0 == UME ensemble: the fused logits are exactly the sum of the branches' logits
    config = load_config(ROOT / "trainer/configs/av_digits.toml", [f"data.dataset_dir={digits}"])
    info = read_dataset_info(digits)
    ume = build_model(config.model, info.modalities, info.num_classes)
    ume.load_state_dict(load_state(unimodal)["model"])
    ume.eval()
    batch = next(iter(make_loader(digits, "test", 8, backend="torch", num_workers=0)))
    with torch.no_grad():
        out = ume(batch)
        branches = sum(ume.heads[m](ume.encoders[m](batch[m])) * batch["present"][:, i, None]
                       for i, m in enumerate(info.modalities))
    assert torch.allclose(out["logits"], branches, atol=1e-5)

    # rerunning resumes: every stage is finished, nothing is trained again
    proc = launch(["--config", "trainer/configs/av_digits.toml", *overrides(digits, storage, **{"ray.num_workers": 2})])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("already finished") == 4
    assert len(metrics_rows(storage, "av_digits")) == len(rows)


def _train_worker_pids() -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line]


def test_killed_worker_resumes_from_checkpoint_with_the_same_result(digits: Path, tmp_path: Path) -> None:
    common = {"train.epochs": 3, "data.backend": "torch", "ray.max_failures": 2, "data.batch_size": 8}
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    proc = launch(["--config", "trainer/configs/av_digits.toml", "--stages", "unimodal",
                   *overrides(digits, clean, **common)])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

    proc = launch(["--config", "trainer/configs/av_digits.toml", "--stages", "unimodal",
                   *overrides(digits, faulty, **common)])
    killed = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if killed is None and len(metrics_rows(faulty, "av_digits")) >= 1:
            time.sleep(1.0)  # into the second epoch
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, "the worker was never seen"
    assert proc.returncode == 0, out[-3000:]
    rows = metrics_rows(faulty, "av_digits")
    clean_rows = metrics_rows(clean, "av_digits")
    assert rows[-1]["epoch"] == 3
    # the resumed run ends with the clean run's final metrics (CPU training is deterministic here)
    for key in ("train_loss", "val_acc", "val_acc_visual_branch", "val_acc_audio_branch"):
        assert rows[-1][key] == pytest.approx(clean_rows[-1][key], abs=1e-4), key


def test_learns_digits_from_frames_and_speech(digits: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    proc = launch(["--config", "trainer/configs/av_digits.toml", "--stages", "unimodal",
                   *overrides(digits, storage, **{"train.epochs": 8, "train.lr_milestones": [5]})])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    rows = metrics_rows(storage, "av_digits")
    first, last = rows[0], rows[-1]
    # 240 training clips of 10 classes, 8 epochs at batch 16 (measured: val 0.50, visual branch 0.52):
    # the loss falls several-fold and both the branch and the ensemble are at least 4x chance (10%)
    assert last["train_loss"] < first["train_loss"] / 3, rows
    assert last["val_acc_visual_branch"] >= 0.4, last
    assert last["val_acc"] >= 0.4, last


@pytest.mark.parametrize("bad, message", [
    (["--set", "train.nope=1"], "nope"),
    (["--set", "model.encoders.visual=resnet99"], "resnet99"),
    (["--set", "data.dataset_dir=/does/not/exist"], "dataset.json"),
    (["--set", "mma.drop_probs.text=0.5", "--set", "mma.drop_probs.full=0.0"], "text"),
])
def test_bad_config_exits_2_with_a_message(digits: Path, tmp_path: Path, bad: list[str], message: str,
                                           capsys: pytest.CaptureFixture) -> None:
    args = ["--config", str(ROOT / "trainer/configs/av_digits.toml"), "--set", f"data.dataset_dir={digits}",
            "--set", f"ray.storage_path={tmp_path}", *bad]
    assert launch_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_checkpoint_of_another_model_is_refused(digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = load_config(ROOT / "trainer/configs/av_digits.toml", [f"data.dataset_dir={digits}", "model.width=8"])
    info = read_dataset_info(digits)
    model = build_model(config.model, info.modalities, info.num_classes)
    run = tmp_path / "av_digits-unimodal" / "checkpoint_000"
    run.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 99, "stage": "unimodal", "metrics": {}}, run / "state.pt")
    args = ["--config", str(ROOT / "trainer/configs/av_digits.toml"), "--set", f"data.dataset_dir={digits}",
            "--set", f"ray.storage_path={tmp_path}", "--set", "mma.epochs=1", "--stages", "mma"]
    assert launch_main(args) == 2
    assert "does not fit this model" in capsys.readouterr().err


def test_ray_job_submit_runs_launch_on_a_cluster(digits: Path, tmp_path: Path) -> None:
    from cluster.local import start_cluster, stop_cluster

    state = tmp_path / "cluster"
    info = start_cluster(1, 2, state, head_cpus=1, port=0, dashboard_port=0)
    try:
        storage = tmp_path / "runs"
        cmd = ["ray", "job", "submit", "--working-dir", str(ROOT), "--", "python", "trainer/launch.py",
               "--config", "trainer/configs/av_digits.toml", "--stages", "unimodal",
               *overrides(digits, storage, **{"train.epochs": 1})]
        env = info.cli_env()
        env["PATH"] = f"{Path(PYTHON).parent}:{env.get('PATH', '')}"
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "succeeded" in (done.stdout + done.stderr).lower()
        rows = metrics_rows(storage, "av_digits")
        assert [r["stage"] for r in rows] == ["unimodal"]
    finally:
        stop_cluster(state)
    assert not info.alive()
