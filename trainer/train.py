"""One training stage of `trainer/recipe.py` as a Ray Train loop per worker (ordinary PyTorch inside).

The stage's record says what differs between stages (its loss, its augmentation, what it starts from) and
its schedule comes from the config table named after it; nothing here tests a stage's name. Branches share
no parameters, so in `unimodal` one optimizer over all of them keeps per-branch state exactly as separate
optimizers would. A step does not wait for the device: the loss is summed on the device and read every
`LOG_EVERY` steps and at the end of the epoch. With `epochs = "auto"` the stage validates every epoch, keeps
the best weights per target (`recipe.selection_metrics`) and stops after `patience` epochs without progress.
The only Ray calls are `get_context`, `get_checkpoint`, `report` and `prepare_model`."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from shards.format import read_dataset_info
from shards.loader import make_loader
from shards.writer import atomic_write_bytes
from trainer import recipe
from trainer.checkpoint import (
    load_loader_state,
    load_state,
    load_weights,
    save_loader_state,
    save_state,
    unwrap,
)
from trainer.config import Config, config_from_dict
from trainer.metrics import counts, scores
from trainer.models import LateFusion, model_for_dataset, param_groups
from trainer.recipe import Schedule, Stage
from trainer.tracking import Tracker

log = logging.getLogger(__name__)
LOG_EVERY = 10
BEST_FILE = "best.pt"


def build_optimizer(config: Config, stage: Stage, model: torch.nn.Module):
    """The optimizer of `[train]` at the stage's lr (the heads' group; each encoder's is scaled by
    `model.lr_scale`), with its lr steps; returns it, the scheduler and the schedule."""
    plan = recipe.schedule(config, stage)
    groups = param_groups(model, config.model, plan.lr)  # per encoder: model.lr_scale; frozen ones left out
    if config.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=plan.lr, momentum=config.train.momentum,
                                    weight_decay=config.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=plan.lr, weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(plan.lr_milestones),
                                                     gamma=plan.lr_gamma)
    return optimizer, scheduler, plan


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, stage: Stage, info,
               amp: bool) -> torch.Tensor:
    """One optimisation step on a batch already on the device; returns the detached loss, still on the
    device (reading it with `.item()` would wait for the step to finish)."""
    device_type = batch["present"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        out = model(batch)
        loss = recipe.loss(stage, out, batch, info.modalities, info.multilabel)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def validate(model: torch.nn.Module, loader, device: torch.device, modalities: list[str], multilabel: bool) -> dict:
    """Fused and per-branch accuracy (micro-F1 for multi-label) on this worker's part, summed over workers:
    `val_acc` and `val_acc_<m>_branch` (the branch alone, on the samples that have its modality)."""
    model.eval()
    classes = unwrap(model).num_classes
    shape = (1 + len(modalities), 3, classes) if multilabel else (1 + len(modalities), 2)
    tally = torch.zeros(shape, dtype=torch.float64, device=device)  # every worker reduces the same shape
    for batch in loader:
        batch = to_device(batch, device)
        out = model(batch)
        tally[0] += counts(out["logits"], batch["label"], multilabel, classes)
        for i, m in enumerate(modalities):
            rows = batch["present"][:, i]
            tally[1 + i] += counts(out["unimodal"][m][rows], batch["label"][rows], multilabel, classes)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tally)  # on the device: NCCL reduces CUDA tensors only
    model.train()
    key = "f1_micro" if multilabel else "acc"
    metrics = {"val_acc": scores(tally[0], multilabel)[key]}
    for i, m in enumerate(modalities):
        metrics[f"val_acc_{m}_branch"] = scores(tally[1 + i], multilabel)[key]
    return metrics


def make_model(config: Config, info) -> LateFusion:
    torch.manual_seed(config.train.seed)  # identical initial weights on every worker
    return model_for_dataset(config.model, info)


def speed_up(model: LateFusion, config: Config) -> LateFusion:
    """`train.channels_last` and `train.compile`, applied in place: the state dict's names and values stay
    those of the plain model, so checkpoints and exports are the same either way."""
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.train.compile:
        for encoder in model.encoders.values():  # the heavy part; the masking around it stays eager
            # automatic dynamic shapes: a second batch size recompiles once for any size (forcing dynamic=True
            # from the start fails in this torch's inductor on the ResNet's pooling)
            encoder.compile()
    return model


def may_skip_branch(stage: Stage, info, fusion: str) -> bool:
    """Whether a step can leave some parameters without a gradient (DDP then needs find_unused_parameters):
    a modality absent from a whole batch (augmentation or natural missingness) skips its encoder, and with
    concat fusion the fused loss does not reach the heads."""
    natural = any(split.get(f"has_{m}", split.get("samples", 0)) < split.get("samples", 0)
                  for split in info.splits.values() for m in info.modalities)
    return stage.augment != "none" or natural or fusion == "concat"


class EarlyStop:
    """`epochs = "auto"`: the best epoch and weights per target (a branch, or the fused model), and how many
    epochs each has gone without improving. Targets own disjoint parameters (a branch: its encoder and
    head; "fused": all), so the kept model puts together each target's best weights."""

    def __init__(self, targets: dict[str, str], patience: int) -> None:
        self.targets, self.patience = targets, patience
        self.best: dict[str, dict] = {}  # target -> {"epoch", "value"}
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def owned(target: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if target == "fused":
            return state
        return {k: v for k, v in state.items() if k.startswith((f"encoders.{target}.", f"heads.{target}."))}

    def update(self, epoch: int, metrics: dict, model: torch.nn.Module) -> None:
        state = unwrap(model).state_dict()
        for target, key in self.targets.items():
            if target not in self.best or metrics[key] > self.best[target]["value"]:
                self.best[target] = {"epoch": epoch, "value": metrics[key]}
                self.weights[target] = {k: v.detach().cpu().clone() for k, v in self.owned(target, state).items()}

    def stale(self, epoch: int) -> bool:
        """No target improved in the last `patience` epochs."""
        return all(epoch - b["epoch"] >= self.patience for b in self.best.values())

    def restore(self, model: torch.nn.Module) -> dict[str, int]:
        """Load every target's best weights into `model`; returns target -> kept epoch."""
        module = unwrap(model)
        state = module.state_dict()
        for weights in self.weights.values():
            state.update(weights)
        module.load_state_dict(state)
        return {t: b["epoch"] for t, b in self.best.items()}

    def state_dict(self) -> dict:
        return {"best": self.best, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.weights = state["best"], state["weights"]


def train_loop_per_worker(loop_config: dict) -> None:
    """One worker of one stage: resume if Ray hands a checkpoint, train, validate, checkpoint every epoch."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_dict(loop_config["config"], source="loop config")
    stage = recipe.STAGES[loop_config["stage"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    info = read_dataset_info(config.data.dataset_dir)
    model = make_model(config, info)
    if stage.init_from:
        init = loop_config["init_from"]
        load_weights(model, load_state(init), init)
        if config.model.fusion == "concat":
            model.init_concat_from_heads()
    speed_up(model, config)
    unused = may_skip_branch(stage, info, config.model.fusion)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    optimizer, scheduler, plan = build_optimizer(config, stage, model)
    stopper = EarlyStop(recipe.selection_metrics(stage, info.modalities), plan.patience) if plan.auto else None

    start_epoch, loader_state, first_state, progress = 0, None, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(ckpt_dir)
            load_weights(model, state, ckpt_dir)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = state["epoch"]
            extend_milestones(scheduler, optimizer, plan, start_epoch)
            torch.set_rng_state(state["torch_rng"])
            loader_state = load_loader_state(ckpt_dir, rank)
            first_state = load_loader_state(ckpt_dir, 0)  # every rank stopped at the same global position
            progress = state.get("progress")  # a checkpoint from inside an epoch: how far that epoch got
            if stopper is not None and (Path(ckpt_dir) / BEST_FILE).is_file():
                stopper.load_state_dict(torch.load(Path(ckpt_dir) / BEST_FILE, map_location="cpu", weights_only=True))
        where = f"step {progress['steps']} of epoch {start_epoch + 1}" if progress else f"epoch {start_epoch}"
        log.info("[%s] rank %d resumes after %s", stage.name, rank, where)
    if rank == 0:
        restart_metrics(loop_config.get("metrics_path"), stage.name, start_epoch)

    use_gpu = device.type == "cuda"
    loader_args = dict(backend=config.data.backend, device="gpu" if use_gpu else "cpu", shard_id=rank,
                       num_shards=world, seed=config.train.seed, crop=config.data.crop_size,
                       min_crop_area=config.data.min_crop_area, flip=config.data.flip,
                       num_workers=config.data.num_workers, device_id=device.index if use_gpu else None)
    train_loader = make_loader(config.data.dataset_dir, "train", config.data.batch_size, train=True,
                               augment=recipe.augmentation(config, stage, info.modalities), epoch=start_epoch,
                               **loader_args)
    if progress is not None and progress["world_size"] != world:
        # Inside an epoch on another number of workers (elastic resizing, or a rerun with other ray.num_workers):
        # the old workers consumed a prefix of the epoch's global order (`samples_done`); each new worker
        # takes its strided slice of the rest, so every sample of the epoch is seen once.
        first_state = first_state or {}
        done = first_state.get("samples_done", progress["steps"] * config.data.batch_size * progress["world_size"])
        loader_state = {"epoch": start_epoch, "batches_done": 0, "start": 0, "num_shards": progress["world_size"],
                        "batch_size": first_state.get("batch_size", config.data.batch_size), "samples_done": done}
        train_loader.load_state_dict(loader_state)
        log.warning("[%s] rank %d: the checkpoint was written inside epoch %d by %d worker(s), this run has %d; "
                    "going on from sample %d of the epoch's order: %d more steps, each remaining sample once",
                    stage.name, rank, start_epoch + 1, progress["world_size"], world, done, len(train_loader))
    if loader_state:
        train_loader.load_state_dict(loader_state)
    val_loader = make_loader(config.data.dataset_dir, config.eval.val_split, config.data.batch_size, **loader_args)
    amp = config.train.amp == "bf16"
    every = config.train.checkpoint_every_steps
    tracker = None
    if rank == 0 and loop_config.get("metrics_path"):  # TensorBoard (and MLflow) beside metrics.jsonl
        tracker = Tracker(Path(loop_config["metrics_path"]).parent, stage.name, **dataclasses.asdict(config.track),
                          start_epoch=start_epoch, steps_per_epoch=train_loader.steps_per_epoch, params=loop_config["config"])

    def save(metrics: dict, epochs_done: int, progress: dict | None = None) -> None:
        """A checkpoint of every rank (rank 0 writes the model), reported to Ray Train."""
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            save_loader_state(tmp_path, rank, train_loader.state_dict())
            if rank == 0:
                save_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epochs_done,
                           stage=stage.name, config=loop_config["config"], metrics=metrics,
                           init=loop_config.get("init"), progress=progress)
                if stopper is not None and not metrics.get("finished"):
                    torch.save(stopper.state_dict(), tmp_path / BEST_FILE)
            ray.train.report({k: v for k, v in metrics.items() if not isinstance(v, dict)},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))

    model.train()
    for epoch in range(start_epoch, plan.limit):
        train_loader.set_epoch(epoch)
        seen, wait, steps, before = 0, 0.0, 0, 0.0
        loss_sum = torch.zeros((), device=device)
        if progress is not None:  # the rest of an epoch a mid-epoch checkpoint stopped in
            seen, wait, steps, before = progress["seen"], progress["wait"], progress["steps"], progress["elapsed"]
            loss_sum += progress["loss_sum"].to(device)
            progress = None
        started = tick = time.perf_counter()
        for batch in train_loader:
            got = time.perf_counter()
            wait += got - tick
            n = len(batch["key"])
            loss = train_step(model, to_device(batch, device), optimizer, stage, info, amp)
            loss_sum += loss.float() * n
            steps += 1
            seen += n
            if tracker is not None and tracker.log_every_steps and steps % tracker.log_every_steps == 0:
                tracker.log_step(epoch, steps, loss.item())
            tick = time.perf_counter()
            if rank == 0 and steps % LOG_EVERY == 0:
                log.info("[%s] epoch %d step %d loss %.4f %.1f samples/s data wait %.0f%%", stage.name, epoch, steps,
                         loss.item(), seen / (before + tick - started), 100 * wait / (before + tick - started))
            if every and steps % every == 0 and train_loader.batches_done < len(train_loader):
                save({"stage": stage.name, "epoch": epoch, "step": steps, "finished": False}, epoch,
                     {"steps": steps, "seen": seen, "wait": wait, "elapsed": before + tick - started,
                      "loss_sum": loss_sum.detach().cpu(), "world_size": world,
                      "steps_per_epoch": train_loader.steps_per_epoch})
                tick = time.perf_counter()
        scheduler.step()
        if stage.loss == "per_branch" and config.model.fusion == "concat":  # the UME ensemble as a concat layer
            unwrap(model).init_concat_from_heads()
        elapsed = before + time.perf_counter() - started
        metrics = {"stage": stage.name, "epoch": epoch + 1, "train_loss": float(loss_sum) / max(seen, 1),
                   "samples_per_s": seen * world / elapsed, "data_wait_fraction": wait / elapsed,
                   "lr": optimizer.param_groups[-1]["lr"], "world_size": world}
        metrics.update(validate(model, val_loader, device, info.modalities, info.multilabel))
        finished = epoch + 1 == plan.limit
        if stopper is not None:
            stopper.update(epoch + 1, metrics, model)
            finished = finished or stopper.stale(epoch + 1)
            if finished:  # the kept model: each target's best epoch, validated again
                metrics["kept_epochs"] = stopper.restore(model)
                metrics.update(validate(model, val_loader, device, info.modalities, info.multilabel))
                if config.model.fusion == "concat" and stage.loss == "per_branch":
                    unwrap(model).init_concat_from_heads()
        metrics["finished"] = finished
        if rank == 0:
            log.info("[%s] epoch %d/%s: %s", stage.name, epoch + 1, plan.epochs or f"auto<={plan.max_epochs}",
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            if "kept_epochs" in metrics:
                log.info("[%s] early stopping after epoch %d keeps %s", stage.name, epoch + 1,
                         ", ".join(f"{t} from epoch {e}" for t, e in metrics["kept_epochs"].items()))
            _append_metrics(loop_config.get("metrics_path"), metrics)
            if tracker is not None:
                tracker.log_epoch(metrics)
        save(metrics, epoch + 1)
        if finished:
            break
    if tracker is not None:
        tracker.close()


def extend_milestones(scheduler, optimizer, plan: Schedule, start_epoch: int) -> None:
    """The stored milestones were cut at the stored stage's epochs. A stage extended to more epochs
    (ray.resume=extend) takes this config's, and the drop a milestone at its old last epoch would have
    made then."""
    stored = set(scheduler.milestones)
    scheduler.milestones = Counter(plan.lr_milestones)
    missed = sum(1 for m in scheduler.milestones if m <= start_epoch and m not in stored)
    for group in optimizer.param_groups:
        group["lr"] *= plan.lr_gamma ** missed


def _append_metrics(path: str | None, metrics: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def restart_metrics(path: str | None, stage: str, start_epoch: int) -> None:
    """Drop `stage`'s rows for epochs after `start_epoch` from metrics.jsonl before they are trained (again).

    A row is written just before its epoch's checkpoint is reported; a run killed in between resumes from
    the previous checkpoint and trains that epoch again, so its old row (of a model that was never
    checkpointed) is replaced rather than duplicated. A stage trained from scratch drops all its rows; a
    line cut short by the kill is dropped too. Every epoch then has exactly one row, the one of the model
    its checkpoint holds."""
    if not path or not os.path.isfile(path):
        return
    lines = Path(path).read_text().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (row.get("stage") == stage and row.get("epoch", 0) > start_epoch):
            keep.append(line)
    if len(keep) == len(lines):
        return
    atomic_write_bytes(Path(path), "".join(line + "\n" for line in keep).encode())
    log.info("[%s] metrics.jsonl: dropped %d row(s) after epoch %d, which are trained again", stage,
             len(lines) - len(keep), start_epoch)
