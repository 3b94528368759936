"""Run the whole recipe on Ray: unimodal (UME) -> mma (UME-MMA) -> baselines -> eval -> results.

    python -m trainer.launch --config trainer/configs/av_digits.toml            # starts a local Ray
    python trainer/launch.py --config ...                                        # the same, once installed
    ray job submit --working-dir . -- python -m trainer.launch --config ...     # joins RAY_ADDRESS

Each training stage is a Ray Train `TorchTrainer` run named `<run_name>-<stage>` under
`ray.storage_path`; rerunning the same command resumes every stage from its last checkpoint and skips
finished ones. A rerun whose settings differ from what a stage's checkpoints recorded is refused, naming
the differences; `--set ray.resume=extend` lets a stage whose epochs alone grew train on to the new
count, and retrains `mma` from scratch when its UME checkpoint changed (the old run is moved aside to
`<run_name>-mma.superseded-<n>`). Before a stage starts, its workers' resources are checked against the
cluster (`trainer/resources.py`); Ctrl-C stops the run within seconds (exit 130) and the next run resumes.
Results go to `<storage_path>/<run_name>/results/` (results.md, results.json, missing_rate.png, and the
exported models `ume/`, `ume_mma/`, `chosen/`), per-epoch metrics to `<storage_path>/<run_name>/metrics.jsonl`
and TensorBoard event files to `<storage_path>/<run_name>/tensorboard/<stage>/`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shards.format import FormatError, read_dataset_info
from shards.masks import ScenarioError
from trainer import recipe
from trainer.checkpoint import CheckpointMismatch, load_state
from trainer.config import Config, ConfigError, load_config
from trainer.recipe import Schedule
from trainer.resources import cluster_view, ensure_fits, has_auto, resolve_auto
from trainer.tracking import TrackingError, check_tracking

log = logging.getLogger("trainer.launch")


def _states(run_dir: Path) -> Iterator[tuple[Path, dict]]:
    """A stage's checkpoints with their state.pt, newest first; one being written when the run died (no
    state.pt, or an unreadable one) is skipped."""
    for ckpt in sorted((p for p in run_dir.glob("checkpoint_*") if (p / "state.pt").is_file()), reverse=True):
        try:
            yield ckpt, load_state(ckpt)
        except Exception:
            continue


def finished_checkpoint(run_dir: Path, plan: Schedule) -> Path | None:
    """The checkpoint of a stage that already ran all its epochs (or, with "auto", stopped early), if any."""
    for ckpt, state in _states(run_dir):
        if (state["metrics"].get("finished") is True) if plan.auto else state["epoch"] >= plan.limit:
            return ckpt
    return None


def run_stage(config: Config, stage: str, init_from: Path | None, storage: Path) -> Path:
    """Train one stage (a name of `trainer.recipe.RECIPE`) with Ray Train, resuming if a previous run of the
    same name stopped early; returns its final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.train import train_loop_per_worker

    name = f"{config.ray.run_name}-{stage}"
    plan = recipe.schedule(config, recipe.STAGES[stage])
    init = init_record(init_from)
    if check_same_run(config, stage, storage / name, init):
        aside = supersede(storage / name)
        log.info("stage %s: the unimodal checkpoint it started from has changed (ray.resume=extend); training "
                 "it again from scratch, the old run moved to %s", stage, aside)
    done = finished_checkpoint(storage / name, plan)
    if done is not None:
        log.info("stage %s already finished (%s); skipping", stage, done)
        return done
    if init_from is not None:
        check_fits(config, init_from)
    if has_auto(config):  # callers other than run_recipe (benchmarks) may pass "auto" settings
        config = resolve_auto(config, cluster_view())
    ensure_fits(config, f"stage {stage}", config.ray.min_workers)
    loop_config = {"config": dataclasses.asdict(config), "stage": stage,
                   "init_from": str(init_from) if init_from else None, "init": init,
                   "metrics_path": str(storage / config.ray.run_name / "metrics.jsonl")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.ray.scaling_workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": config.ray.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=config.ray.max_failures)),
    )
    epochs = f"up to {plan.max_epochs} epochs (early stopping)" if plan.auto else f"{plan.epochs} epochs"
    workers = ("{}..{} (elastic)".format(*config.ray.num_workers) if isinstance(config.ray.num_workers, list)
               else config.ray.num_workers)
    log.info("stage %s (%s): %s on %s worker(s)", stage, recipe.STAGES[stage].summary, epochs, workers)
    try:
        _fit(trainer, stage)
    except Exception as exc:  # Ray Train raises the workers' error: report its cause in one line
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise StageFailed(f"stage {stage} failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]} "
                          f"(logs and checkpoints in {storage / name})") from exc
    done = finished_checkpoint(storage / name, plan)
    if done is None:
        raise StageFailed(f"stage {stage} ended without a final checkpoint (see {storage / name})")
    return done


def _fit(trainer, stage: str) -> None:
    """`trainer.fit()` in a helper thread, so that Ctrl-C reaches this (main) thread at once. From the
    main thread, Ray Train installs its own SIGINT handler, which asks the controller to abort and waits:
    that neither returns while the controller retries placing workers nor stops a running epoch."""
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the main thread below
            failure.append(exc)

    thread = threading.Thread(target=fit, name=f"fit-{stage}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if failure:
        raise failure[0]


class StageFailed(RuntimeError):
    """A training stage that failed after its retries; the message names the cause and where to look."""


def init_record(checkpoint: Path | None) -> dict | None:
    """Which checkpoint a stage starts from (mma: the UME checkpoint), as its checkpoints record it."""
    if checkpoint is None:
        return None
    return {"checkpoint": checkpoint.name, "epoch": int(load_state(checkpoint)["epoch"])}


def _latest_state(run_dir: Path) -> dict | None:
    """The newest readable state.pt of a stage's run."""
    return next((state for _, state in _states(run_dir)), None)


def check_same_run(config: Config, stage: str, run_dir: Path, init: dict | None = None) -> bool:
    """A rerun resumes or skips a stage only when everything that decides what it trains (`recipe.settings`:
    the model, the data, the stage's schedule) equals what its last checkpoint recorded, and it starts from the same checkpoint.

    With `ray.resume = "extend"`, a stage whose epochs alone grew is let through (it trains on from its last
    checkpoint to the new count), and True is returned when the stage's initial checkpoint changed (mma
    after its UME stage was extended): the stage must be trained again from scratch. Anything else that
    differs is a ConfigError listing `key: old -> new` and the ways out."""
    state = _latest_state(run_dir)
    if state is None or not state.get("config"):
        return False
    epochs_key = f"{stage}.epochs"
    before = recipe.settings(state["config"], recipe.STAGES[stage])
    now = recipe.settings(dataclasses.asdict(config), recipe.STAGES[stage])
    changed = {k: (before[k], now[k]) for k in now if before[k] != now[k]}
    extend = config.ray.resume == "extend"
    grew = (list(changed) == [epochs_key] and isinstance(now[epochs_key], int)
            and isinstance(before[epochs_key], int) and before[epochs_key] < now[epochs_key])
    if changed and not (extend and grew):
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        hint = ("or, since only the epochs grew, --set ray.resume=extend to train it on to the new count" if grew
                else "or restore these values (--set ray.resume=extend only lets the epochs grow)")
        raise ConfigError(f"stage {stage} in {run_dir} was trained with other settings ({diff}); pass a new "
                          f"--set ray.run_name=... to train these from scratch, {hint}")
    if init is None or state.get("init") is None or state["init"] == init:
        return False
    if extend:
        return True
    was = state["init"]
    raise ConfigError(f"stage {stage} in {run_dir} was trained from the unimodal checkpoint {was['checkpoint']} "
                      f"(epoch {was['epoch']}), the unimodal stage now ends at {init['checkpoint']} (epoch "
                      f"{init['epoch']}); pass --set ray.resume=extend to train {stage} again from it, or a new "
                      f"--set ray.run_name=...")


def supersede(run_dir: Path) -> Path:
    """Move a stage's run out of the way (to `<name>.superseded-<n>`) so that Ray Train starts it afresh."""
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.superseded-{n}")).exists():
        n += 1
    run_dir.rename(aside)
    return aside


def check_fits(config: Config, checkpoint: Path) -> None:
    """Fail fast, in the driver, when a checkpoint cannot initialise this config's model."""
    from trainer.checkpoint import load_weights
    from trainer.models import model_for_dataset

    info = read_dataset_info(config.data.dataset_dir)
    model = model_for_dataset(config.model, info)
    load_weights(model, load_state(checkpoint), str(checkpoint))


def absolute(config: Config) -> Config:
    """Resolve relative paths against the current directory before they travel to Ray workers."""
    data = dataclasses.replace(config.data, dataset_dir=str(Path(config.data.dataset_dir).resolve()))
    ray_cfg = dataclasses.replace(config.ray, storage_path=str(Path(config.ray.storage_path).resolve()))
    model = dataclasses.replace(config.model, pretrained={m: str(Path(p).resolve())
                                                          for m, p in config.model.pretrained.items()})
    return dataclasses.replace(config, data=data, ray=ray_cfg, model=model)


def prepare_storage(config: Config) -> Path:
    """Create `<storage_path>/<run_name>`; a path that cannot be a directory is a ConfigError naming it."""
    storage = Path(config.ray.storage_path)
    run_dir = storage / config.ray.run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigError(f"ray.storage_path = {storage}: {blocker} is a file, not a directory; pass --set "
                              f"ray.storage_path=<a directory> or move the file away") from None
        raise ConfigError(f"ray.storage_path = {storage}: cannot create {run_dir} ({exc.strerror or exc}); pass "
                          f"--set ray.storage_path=<a writable directory>") from None
    return run_dir


@dataclass
class Progress:
    """How far run_recipe got: what a Ctrl-C message reports."""

    finished: list[str] = field(default_factory=list)
    current: str | None = None


def run_recipe(config: Config, stages: list[str], progress: Progress | None = None) -> Path | None:
    """The stages of `trainer.recipe.RECIPE` named in `stages` (with those they start from), then `eval`
    when named; returns the results markdown path when eval ran."""
    import ray

    from trainer.evaluate import method_claims, standard_methods, write_results

    progress = progress if progress is not None else Progress()
    storage = Path(config.ray.storage_path)
    planned = recipe.plan(s for s in stages if s != "eval")
    for stage in recipe.RECIPE if "eval" in stages else planned:  # refuse changed settings before Ray starts
        check_same_run(config, stage.name, storage / f"{config.ray.run_name}-{stage.name}")
    if not ray.is_initialized():
        # RAY_ADDRESS is set by `ray job submit` (or by you): join that cluster. Otherwise start a private
        # local instance rather than attaching to whatever cluster happens to run on this machine.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    config = resolve_auto(config, cluster_view())
    checkpoints: dict[str, Path] = {}
    for stage in planned:
        progress.current = stage.name
        init_from = checkpoints[stage.init_from] if stage.init_from else None
        checkpoints[stage.name] = run_stage(config, stage.name, init_from, storage)
        progress.finished.append(stage.name)
    if "eval" not in stages:
        return None
    progress.current = "eval"
    skipped = []
    for stage in recipe.RECIPE:  # eval scores every stage: those not trained in this run must be there already
        if stage.name in checkpoints:
            continue
        run_dir = storage / f"{config.ray.run_name}-{stage.name}"
        init = checkpoints.get(stage.init_from) if stage.init_from else None
        if check_same_run(config, stage.name, run_dir, init_record(init)):
            raise ConfigError(f"eval needs the {stage.name} stage trained from the current {stage.init_from} "
                              f"checkpoint; run --stages {stage.name},eval --set ray.resume=extend")
        done = finished_checkpoint(run_dir, recipe.schedule(config, stage))
        if done is None and stage.baseline:
            skipped.append(stage.name)
            continue
        if done is None:
            raise ConfigError(f"eval needs the {stage.name} stage; run it first (--stages {stage.name})")
        checkpoints[stage.name] = done
    ensure_fits(config, "eval", 1)
    info = read_dataset_info(config.data.dataset_dir)
    states = {name: load_state(path) for name, path in checkpoints.items()}
    choice = recipe.choose(states["unimodal"]["metrics"], states["mma"]["metrics"],
                           {k: str(v) for k, v in checkpoints.items()}, config.eval.val_split, info.multilabel)
    methods = standard_methods({k: str(v) for k, v in checkpoints.items()}, info.modalities)
    use_gpu = config.ray.use_gpu
    remote_eval = ray.remote(num_cpus=config.ray.cpus_per_worker, num_gpus=1 if use_gpu else 0)(_evaluate_task)
    results = ray.get(remote_eval.remote(config, methods))
    results["chosen"] = choice
    results["stages"] = {name: {"epochs": int(state["epoch"]), "kept_epochs": state["metrics"].get("kept_epochs")}
                         for name, state in states.items()}
    if skipped:
        results["skipped_stages"] = skipped
    notes = [*method_claims(results), recipe.choice_note(choice), *kept_epochs_notes(results["stages"]),
             *([f"baselines not trained, so not in the table: {', '.join(skipped)} (add them to --stages)"]
               if skipped else []),
             f"checkpoints: {', '.join(f'{k}={v}' for k, v in checkpoints.items())}"]
    results_dir = storage / config.ray.run_name / "results"
    md = write_results(results, results_dir, notes)
    export_models(config, checkpoints, choice, results_dir)
    print(md.read_text())
    progress.finished.append("eval")
    progress.current = None
    return md


def export_models(config: Config, checkpoints: dict[str, Path], choice: dict, results_dir: Path) -> None:
    """`results/ume`, `results/ume_mma` and `results/chosen` (METHOD.md step 4's pick), each a
    `model.safetensors` + `model.json` that `trainer.export.load_model` and `trainer.predict` read."""
    from trainer.export import export_checkpoint

    chosen_stage = "mma" if choice["model"] == "UME-MMA" else "unimodal"
    for name, stage, method in (("ume", "unimodal", "UME"), ("ume_mma", "mma", "UME-MMA"),
                                ("chosen", chosen_stage, choice["model"])):
        export_checkpoint(checkpoints[stage], config, results_dir / name, name,
                          extra={"method": method, "choice": choice})
    log.info("models exported to %s (ume, ume_mma, chosen = %s)", results_dir, choice["model"])


def kept_epochs_notes(stages: dict[str, dict]) -> list[str]:
    """A line per stage trained with `epochs = "auto"`: which epoch early stopping kept, per branch."""
    return [f"{name}: early stopping kept " + ", ".join(f"{t} epoch {e}" for t, e in record["kept_epochs"].items())
            + f" of {record['epochs']}" for name, record in stages.items() if record.get("kept_epochs")]


def _evaluate_task(config: Config, methods: list) -> dict:
    import torch

    from trainer.evaluate import evaluate

    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    device = torch.device("cuda" if config.ray.use_gpu and torch.cuda.is_available() else "cpu")
    return evaluate(config, methods, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train UME and UME-MMA (plus baselines) on Ray Train and write the missing-modality "
                    "results table. Rerun the same command to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML config, e.g. trainer/configs/av_digits.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.epochs=2")
    parser.add_argument("--stages", default=",".join([*recipe.STAGES, "eval"]),
                        help="comma-separated subset of the recipe's stages (trainer/recipe.py) and eval; a stage "
                             "brings the one it starts from (mma: unimodal); eval scores the joint baselines only "
                             "when they are trained (e.g. unimodal,mma,eval skips them)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    progress = Progress()
    try:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(stages) - set(recipe.STAGES) - {"eval"})
        if unknown:
            raise ConfigError(f"--stages: unknown {unknown}; choose from {', '.join([*recipe.STAGES, 'eval'])}")
        config = absolute(load_config(args.config, args.set))
        prepare_storage(config)
        info = read_dataset_info(config.data.dataset_dir)
        for modality in info.modalities:
            if modality not in config.model.encoders:
                raise ConfigError(f"{args.config}: dataset has modality {modality!r} but [model] encoders has no "
                                  f"entry for it; add {modality} = \"<encoder name>\"")
        for split in ("train", config.eval.val_split):
            n = info.splits.get(split, {}).get("samples", 0)
            most = config.ray.scaling_workers if isinstance(config.ray.scaling_workers, int) else \
                config.ray.scaling_workers[1]
            if n < most:
                raise ConfigError(f"split {split!r} of {config.data.dataset_dir} has {n} samples for "
                                  f"{most} workers; every worker needs at least one "
                                  f"(lower ray.num_workers or build the split)")
        try:  # unknown encoder names, unreadable pretrained files: fail before any Ray work
            from trainer.models import model_for_dataset

            model_for_dataset(config.model, info)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{args.config}: [model] {exc}") from exc
        if config.mma.scheme in ("drop_one", "independent"):
            unknown_m = set(config.mma.drop_probs) - set(info.modalities) - {"full"}
            if unknown_m:
                raise ConfigError(f"{args.config}: [mma] drop_probs names {sorted(unknown_m)}, not modalities of "
                                  f"{info.dataset} ({', '.join(info.modalities)})")
        check_tracking(tensorboard=config.track.tensorboard, mlflow_uri=config.track.mlflow_uri)
        run_recipe(config, stages, progress)
    except (ConfigError, FormatError, CheckpointMismatch, ScenarioError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # while Ray shuts down, a second Ctrl-C ends it at once
        print(f"interrupted: {interrupted_line(progress)}", file=sys.stderr)
        return 130
    return 0


def interrupted_line(progress: Progress) -> str:
    """What a Ctrl-C leaves behind, in one line."""
    done = f"finished: {', '.join(progress.finished)}" if progress.finished else "no stage finished"
    where = f"stopped during {progress.current}" if progress.current else "stopped before any stage started"
    return (f"{where} ({done}); rerun the same command to resume from the last checkpoints "
            f"(finished stages are skipped)")


if __name__ == "__main__":
    sys.exit(main())
