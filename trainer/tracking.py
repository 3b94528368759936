"""Training curves for rank 0 of a stage: TensorBoard event files and, optionally, MLflow.

    <storage_path>/<run_name>/tensorboard/<stage>/         per epoch: train/loss, train/lr, val/<metric>
                                                           (fused and per branch), system/samples_per_s,
                                                           system/data_wait_fraction, system/world_size
    <storage_path>/<run_name>/tensorboard/<stage>/steps/   with log_every_steps = N: train/loss every N steps

`tensorboard --logdir <storage_path>/<run_name>/tensorboard` shows the stages side by side. A stage that
resumes after epoch k drops the events after k (TensorBoard's purge step), as metrics.jsonl drops its rows,
so an epoch trained again after a kill has one point, the one of the model its checkpoint holds.

MLflow (with `mlflow_uri`): one experiment per `run_name` (or `mlflow_experiment`), one MLflow run per
stage, named after it and tagged `ume_mma.stage`, with the same metric names as metrics.jsonl and the epoch
as the step, so MLflow's compare view overlays the stages' curves; the flattened config goes in as params.
A resumed stage (start_epoch > 0) logs into its existing run. A `file:` URI is a local file store; MLflow 3
keeps that store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true, which the Tracker
sets for `file:` URIs, since asking for one is the opt-in. A tracking server that fails mid-stage costs one
warning and the rest of the stage's MLflow logging, never the training.

`tensorboard` and `mlflow` are imported only when used; a missing one is a TrackingError whose one line
gives the pip command."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
STAGE_TAG = "ume_mma.stage"
SKIPPED = {"stage", "epoch"}  # metrics.jsonl keys that are not curves


class TrackingError(RuntimeError):
    """A tracking backend that cannot be used (not installed, unreachable); the message says what to do."""


def check_tracking(*, tensorboard: bool = True, mlflow_uri: str = "") -> None:
    """Fail fast (in the driver, before any Ray work) when a requested backend is not installed."""
    if tensorboard:
        _import_summary_writer()
    if mlflow_uri:
        _import_mlflow()


def tensorboard_tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: train_loss -> train/loss, lr -> train/lr, val_acc -> val/acc,
    anything else (samples/s, data wait, world size) -> system/<key>."""
    if key == "lr":
        return "train/lr"
    for prefix in ("train", "val"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"system/{key}"


class Tracker:
    """Per-epoch (and optionally per-N-steps) metrics of one stage, written by rank 0 only."""

    def __init__(self, run_dir: str | Path, stage: str, *, tensorboard: bool = True, log_every_steps: int = 0,
                 mlflow_uri: str = "", mlflow_experiment: str = "", start_epoch: int = 0, steps_per_epoch: int = 0,
                 params: dict[str, Any] | None = None) -> None:
        self.stage = stage
        self.log_every_steps = log_every_steps
        self.steps_per_epoch = steps_per_epoch
        self.log_dir = Path(run_dir) / "tensorboard" / stage
        self._writer = self._step_writer = None
        if tensorboard:
            writer_class = _import_summary_writer()
            purge = start_epoch + 1 if start_epoch else None  # epoch steps are 1-based (metrics["epoch"])
            self._writer = writer_class(str(self.log_dir), purge_step=purge)
            if log_every_steps > 0:
                first = start_epoch * steps_per_epoch + 1 if start_epoch else None
                self._step_writer = writer_class(str(self.log_dir / "steps"), purge_step=first)
        self._mlflow = self._run_id = None
        if mlflow_uri:
            self._start_mlflow(mlflow_uri, mlflow_experiment or Path(run_dir).name, start_epoch, params or {})

    def _start_mlflow(self, uri: str, experiment: str, start_epoch: int, params: dict[str, Any]) -> None:
        mlflow = _import_mlflow()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            client = mlflow.tracking.MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            runs = client.search_runs([experiment_id], filter_string=f"tags.`{STAGE_TAG}` = '{self.stage}'",
                                      order_by=["attributes.start_time DESC"], max_results=1) if start_epoch else []
            if runs:
                self._run_id = runs[0].info.run_id
                client.update_run(self._run_id, status="RUNNING")
            else:
                run = client.create_run(experiment_id, run_name=self.stage, tags={STAGE_TAG: self.stage})
                self._run_id = run.info.run_id
                flat = _flatten(params)
                items = [mlflow.entities.Param(k, str(v)[:500]) for k, v in flat.items()]
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                    client.log_batch(self._run_id, params=items[i:i + 100])
        except Exception as exc:  # an unreachable server or a bad URI: say which, before training starts
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise TrackingError(f"[track] mlflow_uri = {uri!r}: cannot start an MLflow run ({type(exc).__name__}: "
                                f"{reason}); fix the URI or set [track] mlflow_uri = \"\"") from None
        self._mlflow = (mlflow, client)

    def log_step(self, epoch: int, step: int, loss: float) -> None:
        """The training loss at step `step` (1-based) of epoch `epoch` (0-based), every log_every_steps steps."""
        if self.log_every_steps <= 0 or step % self.log_every_steps:
            return
        global_step = epoch * self.steps_per_epoch + step
        if self._step_writer is not None:
            self._step_writer.add_scalar("train/loss", float(loss), global_step)
        self._mlflow_log({"step_train_loss": float(loss)}, global_step)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One metrics.jsonl row (`epoch` is the 1-based step); non-numeric values are skipped."""
        epoch = int(metrics["epoch"])
        values = {k: float(v) for k, v in metrics.items()
                  if k not in SKIPPED and isinstance(v, int | float) and not isinstance(v, bool)}
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(tensorboard_tag(key), value, epoch)
            self._writer.flush()
        if self._step_writer is not None:
            self._step_writer.flush()
        self._mlflow_log(values, epoch)

    def _mlflow_log(self, values: dict[str, float], step: int) -> None:
        if self._mlflow is None or not values:
            return
        mlflow, client = self._mlflow
        try:
            now = int(time.time() * 1000)
            client.log_batch(self._run_id, metrics=[mlflow.entities.Metric(k, v, now, step) for k, v in values.items()])
        except Exception as exc:  # keep training; one warning, then MLflow is off for this stage
            log.warning("[%s] MLflow logging failed (%s: %s); the rest of this stage goes to TensorBoard and "
                        "metrics.jsonl only", self.stage, type(exc).__name__, exc)
            self._mlflow = None

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close the event files; end the MLflow run with `status` (FINISHED, FAILED, KILLED)."""
        for writer in (self._writer, self._step_writer):
            if writer is not None:
                writer.close()
        self._writer = self._step_writer = None
        if self._mlflow is not None:
            _, client = self._mlflow
            try:
                client.set_terminated(self._run_id, status=status)
            except Exception as exc:
                log.warning("[%s] MLflow: could not end run %s (%s)", self.stage, self._run_id, exc)
            self._mlflow = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrackingError("[track] tensorboard = true needs the tensorboard package: pip install -c constraints.txt "
                            "tensorboard (or set [track] tensorboard = false)") from None
    return SummaryWriter


def _import_mlflow():
    try:
        import mlflow
        import mlflow.entities
        import mlflow.tracking
    except ImportError:
        raise TrackingError("[track] mlflow_uri is set but mlflow is not installed: pip install -c constraints.txt "
                            "mlflow-skinny (or set [track] mlflow_uri = \"\")") from None
    return mlflow


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
