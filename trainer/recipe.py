"""The recipe of METHOD.md as one table: each training stage is a record, read by `train.py` and `launch.py`.

| stage | METHOD.md | loss | augmentation | starts from |
|---|---|---|---|---|
| `unimodal` | step 1, UME | each branch's own loss on the samples that have its modality | none | scratch |
| `mma` | steps 2-3, UME-MMA | fused | `[mma]` scheme (keep all or drop exactly one) | the `unimodal` checkpoint |
| `joint` | baseline | fused | none | scratch |
| `joint_dropout` | baseline | fused | each modality dropped with `[joint_dropout] rate` | scratch |

Each stage reads its schedule from the config table named after it (`[unimodal]`, `[mma]`, `[joint]`,
`[joint_dropout]`: `epochs`, `lr`, `lr_milestones`, `lr_gamma`, `max_epochs`, `patience`); a key a stage
table leaves out takes `[train]`'s value, except in `[mma]`, whose defaults are its own (a short fine-tune
without lr steps). The optimizer, momentum, weight decay and seed are `[train]`'s for every stage.

`epochs = "auto"` trains up to `max_epochs` and stops early on the validation split: `unimodal` keeps, per
branch, the weights of the epoch where that branch's validation metric was best, and stops when no branch
has improved for `patience` epochs; the fused stages keep the best epoch of the fused metric. Step 4,
choosing between UME and UME-MMA on full-modality validation data, is `choose`."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from shards.masks import DropSpec, drop_one_uniform

AUTO = "auto"
# Everything but the stage's own table that decides what a stage trains (a rerun with other values is refused);
# loader and Ray settings (data.backend, data.num_workers, ray.*), train.amp, [track] and [eval] may change.
COMMON_SETTINGS = ("data.dataset_dir", "data.batch_size", "data.crop_size", "data.min_crop_area", "data.flip",
                   "train.seed", "train.optimizer", "train.momentum", "train.weight_decay")
SCHEDULE_KEYS = ("epochs", "max_epochs", "patience", "lr", "lr_milestones", "lr_gamma")


@dataclass(frozen=True)
class Stage:
    """One row of the recipe."""

    name: str
    summary: str
    loss: Literal["per_branch", "fused"]
    augment: Literal["none", "mma", "modality_dropout"]
    init_from: str | None = None  # the stage whose final checkpoint this one starts from
    settings: tuple[str, ...] = ()  # keys of its own table, beyond the schedule, that decide what it trains
    baseline: bool = False  # a comparison row: `eval` goes on without it (a note says so) when it was not trained


RECIPE: tuple[Stage, ...] = (
    Stage("unimodal", "UME: every branch trained with its own loss in one pass", "per_branch", "none"),
    Stage("mma", "UME-MMA: the UME model fine-tuned on the fused loss with missing-modality augmentation",
          "fused", "mma", init_from="unimodal", settings=("scheme", "drop_probs")),
    Stage("joint", "baseline: the fused model trained from scratch", "fused", "none", baseline=True),
    Stage("joint_dropout", "baseline: the fused model from scratch with per-modality dropout", "fused",
          "modality_dropout", settings=("rate",), baseline=True),
)
STAGES: dict[str, Stage] = {s.name: s for s in RECIPE}


def plan(requested: Iterable[str]) -> list[Stage]:
    """The stages to train for `requested` names, with the stages they start from, in recipe order."""
    wanted = set(requested)
    for name in list(wanted):
        while name in STAGES and STAGES[name].init_from:
            name = STAGES[name].init_from
            wanted.add(name)
    return [s for s in RECIPE if s.name in wanted]


@dataclass(frozen=True)
class Schedule:
    """A stage's epochs and learning-rate steps, resolved from its table and `[train]`."""

    epochs: int | None  # None: "auto" (early stopping up to max_epochs)
    max_epochs: int
    patience: int
    lr: float
    lr_milestones: tuple[int, ...]  # only those before the last epoch
    lr_gamma: float

    @property
    def auto(self) -> bool:
        return self.epochs is None

    @property
    def limit(self) -> int:
        """The most epochs the stage can train."""
        return self.max_epochs if self.epochs is None else self.epochs


def resolved(config: dict[str, Any], stage: Stage) -> dict[str, Any]:
    """`<stage>.<key>` -> value for the schedule keys, from a config as `dataclasses.asdict` gives it
    (also a config stored in a checkpoint by an older version, whose stage tables are absent)."""
    train, table = config.get("train", {}), config.get(stage.name) or {}
    values = {}
    for key in SCHEDULE_KEYS:
        value = table.get(key)
        values[f"{stage.name}.{key}"] = train.get(key) if value is None else value
    for key in stage.settings:
        value = table.get(key)
        if key == "rate" and value is None:  # stored by a version that had it as train.modality_dropout
            value = train.get("modality_dropout")
        values[f"{stage.name}.{key}"] = value
    return values


def schedule(config, stage: Stage) -> Schedule:
    values = resolved(dataclasses.asdict(config), stage)
    get = lambda key: values[f"{stage.name}.{key}"]  # noqa: E731
    epochs = None if get("epochs") == AUTO else int(get("epochs"))
    limit = int(get("max_epochs")) if epochs is None else epochs
    return Schedule(epochs, int(get("max_epochs")), int(get("patience")), float(get("lr")),
                    tuple(m for m in get("lr_milestones") if m < limit), float(get("lr_gamma")))


def settings(config: dict[str, Any], stage: Stage) -> dict[str, Any]:
    """`section.key` -> value for everything that decides what `stage` trains (from `asdict(config)`)."""
    values = {f"model.{k}": v for k, v in config["model"].items()}
    values.update({key: config.get(key.split(".")[0], {}).get(key.split(".")[1]) for key in COMMON_SETTINGS})
    values.update(resolved(config, stage))
    return values


def augmentation(config, stage: Stage, modalities: list[str]) -> DropSpec | None:
    """The missing-modality augmentation a stage trains with (the loader applies it)."""
    if stage.augment == "mma":
        if not config.mma.drop_probs and config.mma.scheme == "drop_one":
            return drop_one_uniform(modalities)  # {} = METHOD.md's default for whatever the dataset has
        return DropSpec(config.mma.scheme, dict(config.mma.drop_probs))
    if stage.augment == "modality_dropout":
        return DropSpec("independent", {m: config.joint_dropout.rate for m in modalities})
    return None


def loss(stage: Stage, out: dict, batch: dict, modalities: list[str], multilabel: bool) -> torch.Tensor:
    """Fused loss, or (per branch) the sum of each branch's loss over the samples that have its modality."""
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    if stage.loss == "fused":
        return loss_fn(out["logits"], batch["label"])
    total = out["logits"].sum() * 0.0
    for i, m in enumerate(modalities):
        rows = batch["present"][:, i]
        if rows.any():
            total = total + loss_fn(out["unimodal"][m][rows], batch["label"][rows])
    return total


def selection_metrics(stage: Stage, modalities: list[str]) -> dict[str, str]:
    """What early stopping watches: per branch (`unimodal`) or the fused metric; target -> metrics key."""
    if stage.loss == "per_branch":
        return {m: f"val_acc_{m}_branch" for m in modalities}
    return {"fused": "val_acc"}


def choose(ume_metrics: dict, mma_metrics: dict, checkpoints: dict[str, str], val_split: str,
           multilabel: bool) -> dict[str, Any]:
    """METHOD.md step 4: keep UME unless UME-MMA beats it on full-modality validation data.

    Returns the record results.json holds under `chosen`: the model kept, the metric and split it was
    chosen on, both values and the chosen checkpoint."""
    values = {"UME": float(ume_metrics.get("val_acc", 0.0)), "UME-MMA": float(mma_metrics.get("val_acc", 0.0))}
    chosen = "UME-MMA" if values["UME-MMA"] > values["UME"] else "UME"
    return {"model": chosen, "split": val_split, "metric": "f1_micro" if multilabel else "acc",
            "values": values, "checkpoint": checkpoints["mma" if chosen == "UME-MMA" else "unimodal"]}


def choice_note(choice: dict[str, Any]) -> str:
    v = choice["values"]
    return (f"validation ({choice['split']}, full modalities, {choice['metric']}): UME {100 * v['UME']:.1f}, "
            f"UME-MMA {100 * v['UME-MMA']:.1f} -> keep {choice['model']}")
