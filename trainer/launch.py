"""Run the whole recipe on Ray: unimodal (UME) -> mma (UME-MMA) -> baselines -> eval -> results.

    python trainer/launch.py --config trainer/configs/av_digits.toml            # starts a local Ray
    ray job submit --working-dir . -- python trainer/launch.py --config ...     # joins RAY_ADDRESS

Each training stage is a Ray Train `TorchTrainer` run named `<run_name>-<stage>` under
`ray.storage_path`; rerunning the same command resumes every stage from its last checkpoint and skips
finished ones. Results go to `<storage_path>/<run_name>/results/` (results.md, results.json,
missing_rate.png) and per-epoch metrics to `<storage_path>/<run_name>/metrics.jsonl`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/launch.py` from the repository root or a job's working dir
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shards.features import model_input_specs  # noqa: E402
from shards.format import FormatError, read_dataset_info  # noqa: E402
from shards.scenarios import ScenarioError  # noqa: E402
from trainer.checkpoint import CheckpointMismatch, load_state  # noqa: E402
from trainer.config import Config, ConfigError, load_config  # noqa: E402

log = logging.getLogger("trainer.launch")
TRAIN_STAGES = ("unimodal", "joint", "joint_dropout", "mma")


def stage_epochs(config: Config, stage: str) -> int:
    return config.mma.epochs if stage == "mma" else config.train.epochs


def finished_checkpoint(run_dir: Path, epochs: int) -> Path | None:
    """The checkpoint of a stage that already ran all its epochs, if any."""
    for ckpt in sorted(run_dir.glob("checkpoint_*"), reverse=True):
        state_file = ckpt / "state.pt"
        if state_file.is_file():
            try:
                if load_state(ckpt)["epoch"] >= epochs:
                    return ckpt
            except Exception:  # a checkpoint being written when the run died: ignore it
                continue
    return None


def run_stage(config: Config, stage: str, init_from: Path | None, storage: Path) -> Path:
    """Train one stage with Ray Train (resuming if a previous run of the same name stopped early)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.train import train_loop_per_worker

    name = f"{config.ray.run_name}-{stage}"
    epochs = stage_epochs(config, stage)
    check_same_run(config, stage, storage / name)
    done = finished_checkpoint(storage / name, epochs)
    if done is not None:
        log.info("stage %s already finished (%s); skipping", stage, done)
        return done
    if init_from is not None:
        check_fits(config, init_from)
    if stage == "joint":
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, modality_dropout=0.0))
    loop_config = {"config": dataclasses.asdict(config), "stage": stage,
                   "init_from": str(init_from) if init_from else None,
                   "metrics_path": str(storage / config.ray.run_name / "metrics.jsonl")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": config.ray.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=config.ray.max_failures)),
    )
    log.info("stage %s: %d epochs on %d worker(s)", stage, epochs, config.ray.num_workers)
    try:
        trainer.fit()
    except Exception as exc:  # Ray Train raises the workers' error: report its cause in one line
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise StageFailed(f"stage {stage} failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]} "
                          f"(logs and checkpoints in {storage / name})") from exc
    done = finished_checkpoint(storage / name, epochs)
    if done is None:
        raise StageFailed(f"stage {stage} ended without a final checkpoint (see {storage / name})")
    return done


class StageFailed(RuntimeError):
    """A training stage that failed after its retries; the message names the cause and where to look."""


def check_same_run(config: Config, stage: str, run_dir: Path) -> None:
    """A rerun resumes or skips a stage only when its data and model config match what was trained."""
    states = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "state.pt").is_file())
    if not states:
        return
    before = load_state(states[-1]).get("config")
    if not before:
        return
    now = dataclasses.asdict(config)
    # what makes checkpoints incompatible or results incomparable; loader settings may change freely
    keys = [("model", k) for k in now["model"]] + [("data", "dataset_dir"), ("data", "crop_size")]
    changed = [f"{s}.{k}" for s, k in keys if before.get(s, {}).get(k) != now[s][k]]
    if changed:
        raise ConfigError(f"{run_dir} was trained with another config ({', '.join(changed)} differ); pass "
                          f"another --set ray.run_name=... or delete {run_dir} to start over")


def check_fits(config: Config, checkpoint: Path) -> None:
    """Fail fast, in the driver, when a checkpoint cannot initialise this config's model."""
    from trainer.checkpoint import load_weights
    from trainer.models import build_model

    info = read_dataset_info(config.data.dataset_dir)
    model = build_model(config.model, info.modalities, info.num_classes, input_specs=model_input_specs(info))
    load_weights(model, load_state(checkpoint), str(checkpoint))


def absolute(config: Config) -> Config:
    """Resolve relative paths against the current directory before they travel to Ray workers."""
    data = dataclasses.replace(config.data, dataset_dir=str(Path(config.data.dataset_dir).resolve()))
    ray_cfg = dataclasses.replace(config.ray, storage_path=str(Path(config.ray.storage_path).resolve()))
    return dataclasses.replace(config, data=data, ray=ray_cfg)


def run_recipe(config: Config, stages: list[str]) -> Path | None:
    """unimodal -> joint baselines -> mma -> eval; returns the results markdown path when eval ran."""
    import ray

    from trainer.evaluate import method_claims, standard_methods, val_choice, write_results

    storage = Path(config.ray.storage_path)
    (storage / config.ray.run_name).mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        # RAY_ADDRESS is set by `ray job submit` (or by you): join that cluster. Otherwise start a private
        # local instance rather than attaching to whatever cluster happens to run on this machine.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    if config.ray.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("ray.use_gpu = true but this Ray cluster has no GPU; run on GPU nodes or pass "
                          "--set ray.use_gpu=false (and --set train.amp=none on CPUs without bfloat16)")
    checkpoints: dict[str, Path] = {}
    for stage in TRAIN_STAGES:
        if stage not in stages and not (stage == "unimodal" and "mma" in stages):
            continue
        checkpoints[stage] = run_stage(config, stage, checkpoints.get("unimodal") if stage == "mma" else None, storage)
    if "eval" not in stages:
        return None
    missing = [s for s in TRAIN_STAGES if s not in checkpoints]
    for stage in missing:
        done = finished_checkpoint(storage / f"{config.ray.run_name}-{stage}", stage_epochs(config, stage))
        if done is None:
            raise ConfigError(f"eval needs the {stage} stage; run it first (--stages {stage})")
        checkpoints[stage] = done
    _, note = val_choice(load_state(checkpoints["unimodal"])["metrics"], load_state(checkpoints["mma"])["metrics"])
    info = read_dataset_info(config.data.dataset_dir)
    methods = standard_methods({k: str(v) for k, v in checkpoints.items()}, info.modalities)
    use_gpu = config.ray.use_gpu
    remote_eval = ray.remote(num_cpus=config.ray.cpus_per_worker, num_gpus=1 if use_gpu else 0)(_evaluate_task)
    results = ray.get(remote_eval.remote(config, methods))
    notes = [*method_claims(results), note,
             f"checkpoints: {', '.join(f'{k}={v}' for k, v in checkpoints.items())}"]
    md = write_results(results, storage / config.ray.run_name / "results", notes)
    print(md.read_text())
    return md


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
    parser.add_argument("--stages", default="unimodal,joint,joint_dropout,mma,eval",
                        help="comma-separated subset of unimodal, joint, joint_dropout, mma, eval")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(stages) - set(TRAIN_STAGES) - {"eval"})
        if unknown:
            raise ConfigError(f"--stages: unknown {unknown}; choose from {', '.join(TRAIN_STAGES + ('eval',))}")
        config = absolute(load_config(args.config, args.set))
        info = read_dataset_info(config.data.dataset_dir)
        for modality in info.modalities:
            if modality not in config.model.encoders:
                raise ConfigError(f"{args.config}: dataset has modality {modality!r} but [model] encoders has no "
                                  f"entry for it; add {modality} = \"<encoder name>\"")
        for split in ("train", config.eval.val_split):
            n = info.splits.get(split, {}).get("samples", 0)
            if n < config.ray.num_workers:
                raise ConfigError(f"split {split!r} of {config.data.dataset_dir} has {n} samples for "
                                  f"{config.ray.num_workers} workers; every worker needs at least one "
                                  f"(lower ray.num_workers or build the split)")
        try:  # unknown encoder names, unreadable pretrained files: fail before any Ray work
            from trainer.models import build_model

            build_model(config.model, info.modalities, info.num_classes, input_specs=model_input_specs(info))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{args.config}: [model] {exc}") from exc
        if config.mma.scheme in ("drop_one", "independent"):
            unknown_m = set(config.mma.drop_probs) - set(info.modalities) - {"full"}
            if unknown_m:
                raise ConfigError(f"{args.config}: [mma] drop_probs names {sorted(unknown_m)}, not modalities of "
                                  f"{info.dataset} ({', '.join(info.modalities)})")
        run_recipe(config, stages)
    except (ConfigError, FormatError, CheckpointMismatch, ScenarioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
