"""The `eval` stage: scenario matrix x methods -> results table (markdown + JSON) and plot (PNG).

Methods (METHOD.md): the uni-modal models (each UME branch alone), joint late fusion, joint late fusion
with modality dropout, UME and UME-MMA; below them one classical baseline per modality (`trainer.baselines`,
fitted on the train split). One pass decodes the test split with its natural missingness and caches every
model's per-modality features and the baselines' inputs; each scenario then only changes the `present`
mask (`shards.masks.scenario_keep`, a hash of key and seed) before the heads and fusion. Encoders see
one sample at a time in evaluation mode, so this equals decoding the split once per scenario, and every
method is scored on exactly the same samples."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shards.format import read_dataset_info
from shards.loader import make_loader
from shards.masks import parse_scenario, scenario_keep
from shards.writer import atomic_write_bytes
from trainer.baselines import DESCRIPTIONS, baseline_name, fit_baselines, summarize
from trainer.checkpoint import load_state, load_weights
from trainer.config import Config
from trainer.metrics import score
from trainer.models import LateFusion, model_for_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A row of the table: a checkpoint, and optionally the one modality it may use."""

    name: str
    checkpoint: str
    only: str | None = None
    weighted: bool = False  # each branch's logits times its weight fitted on the validation split (sum fusion)


def standard_methods(checkpoints: dict[str, str], modalities: list[str]) -> list[Method]:
    """The rows of METHOD.md's table: uni-modal models, joint, joint + dropout (when trained), UME, UME-MMA,
    and UME with branch weights fitted on validation."""
    methods = [Method(f"{m}-only", checkpoints["unimodal"], only=m) for m in modalities]
    methods += [Method(name, checkpoints[stage]) for name, stage in (("joint late fusion", "joint"),
                                                                     ("joint + modality dropout", "joint_dropout"))
                if stage in checkpoints]  # baselines: left out when not trained
    methods += [Method("UME", checkpoints["unimodal"]),
                Method("UME-MMA", checkpoints["mma"]),
                Method(WEIGHTED_UME, checkpoints["unimodal"], weighted=True)]
    return methods


WEIGHTED_UME = "UME, branch weights fitted on val"
PRIOR = 0.01  # a weak pull of log(weight) towards 0 (plain UME), so a small validation split cannot send one to 0


def fit_branch_weights(branch_logits: dict[str, torch.Tensor], present: torch.Tensor, labels: torch.Tensor,
                       multilabel: bool, steps: int = 100) -> dict[str, float]:
    """One positive weight per branch for the fused sum `sum_m w_m * logits_m` (a temperature per branch),
    fitted by L-BFGS on the validation split's loss plus `PRIOR * sum(log(w)^2)`; w = 1 for every branch is
    plain UME.

    A branch that is over-confident or worse on data like the validation split gets a smaller weight, so
    the sum leans on the branches that are reliable there."""
    names = list(branch_logits)
    stacked = torch.stack([torch.where(present[:, i, None], branch_logits[m].float(), 0.0)
                           for i, m in enumerate(names)])  # [M, N, C]
    log_w = torch.zeros(len(names), requires_grad=True)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits if multilabel else torch.nn.functional.cross_entropy
    target = labels.float() if multilabel else labels
    optimizer = torch.optim.LBFGS([log_w], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn((log_w.exp()[:, None, None] * stacked).sum(0), target) + PRIOR * log_w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return {m: round(float(w), 4) for m, w in zip(names, log_w.detach().exp())}


@torch.no_grad()
def branch_logits(model: LateFusion, features: dict[str, torch.Tensor], present: torch.Tensor,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Each branch's logits (zero where its modality is absent) from the features `_features` cached."""
    out = model.fuse({m: f.to(device) for m, f in features.items()}, present.to(device))
    return {m: v.cpu() for m, v in out["unimodal"].items()}


def branch_scores(branch_logits: dict[str, torch.Tensor], present: torch.Tensor, labels: torch.Tensor,
                  multilabel: bool) -> dict[str, dict[str, float]]:
    """Each branch scored alone on the samples that have its modality."""
    return {m: score(branch_logits[m][present[:, i]], labels[present[:, i]], multilabel)
            for i, m in enumerate(branch_logits) if bool(present[:, i].any())}


@torch.no_grad()
def _features(models: dict[str, LateFusion], loader, device: torch.device,
              modalities: list[str]) -> tuple[dict, dict, list[str], torch.Tensor, torch.Tensor]:
    """Per checkpoint, per modality features over the whole split (zeros where naturally absent), and per
    modality the baselines' inputs."""
    feats: dict[str, dict[str, list[torch.Tensor]]] = {c: {} for c in models}
    inputs: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    keys, labels, has = [], [], []
    for batch in tqdm(loader, desc="eval features", unit="batch", leave=False):
        present = batch["present"].to(device)
        for ckpt, model in models.items():
            for i, m in enumerate(model.modalities):
                feats[ckpt].setdefault(m, []).append(model.encode(m, batch[m].to(device), present[:, i]).cpu())
        for m in modalities:
            inputs[m].append(summarize(m, batch[m]))
        keys += batch["key"]
        labels.append(batch["label"])
        has.append(batch["present"])
    cat = {c: {m: torch.cat(v) for m, v in per.items()} for c, per in feats.items()}
    return cat, {m: np.concatenate(v) for m, v in inputs.items()}, keys, torch.cat(labels), torch.cat(has)


def evaluate(config: Config, methods: list[Method], device: torch.device | None = None) -> dict:
    """The scenario matrix: {"scenarios": [...], "methods": {name: {scenario: metrics}}, ...}."""
    device = device or torch.device("cpu")
    info = read_dataset_info(config.data.dataset_dir)
    models: dict[str, LateFusion] = {}
    for method in methods:
        if method.checkpoint not in models:
            model = model_for_dataset(config.model, info)
            load_weights(model, load_state(method.checkpoint), method.checkpoint)
            models[method.checkpoint] = model.to(device).eval()
    def split_loader(split: str):
        return make_loader(config.data.dataset_dir, split, config.data.batch_size, backend=config.data.backend,
                           crop=config.data.crop_size, num_workers=config.data.num_workers, seed=config.eval.seed)

    feats, inputs, keys, labels, has = _features(models, split_loader(config.eval.split), device, info.modalities)
    weights, val_branches, test_branches = {}, {}, {}
    for method in (m for m in methods if m.weighted):
        model = models[method.checkpoint]
        val_feats, _, _, val_labels, val_has = _features({method.checkpoint: model},
                                                         split_loader(config.eval.val_split), device, info.modalities)
        val_logits = branch_logits(model, val_feats[method.checkpoint], val_has, device)
        weights[method.name] = fit_branch_weights(val_logits, val_has, val_labels, info.multilabel)
        val_branches = branch_scores(val_logits, val_has, val_labels, info.multilabel)
        test_branches = branch_scores(branch_logits(model, feats[method.checkpoint], has, device), has, labels,
                                      info.multilabel)
    fitted = fit_baselines(config)
    baseline_logits = {m: b.logits(inputs[m], info.num_classes, info.multilabel) for m, b in fitted.items()}
    scenarios = config.eval.scenario_names(info.modalities)
    table: dict[str, dict[str, dict[str, float]]] = {m.name: {} for m in methods}
    baselines = {m: {"name": baseline_name(m), "train_samples": b.train_samples, "scores": {}}
                 for m, b in fitted.items()}
    present_counts = {}
    for name in scenarios:
        scenario = parse_scenario(name, info.modalities)
        keep = torch.from_numpy(scenario_keep(keys, info.modalities, scenario, config.eval.seed))
        present = has & keep
        present_counts[name] = {m: int(present[:, i].sum()) for i, m in enumerate(info.modalities)}
        for method in methods:
            mask = present.clone()
            if method.only:
                mask[:, [i for i, m in enumerate(info.modalities) if m != method.only]] = False
            model = models[method.checkpoint]
            with torch.no_grad():
                features = {m: f.to(device) for m, f in feats[method.checkpoint].items()}
                out = model.fuse(features, mask.to(device))
                if method.weighted:
                    logits = sum(w * out["unimodal"][m] for m, w in weights[method.name].items()).cpu()
                else:
                    logits = out["logits"].cpu()
            table[method.name][name] = score(logits, labels, info.multilabel)
        for m, logits in baseline_logits.items():  # as a uni-modal model: zero logits where m is absent
            i = info.modalities.index(m)
            baselines[m]["scores"][name] = score(torch.where(present[:, i, None], logits, 0.0), labels, info.multilabel)
    return {"dataset": info.dataset, "split": config.eval.split, "samples": len(keys), "modalities": info.modalities,
            "scenarios": scenarios, "present": present_counts, "methods": table, "baselines": baselines,
            "multilabel": info.multilabel, "branch_weights": weights,
            "val_branches": {"split": config.eval.val_split, "scores": val_branches},
            "test_branches": test_branches}


def write_results(results: dict, out_dir: Path, notes: list[str]) -> Path:
    """results.json, results.md (table) and missing_rate.png; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results, notes=notes)
    atomic_write_bytes(out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    metrics = ["f1_macro", "f1_micro"] if results["multilabel"] else ["acc"]
    scenarios = results["scenarios"]
    lines = []
    for metric in metrics:  # one table per metric (multi-label: F1-macro, then F1-micro)
        lines += [f"# {results['dataset']}: {metric} on `{results['split']}` ({results['samples']} samples) "
                  f"by scenario", "", "| method | " + " | ".join(scenarios) + " |", "|---|" + "---:|" * len(scenarios)]
        rows = [*results["methods"].items(), *_baseline_rows(results)]
        for method, row in rows:
            lines.append(f"| {method} | " + " | ".join(f"{100 * row[s][metric]:.1f}" for s in scenarios) + " |")
        lines.append("")
    metric = metrics[0]
    counts = list(results["present"].items())[:3]
    lines += ["Samples with each modality present per scenario: " +
              "; ".join(f"{s}: " + ", ".join(f"{m} {n}" for m, n in c.items()) for s, c in counts), ""]
    if results.get("baselines"):
        lines += ["Baselines (`trainer/baselines.py`) fitted on the train samples with the modality: " +
                  ", ".join(f"{m} {b['train_samples']}" for m, b in results["baselines"].items()) +
                  "; scored like the uni-modal models (a sample without the modality gets zero logits).", ""]
    lines += [f"- {n}" for n in notes]
    md = out_dir / "results.md"
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())
    _plot(results, metric, out_dir / "missing_rate.png")
    return md


def _plot(results: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities = results["modalities"]
    fig, axes = plt.subplots(1, len(modalities), figsize=(5.5 * len(modalities), 4.2), squeeze=False)
    for ax, m in zip(axes[0], modalities):
        rates = sorted({float(s.split("=")[1]) for s in results["scenarios"] if s.startswith(f"rate:{m}=")})
        names = (["full"] if "full" in results["scenarios"] else []) + [f"rate:{m}={r:g}" for r in rates] + \
            ([f"missing:{m}"] if f"missing:{m}" in results["scenarios"] else [])
        xs = [0.0 if n == "full" else 1.0 if n.startswith("missing:") else float(n.split("=")[1]) for n in names]
        for method, row in results["methods"].items():
            ax.plot(xs, [100 * row[n][metric] for n in names], marker="o", label=method)
        for method, row in _baseline_rows(results):
            ax.plot(xs, [100 * row[n][metric] for n in names], linestyle="--", alpha=0.8, label=method)
        ax.set_xlabel(f"fraction of test samples missing {m}")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{results['dataset']}: missing {m}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _baseline_rows(results: dict) -> list[tuple[str, dict]]:
    return [(b["name"], b["scores"]) for b in results.get("baselines", {}).values()]


def undertrained_branches(results: dict) -> list[str]:
    """A line per uni-modal model (`<m>-only`) that scores below its modality's baseline on full test data."""
    metric = "f1_macro" if results["multilabel"] else "acc"
    if "full" not in results["scenarios"]:
        return []
    lines = []
    for m, baseline in results.get("baselines", {}).items():
        if f"{m}-only" not in results["methods"]:
            continue
        branch, base = (100 * row["full"][metric] for row in (results["methods"][f"{m}-only"], baseline["scores"]))
        if branch < base:
            lines.append(f"the {m} branch is under-trained: {m}-only {branch:.1f} vs {base:.1f} for "
                         f"{DESCRIPTIONS[m]} on full test data; a trained encoder should beat a linear model "
                         f"on down-sampled inputs (train it longer, or check what it is fed)")
    return lines


def method_claims(results: dict) -> list[str]:
    """METHOD.md's claims checked on this table: under missing:<m>, UME-MMA against the uni-modal model of
    the remaining modality and joint late fusion; on full, UME-MMA against UME. Then each uni-modal model
    against its classical baseline (`undertrained_branches`)."""
    return [*_ume_mma_claims(results), *undertrained_branches(results), *weight_notes(results),
            *val_test_disagreements(results)]


def weight_notes(results: dict) -> list[str]:
    """The fitted branch weights, and what weighting changes on full test data."""
    metric = "f1_macro" if results["multilabel"] else "acc"
    lines = []
    for name, weights in results.get("branch_weights", {}).items():
        line = (f"{name}: " + ", ".join(f"{m} x{w:.2f}" for m, w in weights.items()) +
                f" (fitted on `{results['val_branches']['split']}`)")
        if "full" in results["scenarios"] and "UME" in results["methods"]:
            plain, weighted = (100 * results["methods"][k]["full"][metric] for k in ("UME", name))
            line += f"; on full test data {weighted:.1f} vs {plain:.1f} for the plain sum ({weighted - plain:+.1f})"
        lines.append(line)
    return lines


DISAGREEMENT_POINTS = 15.0  # a branch this much better on validation than on test, beyond the others' gap


def val_test_disagreements(results: dict) -> list[str]:
    """A line per branch whose validation score (on the samples with its modality) overstates its test
    score by DISAGREEMENT_POINTS more than the other branches' do: validation does not look like the test
    data for that modality (unseen speakers, another recording condition), so what is chosen on it (UME or
    UME-MMA, branch weights, the epochs kept) need not carry over."""
    metric = "f1_macro" if results["multilabel"] else "acc"
    val, test = results.get("val_branches", {}).get("scores", {}), results.get("test_branches", {})
    gaps = {m: 100 * (val[m][metric] - test[m][metric]) for m in val if m in test}
    lines = []
    for m, gap in gaps.items():
        others = [g for o, g in gaps.items() if o != m]
        if others and gap - max(others) >= DISAGREEMENT_POINTS:
            lines.append(f"validation and test disagree about the {m} branch: {100 * val[m][metric]:.1f} on "
                         f"`{results['val_branches']['split']}`, {100 * test[m][metric]:.1f} on `{results['split']}` "
                         f"(samples with {m}; gap {gap:+.1f} "
                         f"points, the other branches {max(others):+.1f}); what is chosen on validation may not "
                         f"carry over: build a validation split that matches the test conditions (e.g. unseen "
                         f"speakers or sources)")
    return lines


def _ume_mma_claims(results: dict) -> list[str]:
    metric = "f1_macro" if results["multilabel"] else "acc"
    rows = results["methods"]
    if "UME-MMA" not in rows or "UME" not in rows:
        return []
    pts = lambda method, scenario: 100 * rows[method][scenario][metric]  # noqa: E731
    lines = []
    modalities = results["modalities"]
    if len(modalities) == 2 and "joint late fusion" in rows:
        for m in modalities:
            other = next(o for o in modalities if o != m)
            if f"missing:{m}" not in results["scenarios"]:
                continue
            s, mma = f"missing:{m}", pts("UME-MMA", f"missing:{m}")
            uni, joint = pts(f"{other}-only", s), pts("joint late fusion", s)
            lines.append(f"{s}: UME-MMA {mma:.1f} vs {other}-only {uni:.1f} ({mma - uni:+.1f}; claim: within 2 "
                         f"points -> {'yes' if mma >= uni - 2 else 'no'}) and joint late fusion {joint:.1f} "
                         f"({mma - joint:+.1f}; claim: above -> {'yes' if mma > joint else 'no'})")
    if "full" not in results["scenarios"]:
        return lines
    mma, ume = pts("UME-MMA", "full"), pts("UME", "full")
    lines.append(f"full: UME-MMA {mma:.1f} vs UME {ume:.1f} ({mma - ume:+.1f}; claim: at least UME - 1 -> "
                 f"{'yes' if mma >= ume - 1 else 'no'})")
    return lines

