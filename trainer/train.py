"""The training stages of METHOD.md, as one Ray Train loop per worker (ordinary PyTorch inside).

- `unimodal` (UME): every branch trained with its own loss in one pass; branches share no parameters,
  so one optimizer over all of them keeps per-branch state exactly as separate optimizers would.
- `mma`: initialised from the unimodal checkpoint, fused loss, the loader's missing-modality augmentation.
- `joint`: the fused model from scratch (baseline); `joint_dropout` adds per-modality dropout.
The only Ray calls are `get_context`, `get_checkpoint`, `report` and `prepare_model`."""
from __future__ import annotations

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
import torch.nn.functional as F

from shards.format import read_dataset_info
from shards.loader import make_loader
from shards.masks import DropSpec, drop_one_uniform
from trainer.checkpoint import load_loader_state, load_state, load_weights, save_loader_state, save_state, unwrap
from trainer.config import Config, config_from_dict
from trainer.models import LateFusion, model_for_dataset

log = logging.getLogger(__name__)
STAGES = ("unimodal", "mma", "joint", "joint_dropout")
LOG_EVERY = 10


def stage_augment(config: Config, stage: str, modalities: list[str]) -> DropSpec | None:
    """The missing-modality augmentation a stage trains with."""
    if stage == "mma":
        if not config.mma.drop_probs and config.mma.scheme == "drop_one":
            return drop_one_uniform(modalities)  # {} = METHOD.md's default for whatever the dataset has
        return DropSpec(config.mma.scheme, dict(config.mma.drop_probs))
    if stage == "joint_dropout":
        return DropSpec("independent", {m: config.train.modality_dropout for m in modalities})
    return None


def stage_loss(stage: str, out: dict, batch: dict, modalities: list[str], multilabel: bool) -> torch.Tensor:
    """Fused loss, or (unimodal) the sum of each branch's loss over the samples that have its modality."""
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    if stage != "unimodal":
        return loss_fn(out["logits"], batch["label"])
    total = out["logits"].sum() * 0.0
    for i, m in enumerate(modalities):
        rows = batch["present"][:, i]
        if rows.any():
            total = total + loss_fn(out["unimodal"][m][rows], batch["label"][rows])
    return total


def build_optimizer(config: Config, stage: str, model: torch.nn.Module):
    lr = config.mma.lr if stage == "mma" else config.train.lr
    epochs = config.mma.epochs if stage == "mma" else config.train.epochs
    if config.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.train.momentum,
                                    weight_decay=config.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=stage_milestones(config, stage, epochs),
                                                     gamma=config.train.lr_gamma)
    return optimizer, scheduler, epochs


def stage_milestones(config: Config, stage: str, epochs: int) -> list[int]:
    """The epochs where the lr drops: none in mma, else train.lr_milestones before the last epoch."""
    return [] if stage == "mma" else [m for m in config.train.lr_milestones if m < epochs]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def validate(model: torch.nn.Module, loader, device: torch.device, modalities: list[str], multilabel: bool) -> dict:
    """Fused and per-branch accuracy (or micro-F1 for multi-label) on this worker's part, summed over workers."""
    model.eval()
    counts = torch.zeros(2 + 2 * len(modalities), dtype=torch.float64)
    for batch in loader:
        batch = to_device(batch, device)
        out = model(batch)
        counts[:2] += _correct(out["logits"], batch["label"], multilabel)
        for i, m in enumerate(modalities):
            rows = batch["present"][:, i]
            counts[2 + 2 * i: 4 + 2 * i] += _correct(out["unimodal"][m][rows], batch["label"][rows], multilabel)
    if dist.is_available() and dist.is_initialized():
        counts = counts.to(device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(counts)
        counts = counts.cpu()
    model.train()
    metrics = {"val_acc": float(counts[0] / max(counts[1], 1))}
    for i, m in enumerate(modalities):
        metrics[f"val_acc_{m}_branch"] = float(counts[2 + 2 * i] / max(counts[3 + 2 * i], 1))
    return metrics


def _correct(logits: torch.Tensor, label: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if logits.shape[0] == 0:
        return torch.zeros(2, dtype=torch.float64)
    if multilabel:
        pred = logits > 0
        return torch.tensor([float((pred & (label > 0.5)).sum()) * 2, float(pred.sum() + (label > 0.5).sum())])
    return torch.tensor([float((logits.argmax(1) == label).sum()), float(len(label))], dtype=torch.float64)


def make_model(config: Config, info) -> LateFusion:
    torch.manual_seed(config.train.seed)  # identical initial weights on every worker
    return model_for_dataset(config.model, info)


def train_loop_per_worker(loop_config: dict) -> None:
    """One worker of one stage: resume if Ray hands a checkpoint, train, validate, checkpoint every epoch."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_dict(loop_config["config"], source="loop config")
    stage = loop_config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    info = read_dataset_info(config.data.dataset_dir)
    model = make_model(config, info)
    if stage == "mma":
        init = loop_config["init_from"]
        load_weights(model, load_state(init), init)
        if config.model.fusion == "concat":
            model.init_concat_from_heads()
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer, scheduler, epochs = build_optimizer(config, stage, model)

    start_epoch, loader_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(ckpt_dir)
            load_weights(model, state, ckpt_dir)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = state["epoch"]
            # The stored milestones were cut at the stored stage's epochs. A stage extended to more epochs
            # (ray.resume=extend) takes this config's, and the drop a milestone at its old last epoch
            # would have made then.
            stored = set(scheduler.milestones)
            scheduler.milestones = Counter(stage_milestones(config, stage, epochs))
            missed = sum(1 for m in scheduler.milestones if m <= start_epoch and m not in stored)
            for group in optimizer.param_groups:
                group["lr"] *= config.train.lr_gamma ** missed
            torch.set_rng_state(state["torch_rng"])
            loader_state = load_loader_state(ckpt_dir, rank)
        log.info("[%s] rank %d resumes after epoch %d", stage, rank, start_epoch)
    if rank == 0:
        restart_metrics(loop_config.get("metrics_path"), stage, start_epoch)

    use_gpu = device.type == "cuda"
    loader_args = dict(backend=config.data.backend, device="gpu" if use_gpu else "cpu", shard_id=rank,
                       num_shards=world, seed=config.train.seed, crop=config.data.crop_size,
                       min_crop_area=config.data.min_crop_area, flip=config.data.flip,
                       num_workers=config.data.num_workers, device_id=device.index if use_gpu else None)
    train_loader = make_loader(config.data.dataset_dir, "train", config.data.batch_size, train=True,
                               augment=stage_augment(config, stage, info.modalities), epoch=start_epoch,
                               **loader_args)
    if loader_state:
        train_loader.load_state_dict(loader_state)
    val_loader = make_loader(config.data.dataset_dir, config.eval.val_split, config.data.batch_size, **loader_args)

    model.train()
    for epoch in range(start_epoch, epochs):
        train_loader.set_epoch(epoch)
        seen, loss_sum, wait, steps = 0, 0.0, 0.0, 0
        started = tick = time.perf_counter()
        for batch in train_loader:
            got = time.perf_counter()
            wait += got - tick
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.amp == "bf16"):
                out = model(batch)
                loss = stage_loss(stage, out, batch, info.modalities, info.multilabel)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            seen += len(batch["key"])
            loss_sum += loss.item() * len(batch["key"])
            tick = time.perf_counter()
            if rank == 0 and steps % LOG_EVERY == 0:
                log.info("[%s] epoch %d step %d loss %.4f %.1f samples/s data wait %.0f%%", stage, epoch, steps,
                         loss.item(), seen / (tick - started), 100 * wait / (tick - started))
        scheduler.step()
        if stage == "unimodal" and config.model.fusion == "concat":  # the UME ensemble as a concat layer
            unwrap(model).init_concat_from_heads()
        elapsed = time.perf_counter() - started
        metrics = {"stage": stage, "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                   "samples_per_s": seen * world / elapsed, "data_wait_fraction": wait / elapsed,
                   "lr": optimizer.param_groups[0]["lr"], "world_size": world}
        metrics.update(validate(model, val_loader, device, info.modalities, info.multilabel))
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            save_loader_state(tmp_path, rank, train_loader.state_dict())
            if rank == 0:
                save_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                           stage=stage, config=loop_config["config"], metrics=metrics, init=loop_config.get("init"))
                log.info("[%s] epoch %d/%d: %s", stage, epoch + 1, epochs,
                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
                _append_metrics(loop_config.get("metrics_path"), metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


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
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
    log.info("[%s] metrics.jsonl: dropped %d row(s) after epoch %d, which are trained again", stage,
             len(lines) - len(keep), start_epoch)
