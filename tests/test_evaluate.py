"""The evaluation's own arithmetic: branch weights fitted on validation, and the line that says when
validation and test disagree about a branch."""
from __future__ import annotations

import torch

from trainer.evaluate import fit_branch_weights, val_test_disagreements


def test_branch_weights_lean_on_the_branch_that_is_right_on_validation() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    good = torch.nn.functional.one_hot(labels, 4).float() * 3 + torch.randn(400, 4, generator=g)
    noise = torch.randn(400, 4, generator=g) * 3  # an over-confident branch that knows nothing
    present = torch.ones(400, 2, dtype=torch.bool)
    weights = fit_branch_weights({"visual": good, "audio": noise}, present, labels, multilabel=False)
    assert weights["visual"] > 0.5 and weights["audio"] < 0.2 * weights["visual"]

    def loss(w: dict[str, float]) -> float:
        return float(torch.nn.functional.cross_entropy(w["visual"] * good + w["audio"] * noise, labels))

    assert loss(weights) < loss({"visual": 1.0, "audio": 1.0})  # better than the plain sum it starts from


def test_a_branch_much_better_on_validation_than_on_test_gets_a_line() -> None:
    def results(audio_test: float) -> dict:
        return {"multilabel": False, "split": "test", "scenarios": ["full"],
                "val_branches": {"split": "val", "scores": {"visual": {"acc": 0.96}, "audio": {"acc": 0.84}}},
                "test_branches": {"visual": {"acc": 0.95}, "audio": {"acc": audio_test}}}

    (line,) = val_test_disagreements(results(0.35))
    assert line.startswith("validation and test disagree about the audio branch: 84.0 on `val`, 35.0 on `test`")
    assert "build a validation split that matches the test conditions" in line
    assert val_test_disagreements(results(0.80)) == []  # a small gap is noise, not a mismatch


def test_counts_add_up_over_batches_to_the_whole_splits_scores() -> None:
    """Validation sums `counts` over batches (and workers); the evaluation scores the whole split: same numbers."""
    from trainer.metrics import counts, score, scores

    g = torch.Generator().manual_seed(1)
    for multilabel in (False, True):
        logits = torch.randn(50, 5, generator=g)
        labels = (torch.rand(50, 5, generator=g) > 0.6).float() if multilabel else torch.randint(0, 5, (50,), generator=g)
        summed = sum(counts(logits[i:i + 8], labels[i:i + 8], multilabel, 5) for i in range(0, 50, 8))
        assert scores(summed, multilabel) == score(logits, labels, multilabel)
    acc = score(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]), False)
    assert acc == {"acc": 2 / 3}
    f1 = score(torch.tensor([[1.0, -1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), True)
    assert f1 == {"f1_macro": (1 / 1.5 + 1.0) / 2, "f1_micro": 0.8}  # class 0: TP 1, FP 1; class 1: TP 1
