"""The recipe on Ray Train: stages, checkpoints, resume after a killed worker, evaluation, errors."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from pipeline.demo import make_demo  # noqa: E402
from shards.format import read_dataset_info  # noqa: E402
from shards.loader import make_loader  # noqa: E402
from trainer.checkpoint import load_state  # noqa: E402
from trainer.config import ConfigError, load_config  # noqa: E402
from trainer.launch import absolute, check_same_run, run_stage  # noqa: E402
from trainer.launch import main as launch_main  # noqa: E402
from trainer.models import build_model  # noqa: E402

PYTHON = sys.executable
CONFIG = ROOT / "trainer" / "configs" / "av_digits.toml"


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
                                        "joint + modality dropout", "UME", "UME-MMA", "UME, branch weights fitted on val"]
    assert results["chosen"]["model"] in ("UME", "UME-MMA") and results["chosen"]["split"] == "val"
    assert Path(results["chosen"]["checkpoint"]).is_dir() and set(results["chosen"]["values"]) == {"UME", "UME-MMA"}
    assert set(results["branch_weights"]["UME, branch weights fitted on val"]) == {"visual", "audio"}
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


def _in_process(digits: Path, storage: Path, fake: FakeRayTrain, **settings: object) -> list[dict]:
    """The unimodal stage as a Ray worker runs it, in this process (FakeRayTrain): its metrics rows."""
    from trainer.train import train_loop_per_worker

    values = {"data.dataset_dir": str(digits), "ray.storage_path": str(storage), "data.batch_size": 16,
              "data.num_workers": 1, "ray.cpus_per_worker": 1, **settings}
    config = absolute(load_config(CONFIG, [f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                                           for k, v in values.items()]))
    fake.run_dir, metrics = storage / "av_digits-unimodal", storage / "av_digits" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    fake.run_dir.mkdir()
    train_loop_per_worker({"config": dataclasses.asdict(config), "stage": "unimodal", "init_from": None,
                           "init": None, "metrics_path": str(metrics)})
    return _rows(metrics)


def test_killed_worker_resumes_from_checkpoint_with_the_same_result(digits: Path, tmp_path: Path,
                                                                   fake_ray_train: FakeRayTrain) -> None:
    """A Ray Train worker SIGKILLed in epoch 2 is restarted by Ray (max_failures) from epoch 1's checkpoint
    and ends with the metrics of the same stage trained without a kill (here in this process)."""
    common = {"train.epochs": 3, "data.backend": "torch", "ray.max_failures": 2, "data.batch_size": 8}
    faulty = tmp_path / "faulty"
    proc = launch(["--config", "trainer/configs/av_digits.toml", "--stages", "unimodal",
                   *overrides(digits, faulty, **common)])
    killed: list[int] = []

    def kill_in_epoch_2() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not killed:
            if len(metrics_rows(faulty, "av_digits")) >= 1:
                time.sleep(1.0)  # into the second epoch
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_in_epoch_2, daemon=True)
    killer.start()
    clean_rows = _in_process(digits, tmp_path / "clean", fake_ray_train, **common)  # meanwhile, the clean run
    killer.join(timeout=600)
    out, _ = proc.communicate(timeout=600)
    assert killed, "the worker was never seen"
    assert proc.returncode == 0, out[-3000:]
    rows = metrics_rows(faulty, "av_digits")
    assert rows[-1]["epoch"] == 3
    # the resumed run ends with the clean run's final metrics (CPU training is deterministic here)
    for key in ("train_loss", "val_acc", "val_acc_visual_branch", "val_acc_audio_branch"):
        assert rows[-1][key] == pytest.approx(clean_rows[-1][key], abs=1e-4), key


def test_learns_digits_from_frames_and_speech(digits: Path, tmp_path: Path, fake_ray_train: FakeRayTrain) -> None:
    rows = _in_process(digits, tmp_path, fake_ray_train, **{"train.epochs": 8, "train.lr_milestones": [5]})
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
        cmd = ["ray", "job", "submit", "--working-dir", str(ROOT), "--", "python", "-m", "trainer.launch",
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


def _set(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_storage_path_that_is_a_file_is_one_line_naming_it(digits: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    for storage in (blocker, blocker / "below"):
        assert launch_main(["--config", str(CONFIG), *_set(f"data.dataset_dir={digits}",
                                                           f"ray.storage_path={storage}")]) == 2
        assert capsys.readouterr().err == (
            f"error: ray.storage_path = {storage}: {blocker} is a file, not a directory; pass --set "
            f"ray.storage_path=<a directory> or move the file away\n")


def _fake_checkpoint(run_dir: Path, config, stage: str, epoch: int, init: dict | None = None) -> Path:
    """A state.pt recording what a stage was trained with, as train_loop_per_worker writes it."""
    ckpt = run_dir / f"checkpoint_2026-01-01_00-00-{epoch:02d}.000000"
    ckpt.mkdir(parents=True)
    torch.save({"model": {}, "epoch": epoch, "stage": stage, "metrics": {}, "init": init,
                "config": dataclasses.asdict(config)}, ckpt / "state.pt")
    return ckpt


def test_rerun_with_other_settings_is_refused_listing_them_and_the_ways_out(digits: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    base = [f"data.dataset_dir={digits}", f"ray.storage_path={tmp_path}", "train.epochs=2"]

    def cfg(*more: str):
        return load_config(CONFIG, base + list(more))

    for stage in ("unimodal", "joint", "joint_dropout"):
        _fake_checkpoint(tmp_path / f"av_digits-{stage}", cfg(), stage, 2)
    # through the CLI: one line and exit 2, before Ray starts
    assert launch_main(["--config", str(CONFIG), *_set(*base, "train.lr=0.01", "train.optimizer=sgd"),
                        "--stages", "unimodal"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: stage unimodal in "), err
    assert "(train.optimizer: 'adamw' -> 'sgd', unimodal.lr: 0.001 -> 0.01)" in err
    assert "a new --set ray.run_name=..." in err and "ray.resume=extend only lets the epochs grow" in err

    unimodal = tmp_path / "av_digits-unimodal"
    with pytest.raises(ConfigError, match=r"\(unimodal\.epochs: 2 -> 3\); .*since only the epochs grew, "
                                          r"--set ray\.resume=extend to train it on"):
        check_same_run(cfg("train.epochs=3"), "unimodal", unimodal)
    assert check_same_run(cfg("train.epochs=3", "ray.resume=extend"), "unimodal", unimodal) is False
    for other, diff in (("train.epochs=1", r"unimodal\.epochs: 2 -> 1"),
                        ("unimodal.lr_milestones=[1]", r"unimodal\.lr_milestones: \[4\] -> \[1\]"),
                        ("data.batch_size=8", r"data\.batch_size: 64 -> 8")):
        with pytest.raises(ConfigError, match=diff):  # extend lets the epochs grow, nothing else
            check_same_run(cfg(other, "ray.resume=extend"), "unimodal", unimodal)
    # how it runs may change; joint is trained without modality dropout whatever [joint_dropout] says
    how = cfg("data.backend=torch", "data.num_workers=0", "ray.num_workers=2", "ray.cpus_per_worker=1",
              "train.amp=bf16", "eval.rates=[0.5]")
    assert check_same_run(how, "joint", tmp_path / "av_digits-joint") is False
    assert check_same_run(cfg("joint_dropout.rate=0.2"), "joint", tmp_path / "av_digits-joint") is False
    with pytest.raises(ConfigError, match=r"joint_dropout\.rate: 0\.5 -> 0\.2"):
        check_same_run(cfg("joint_dropout.rate=0.2"), "joint_dropout", tmp_path / "av_digits-joint_dropout")

    # mma records the UME checkpoint it started from: a changed one is refused, or retrained with extend
    ume = {"checkpoint": "checkpoint_a", "epoch": 2}
    mma = _fake_checkpoint(tmp_path / "av_digits-mma", cfg(), "mma", 3, init=ume).parent
    assert check_same_run(cfg(), "mma", mma, ume) is False
    longer = {"checkpoint": "checkpoint_b", "epoch": 4}
    with pytest.raises(ConfigError, match=r"trained from the unimodal checkpoint checkpoint_a \(epoch 2\), the "
                                          r"unimodal stage now ends at checkpoint_b \(epoch 4\); pass --set "
                                          r"ray\.resume=extend"):
        check_same_run(cfg(), "mma", mma, longer)
    assert check_same_run(cfg("ray.resume=extend"), "mma", mma, longer) is True


class _Killed(Exception):
    """The driver dying between an epoch's metrics row and the registration of its checkpoint."""


class FakeRayTrain:
    """Ray Train for one worker in this process, with Ray's storage layout: `report` writes the epoch's
    checkpoint to <run_dir>/checkpoint_<epoch> (or dies at `killed_at`), `get_checkpoint` hands back the
    newest one there (as Ray Train does when a run of the same name starts again), and `trainer` stands in
    for `TorchTrainer(...)`, whose `fit()` runs the loop here."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import ray.train
        import ray.train.torch

        self.run_dir: Path | None = None
        self.killed_at: int | None = None
        self.reported: dict[tuple[str, int], dict] = {}
        self.world = 1  # the world size this process plays rank 0 of
        self.scaling = None  # the ScalingConfig the last `trainer(...)` was given
        monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0,
                                                                              get_world_size=lambda: self.world))
        monkeypatch.setattr(ray.train, "get_checkpoint", self.get_checkpoint)
        monkeypatch.setattr(ray.train, "report", self.report)
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kwargs: model)
        monkeypatch.setattr(ray.train.torch, "TorchTrainer", self.trainer)

    def get_checkpoint(self):
        import ray.train

        found = sorted(self.run_dir.glob("checkpoint_*"))
        return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None

    def report(self, row: dict, checkpoint) -> None:
        """`killed_at`: an epoch (its end-of-epoch report) or (epochs done, step) of a mid-epoch one."""
        step = row.get("step")
        if (row["epoch"] if step is None else (row["epoch"], step)) == self.killed_at:
            raise _Killed
        name = f"checkpoint_{row['epoch']:06d}" + ("" if step is None else f"_{step:06d}")  # in the order written
        shutil.copytree(checkpoint.path, self.run_dir / name)
        if step is None:
            self.reported[row["stage"], row["epoch"]] = row

    def trainer(self, loop, *, train_loop_config: dict, run_config, **kwargs) -> SimpleNamespace:
        self.scaling = kwargs.get("scaling_config")

        def fit() -> None:
            self.run_dir = Path(run_config.storage_path) / run_config.name
            self.run_dir.mkdir(parents=True, exist_ok=True)
            loop(train_loop_config)
        return SimpleNamespace(fit=fit)


@pytest.fixture
def fake_ray_train(monkeypatch: pytest.MonkeyPatch):
    threads = torch.get_num_threads()  # the loop sets this process's thread count (1: fast on busy cores)
    yield FakeRayTrain(monkeypatch)
    torch.set_num_threads(threads)


SMALL = ["data.backend=torch", "data.num_workers=0", "data.batch_size=32", "model.width=4", "data.crop_size=32",
         "ray.cpus_per_worker=1"]


def _loop_config(digits: Path, metrics: Path, *overrides: str) -> dict:
    config = load_config(CONFIG, [f"data.dataset_dir={digits}", *SMALL, *overrides])
    return {"config": dataclasses.asdict(config), "stage": "unimodal", "init_from": None, "init": None,
            "metrics_path": str(metrics)}


def _rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_an_epoch_trained_again_after_a_kill_has_one_metrics_row(digits: Path, tmp_path: Path,
                                                                 fake_ray_train: FakeRayTrain) -> None:
    """Killed after epoch 2's row and before its checkpoint, the loop resumes from epoch 1's checkpoint and
    trains epoch 2 again: metrics.jsonl keeps that epoch's new row only."""
    from trainer.train import train_loop_per_worker

    fake_ray_train.run_dir, metrics = tmp_path / "run", tmp_path / "metrics.jsonl"
    fake_ray_train.run_dir.mkdir()
    loop_config = _loop_config(digits, metrics, "train.epochs=2")
    fake_ray_train.killed_at = 2
    with pytest.raises(_Killed):
        train_loop_per_worker(loop_config)
    rows = _rows(metrics)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("unimodal", 1), ("unimodal", 2)]

    fake_ray_train.killed_at = None
    train_loop_per_worker(loop_config)
    again = _rows(metrics)
    assert [(r["stage"], r["epoch"]) for r in again] == [("unimodal", 1), ("unimodal", 2)]
    assert again[0] == rows[0] and again[1] == fake_ray_train.reported["unimodal", 2] != rows[1]


def test_an_extended_stage_takes_the_lr_drop_its_shorter_schedule_cut(digits: Path, tmp_path: Path,
                                                                    fake_ray_train: FakeRayTrain) -> None:
    """A 1-epoch run drops milestone 1 (it would only act after the last epoch); extended to 2 epochs, the
    stage trains epoch 2 at the dropped lr, as a 2-epoch run does."""
    from trainer.train import train_loop_per_worker

    fake_ray_train.run_dir, metrics = tmp_path / "run", tmp_path / "metrics.jsonl"
    fake_ray_train.run_dir.mkdir()
    train_loop_per_worker(_loop_config(digits, metrics, "train.epochs=1", "train.lr_milestones=[1]"))
    train_loop_per_worker(_loop_config(digits, metrics, "train.epochs=2", "train.lr_milestones=[1]"))
    assert [(r["epoch"], r["lr"]) for r in _rows(metrics)] == [(1, pytest.approx(1e-3)), (2, pytest.approx(1e-4))]


def test_extend_retrains_mma_from_the_longer_ume_and_refuses_it_without(digits: Path, tmp_path: Path,
                                                                      fake_ray_train: FakeRayTrain,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's stages over the stand-in trainer: UME extended from 1 to 2 epochs leaves the mma run
    trained from the 1-epoch UME; without extend that is refused, with it the old mma run is moved aside
    and mma trained again from the longer UME, its old metrics row replaced."""
    import trainer.launch

    monkeypatch.setattr(trainer.launch, "ensure_fits", lambda *args, **kwargs: None)  # no cluster here
    storage = tmp_path / "runs"
    (storage / "av_digits").mkdir(parents=True)

    def cfg(*more: str):
        return absolute(load_config(CONFIG, [f"data.dataset_dir={digits}", f"ray.storage_path={storage}", *SMALL,
                                             "train.epochs=1", "mma.epochs=1", *more]))

    ume = run_stage(cfg(), "unimodal", None, storage)
    old_mma = run_stage(cfg(), "mma", ume, storage)
    assert load_state(old_mma)["init"] == {"checkpoint": ume.name, "epoch": 1}
    longer = run_stage(cfg("train.epochs=2", "ray.resume=extend"), "unimodal", None, storage)
    assert load_state(longer)["epoch"] == 2 and longer != ume

    with pytest.raises(ConfigError, match=rf"trained from the unimodal checkpoint {ume.name} \(epoch 1\), the "
                                          rf"unimodal stage now ends at {longer.name} \(epoch 2\)"):
        run_stage(cfg("train.epochs=2"), "mma", longer, storage)
    mma = run_stage(cfg("train.epochs=2", "ray.resume=extend"), "mma", longer, storage)
    assert (storage / "av_digits-mma.superseded-1" / old_mma.name).is_dir()
    assert load_state(mma)["init"] == {"checkpoint": longer.name, "epoch": 2}
    rows = metrics_rows(storage, "av_digits")
    assert [(r["stage"], r["epoch"]) for r in rows] == [("unimodal", 1), ("unimodal", 2), ("mma", 1)]
    assert rows[-1] == fake_ray_train.reported["mma", 1]  # the new mma row, not the old one
    assert run_stage(cfg("train.epochs=2"), "mma", longer, storage) == mma  # consistent now: skipped


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(digits: Path, tmp_path: Path,
                                                                    fake_ray_train: FakeRayTrain) -> None:
    """`train.checkpoint_every_steps`: killed inside epoch 2 (7 steps an epoch, checkpoints after steps 3
    and 6), the rerun resumes after step 3 of epoch 2 and ends with the weights and per-epoch losses of a
    run that was never stopped."""
    from trainer.train import train_loop_per_worker

    def run(name: str, killed_at=None) -> tuple[dict, list[dict]]:
        fake_ray_train.run_dir, metrics = tmp_path / name, tmp_path / f"{name}.jsonl"
        fake_ray_train.run_dir.mkdir()
        fake_ray_train.killed_at = killed_at
        loop = _loop_config(digits, metrics, "train.epochs=2", "train.checkpoint_every_steps=3")
        try:
            train_loop_per_worker(loop)
        except _Killed:
            assert sorted(p.name for p in fake_ray_train.run_dir.iterdir())[-1] == "checkpoint_000001_000003"
            fake_ray_train.killed_at = None
            train_loop_per_worker(loop)
        final = sorted(fake_ray_train.run_dir.glob("checkpoint_*"))[-1]
        return load_state(final), _rows(metrics)

    clean, clean_rows = run("clean")
    resumed, rows = run("resumed", killed_at=(1, 6))
    assert [r["epoch"] for r in rows] == [1, 2] and resumed["epoch"] == 2 and resumed["progress"] is None
    for key in ("train_loss", "val_acc", "val_acc_visual_branch", "val_acc_audio_branch"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in clean_rows], abs=1e-6), key
    for key, value in clean["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key


def test_elastic_workers_and_a_mid_epoch_resume_on_another_world_size(digits: Path, tmp_path: Path,
                                                                     fake_ray_train: FakeRayTrain,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """`ray.num_workers = [1, 2]` is Ray Train's elastic (min, max); a checkpoint from inside an epoch on 1
    worker resumes on 2, which go on from the epoch's global position (each remaining sample once)."""
    import trainer.launch
    from trainer.train import train_loop_per_worker

    monkeypatch.setattr(trainer.launch, "ensure_fits", lambda *args, **kwargs: None)  # no cluster here
    storage = tmp_path / "runs"
    (storage / "av_digits").mkdir(parents=True)
    config = absolute(load_config(CONFIG, [f"data.dataset_dir={digits}", f"ray.storage_path={storage}", *SMALL,
                                           "train.epochs=1", "ray.num_workers=[1, 2]"]))
    run_stage(config, "unimodal", None, storage)
    assert fake_ray_train.scaling.num_workers == (1, 2)
    with pytest.raises(ConfigError, match=r"ray\.num_workers = \[2, 1\]; it must be >= 1, or \[min, max\]"):
        load_config(CONFIG, ["ray.num_workers=[2, 1]"])

    fake_ray_train.run_dir, metrics = tmp_path / "resized", tmp_path / "resized.jsonl"
    fake_ray_train.run_dir.mkdir()
    loop = _loop_config(digits, metrics, "train.epochs=2", "train.checkpoint_every_steps=3")
    fake_ray_train.killed_at = (1, 6)  # inside epoch 2 (7 steps on one worker); the last checkpoint: step 3
    with pytest.raises(_Killed):
        train_loop_per_worker(loop)
    fake_ray_train.killed_at, fake_ray_train.world = None, 2  # 3 steps an epoch per worker on two
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        train_loop_per_worker(loop)
    batch = load_config(CONFIG, SMALL).data.batch_size
    # 3 steps of one worker done: the 2 workers go on from there, with the 7 - 3 steps' samples left (2 each)
    assert (f"written inside epoch 2 by 1 worker(s), this run has 2; going on from sample {3 * batch} of the "
            "epoch's order: 2 more steps, each remaining sample once") in caplog.text
    rows = _rows(metrics)
    assert [(r["epoch"], r["world_size"]) for r in rows] == [(1, 1), (2, 2)]
    assert load_state(sorted(fake_ray_train.run_dir.glob("checkpoint_*"))[-1])["epoch"] == 2


def test_auto_epochs_keep_each_branch_at_its_best_validation_epoch(digits: Path, tmp_path: Path,
                                                                 fake_ray_train: FakeRayTrain,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`unimodal.epochs = "auto"`: the stage stops once no branch improved for `patience` epochs (or at
    max_epochs), and its final checkpoint holds each branch's weights from that branch's best epoch."""
    import trainer.launch

    monkeypatch.setattr(trainer.launch, "ensure_fits", lambda *args, **kwargs: None)  # no cluster here
    storage = tmp_path / "runs"
    (storage / "av_digits").mkdir(parents=True)
    config = absolute(load_config(CONFIG, [f"data.dataset_dir={digits}", f"ray.storage_path={storage}", *SMALL,
                                           "unimodal.epochs=auto", "unimodal.max_epochs=4", "unimodal.patience=1"]))
    final = run_stage(config, "unimodal", None, storage)
    rows = metrics_rows(storage, "av_digits")
    state = load_state(final)
    kept = state["metrics"]["kept_epochs"]
    assert state["metrics"]["finished"] is True and set(kept) == {"visual", "audio"}
    for m, epoch in kept.items():  # the first epoch with the branch's best validation metric
        values = [r[f"val_acc_{m}_branch"] for r in rows]
        assert epoch == 1 + values.index(max(values))
    assert len(rows) == 4 or all(len(rows) - e >= 1 for e in kept.values())  # max_epochs, or every branch stale
    for m, epoch in kept.items():
        at_best = load_state(fake_ray_train.run_dir / f"checkpoint_{epoch:06d}")["model"]
        for key in (k for k in at_best if k.startswith((f"encoders.{m}.", f"heads.{m}."))):
            assert torch.equal(state["model"][key], at_best[key]), key
    assert run_stage(config, "unimodal", None, storage) == final  # finished early: a rerun skips it


def test_ctrl_c_is_one_line_naming_what_finished_and_exit_130(digits: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    import trainer.launch

    def interrupted(config, stages, progress):
        progress.finished.append("unimodal")
        progress.current = "joint"
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.launch, "run_recipe", interrupted)
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert launch_main(["--config", str(CONFIG), *_set(f"data.dataset_dir={digits}",
                                                           f"ray.storage_path={tmp_path}")]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == ("interrupted: stopped during joint (finished: unimodal); rerun the same "
                                       "command to resume from the last checkpoints (finished stages are skipped)\n")


def _driver_tracebacks(out: str) -> list[str]:
    """Tracebacks the launcher printed (not those Ray's own actors log, prefixed "(Name pid=N)")."""
    return [line for line in out.splitlines() if "Traceback" in line and "pid=" not in line]


@pytest.fixture(scope="module")
def local_ray() -> str:
    """A local Ray in this process (2 CPUs) for tests that call the stages in-process, and its address for
    launchers that join it; shut down after the module (also when an earlier in-process launch started it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ctrl_c_stops_training_in_seconds_and_the_rerun_resumes(digits: Path, tmp_path: Path,
                                                                 local_ray: str) -> None:
    """Ctrl-C during epoch 2 exits 130 within seconds in one line; a rerun with more epochs is refused, and
    with ray.resume=extend it resumes from the checkpoint the interrupted run left (epoch 1 is not trained
    again) and trains on to the new count (Ray Train restoring a run of the same name)."""
    storage = tmp_path / "runs"
    settings = {"data.backend": "torch", "model.width": 8, "data.batch_size": 32, "train.epochs": 2}
    # the launcher joins this process's Ray (as under `ray job submit`): no second cluster to start
    proc = launch(["--config", "trainer/configs/av_digits.toml", "--stages", "unimodal",
                   *overrides(digits, storage, **settings)], env={"RAY_ADDRESS": local_ray}, start_new_session=True)
    # Ray Train's record of the checkpoints it registered: once epoch 1's is there, a rerun resumes from it
    snapshot = storage / "av_digits-unimodal" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (
            snapshot.is_file() and "checkpoint_dir_name" in snapshot.read_text()):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground process group
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 130, out[-3000:]
    assert took < 30, took  # measured: about 6 s on 2 busy cores (Ray Train's own handler: 14 s, exit 1)
    assert not _driver_tracebacks(out), out[-3000:]
    assert [line for line in out.splitlines() if line.startswith("interrupted: ")] == [
        "interrupted: stopped during unimodal (no stage finished); rerun the same command to resume from the "
        "last checkpoints (finished stages are skipped)"]
    first = metrics_rows(storage, "av_digits")[0]

    def cfg(*more: str):  # the same settings, run in this process by the stage function launch.py calls
        return absolute(load_config(CONFIG, [*(f"{k}={v}" for k, v in settings.items()),
                                             f"data.dataset_dir={digits}", f"ray.storage_path={storage}",
                                             "data.num_workers=1", "ray.cpus_per_worker=1", *more]))

    with pytest.raises(ConfigError, match=r"unimodal\.epochs: 2 -> 3\); .*--set ray\.resume=extend"):
        run_stage(cfg("train.epochs=3"), "unimodal", None, storage)
    ume = run_stage(cfg("train.epochs=3", "ray.resume=extend"), "unimodal", None, storage)
    assert load_state(ume)["epoch"] == 3
    rows = metrics_rows(storage, "av_digits")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[0] == first  # epoch 1 was not trained again


def test_a_stage_the_cluster_cannot_hold_is_refused_in_one_line(digits: Path, tmp_path: Path, local_ray,
                                                               capsys: pytest.CaptureFixture) -> None:
    args = ["--config", str(CONFIG), *_set(f"data.dataset_dir={digits}", f"ray.storage_path={tmp_path}",
                                           "ray.cpus_per_worker=4096"), "--stages", "unimodal"]
    started = time.monotonic()
    assert launch_main(args) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: stage unimodal needs 1 x (4096 CPUs) = 4096 CPUs but the Ray cluster has "), err
    assert "pass --set ray.cpus_per_worker=" in err
