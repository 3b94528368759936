"""`trainer.tracking.Tracker`: TensorBoard event files per stage under the run folder, readable by
TensorBoard's own reader (a resumed stage replaces the epochs it trains again), and MLflow runs (one per
stage) in a local file store holding the same metrics as metrics.jsonl."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.tracking import Tracker, TrackingError  # noqa: E402

STEPS_PER_EPOCH = 4
CONFIG = {"model": {"width": 16, "fusion": "sum"}, "train": {"lr": 1e-3, "epochs": 3}, "ray": {"run_name": "digits"}}


def row(stage: str, epoch: int, loss: float) -> dict:
    """A metrics.jsonl row as trainer/train.py writes it."""
    return {"stage": stage, "epoch": epoch, "train_loss": loss, "samples_per_s": 250.0 + epoch,
            "data_wait_fraction": 0.02, "lr": 1e-3, "world_size": 1, "val_acc": 0.5 + epoch / 10,
            "val_acc_visual_branch": 0.4 + epoch / 10, "val_acc_audio_branch": 0.3 + epoch / 10}


def train(tracker: Tracker, stage: str, epochs: range, loss0: float) -> None:
    """What the training loop calls: the loss every step, the row every epoch."""
    for epoch in epochs:
        for step in range(1, STEPS_PER_EPOCH + 1):
            tracker.log_step(epoch, step, loss0 / (epoch * STEPS_PER_EPOCH + step))
        tracker.log_epoch(row(stage, epoch + 1, loss0 / (epoch + 1)))


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(e.step, round(e.value, 6)) for e in accumulator.Scalars(tag)]


def test_tensorboard_events_per_stage_and_a_resumed_epoch_replaces_its_points(tmp_path: Path) -> None:
    run_dir = tmp_path / "digits"
    with Tracker(run_dir, "unimodal", log_every_steps=2, steps_per_epoch=STEPS_PER_EPOCH) as tracker:
        train(tracker, "unimodal", range(3), 1.0)
    board = run_dir / "tensorboard" / "unimodal"
    assert list(board.glob("events.out.tfevents.*"))
    assert scalars(board, "train/loss") == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]
    assert [v for _, v in scalars(board, "val/acc")] == [0.6, 0.7, 0.8]
    assert [v for _, v in scalars(board, "val/acc_audio_branch")] == [0.4, 0.5, 0.6]
    assert [v for _, v in scalars(board, "system/samples_per_s")] == [251.0, 252.0, 253.0]
    assert [s for s, _ in scalars(board, "system/data_wait_fraction")] == [1, 2, 3]
    assert [s for s, _ in scalars(board, "train/lr")] == [1, 2, 3]
    assert [s for s, _ in scalars(board / "steps", "train/loss")] == [2, 4, 6, 8, 10, 12]

    # killed during epoch 3, resumed from the checkpoint of epoch 1: epochs 2 and 3 are trained again
    with Tracker(run_dir, "unimodal", log_every_steps=2, steps_per_epoch=STEPS_PER_EPOCH, start_epoch=1) as tracker:
        train(tracker, "unimodal", range(1, 3), 10.0)
    assert scalars(board, "train/loss") == [(1, 1.0), (2, 5.0), (3, round(10 / 3, 6))]
    assert [s for s, _ in scalars(board / "steps", "train/loss")] == [2, 4, 6, 8, 10, 12]

    with Tracker(run_dir, "mma", steps_per_epoch=STEPS_PER_EPOCH) as tracker:
        train(tracker, "mma", range(1), 0.2)
    assert scalars(run_dir / "tensorboard" / "mma", "train/loss") == [(1, 0.2)]
    assert not (run_dir / "tensorboard" / "mma" / "steps").exists()  # log_every_steps = 0: per epoch only


def test_mlflow_file_store_has_one_run_per_stage_with_the_metrics(tmp_path: Path) -> None:
    import mlflow

    uri = f"file://{tmp_path / 'mlruns'}"
    run_dir = tmp_path / "digits"
    with Tracker(run_dir, "unimodal", tensorboard=False, mlflow_uri=uri, params=CONFIG) as tracker:
        train(tracker, "unimodal", range(2), 1.0)
    with Tracker(run_dir, "unimodal", tensorboard=False, mlflow_uri=uri, start_epoch=2) as tracker:  # resumed
        train(tracker, "unimodal", range(2, 3), 1.0)
    with Tracker(run_dir, "mma", mlflow_uri=uri, log_every_steps=2, steps_per_epoch=STEPS_PER_EPOCH) as tracker:
        train(tracker, "mma", range(1), 0.5)

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits")  # the run folder's name (ray.run_name)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["mma", "unimodal"]
    ume = runs["unimodal"]
    assert ume.info.status == "FINISHED" and ume.data.tags["ume_mma.stage"] == "unimodal"
    assert ume.data.params["model.width"] == "16" and ume.data.params["train.lr"] == "0.001"
    history = client.get_metric_history(ume.info.run_id, "train_loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]
    assert {"val_acc", "val_acc_visual_branch", "val_acc_audio_branch", "lr", "samples_per_s",
            "data_wait_fraction"} <= set(ume.data.metrics)
    assert ume.data.metrics["val_acc"] == pytest.approx(0.8)
    steps = client.get_metric_history(runs["mma"].info.run_id, "step_train_loss")
    assert [m.step for m in steps] == [2, 4]
    assert list((run_dir / "tensorboard" / "mma").glob("events.out.tfevents.*"))  # both backends at once


def test_mlflow_uri_without_mlflow_is_one_line_with_the_pip_command(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['mlflow'] = None\n"  # what Python sees when mlflow is not installed
            "from trainer.tracking import Tracker, TrackingError\n"
            f"try:\n    Tracker({str(tmp_path)!r}, 'unimodal', tensorboard=False, mlflow_uri='file:///tmp/x')\n"
            "except TrackingError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.count("\n") == 1
    assert "mlflow is not installed: pip install -c constraints.txt mlflow-skinny" in done.stdout


def test_an_unreachable_mlflow_store_fails_before_training_naming_the_uri(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingError, match=r"mlflow_uri = 'file://.*/file/mlruns': cannot start an MLflow run"):
        Tracker(tmp_path / "digits", "unimodal", tensorboard=False, mlflow_uri=f"file://{blocker}/mlruns")
