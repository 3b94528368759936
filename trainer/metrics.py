"""The metrics, implemented once: counts that add up over batches and workers, and the scores made from them.

Single-label: accuracy. Multi-label: F1-macro (the mean over classes of 2TP / (2TP + FP + FN), a class with
no positives and no predictions scoring 0) and F1-micro (the same over all classes' counts), a label being
predicted when its logit is above 0 (sigmoid above 0.5). The training loop's validation adds the counts of
its batches on the device and sums them across workers (one all-reduce); the evaluation counts a whole
split at once. Both then call `scores`."""
from __future__ import annotations

import torch


def counts(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool, num_classes: int) -> torch.Tensor:
    """float64 counts on the logits' device: [correct, total] (single-label), or [3, C] of TP, FP, FN per
    class (multi-label)."""
    if not multilabel:
        correct = (logits.argmax(1) == labels).sum().double() if len(labels) else logits.new_zeros((), dtype=torch.float64)
        return torch.stack([correct, torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device)])
    pred, truth = logits > 0, labels > 0.5
    if not len(labels):
        return torch.zeros(3, num_classes, dtype=torch.float64, device=logits.device)
    return torch.stack([(pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0)]).double()


def scores(tally: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """`{"acc"}`, or `{"f1_macro", "f1_micro"}` for multi-label, from `counts` (summed over batches)."""
    tally = tally.double().cpu()
    if not multilabel:
        return {"acc": float(tally[0] / tally[1].clamp(min=1))}
    tp, fp, fn = tally
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
    return {"f1_macro": float(f1.mean()), "f1_micro": float(micro)}


def score(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """Accuracy, or F1-macro and F1-micro for multi-label, of a whole split's logits."""
    return scores(counts(logits, labels, multilabel, logits.shape[1]), multilabel)
