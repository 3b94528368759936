"""The recipe table (trainer/recipe.py) as train.py and launch.py read it."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from trainer import recipe
from trainer.train import may_skip_branch


def test_the_recipe_lists_the_stages_in_method_order_with_what_differs() -> None:
    assert [s.name for s in recipe.RECIPE] == ["unimodal", "mma", "joint", "joint_dropout"]
    unimodal, mma = recipe.STAGES["unimodal"], recipe.STAGES["mma"]
    assert (unimodal.loss, unimodal.augment, unimodal.init_from) == ("per_branch", "none", None)
    assert (mma.loss, mma.augment, mma.init_from) == ("fused", "mma", "unimodal")
    assert [s.name for s in recipe.plan(["joint", "mma"])] == ["unimodal", "mma", "joint"]


def test_the_per_branch_loss_counts_each_branch_on_its_own_samples() -> None:
    logits = {"visual": torch.randn(4, 3), "audio": torch.randn(4, 3)}
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    label = torch.tensor([0, 1, 2, 1])
    out = {"logits": logits["visual"] + logits["audio"], "unimodal": logits}
    batch = {"present": present, "label": label}
    expected = (torch.nn.functional.cross_entropy(logits["visual"][present[:, 0]], label[present[:, 0]])
                + torch.nn.functional.cross_entropy(logits["audio"][present[:, 1]], label[present[:, 1]]))
    got = recipe.loss(recipe.STAGES["unimodal"], out, batch, ["visual", "audio"], multilabel=False)
    assert torch.allclose(got, expected)
    fused = recipe.loss(recipe.STAGES["joint"], out, batch, ["visual", "audio"], multilabel=False)
    assert torch.allclose(fused, torch.nn.functional.cross_entropy(out["logits"], label))


def test_ddp_looks_for_unused_parameters_only_where_a_branch_can_be_skipped() -> None:
    full = SimpleNamespace(modalities=["visual", "audio"],
                           splits={"train": {"samples": 10, "has_visual": 10, "has_audio": 10}})
    holes = SimpleNamespace(modalities=["visual", "audio"],
                            splits={"train": {"samples": 10, "has_visual": 10, "has_audio": 9}})
    assert may_skip_branch(recipe.STAGES["joint"], full, "sum") is False
    assert may_skip_branch(recipe.STAGES["unimodal"], full, "sum") is False
    assert may_skip_branch(recipe.STAGES["joint"], full, "concat") is True  # the heads get no gradient
    assert may_skip_branch(recipe.STAGES["joint_dropout"], full, "sum") is True
    assert may_skip_branch(recipe.STAGES["mma"], full, "sum") is True
    assert may_skip_branch(recipe.STAGES["joint"], holes, "sum") is True


def test_the_choice_between_ume_and_ume_mma_is_a_record() -> None:
    checkpoints = {"unimodal": "/runs/u/checkpoint_1", "mma": "/runs/m/checkpoint_2"}
    kept = recipe.choose({"val_acc": 0.9}, {"val_acc": 0.92}, checkpoints, "val", multilabel=False)
    assert kept == {"model": "UME-MMA", "split": "val", "metric": "acc", "values": {"UME": 0.9, "UME-MMA": 0.92},
                    "checkpoint": "/runs/m/checkpoint_2"}
    tie = recipe.choose({"val_acc": 0.9}, {"val_acc": 0.9}, checkpoints, "val", multilabel=True)
    assert (tie["model"], tie["metric"], tie["checkpoint"]) == ("UME", "f1_micro", "/runs/u/checkpoint_1")
    assert recipe.choice_note(tie).endswith("UME 90.0, UME-MMA 90.0 -> keep UME")


def test_channels_last_and_compile_keep_the_weights_and_the_outputs() -> None:
    """`train.channels_last` / `train.compile` change how the step runs, not the model: same state-dict names
    and values, and (channels-last) the same outputs."""
    import dataclasses

    from trainer.config import ModelConfig, TrainConfig
    from trainer.models import build_model
    from trainer.train import speed_up

    cfg = ModelConfig(width=4, encoders={"visual": "resnet18_frames", "audio": "resnet18_spec"})
    torch.manual_seed(0)
    plain = build_model(cfg, ["visual", "audio"], 3).eval()
    fast = build_model(cfg, ["visual", "audio"], 3).eval()
    fast.load_state_dict(plain.state_dict())
    config = SimpleNamespace(train=dataclasses.replace(TrainConfig(), channels_last=True, compile=False))
    speed_up(fast, config)
    assert fast.encoders["visual"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = {"visual": torch.randn(2, 3, 3, 32, 32), "audio": torch.randn(2, 1, 16, 20),
             "present": torch.ones(2, 2, dtype=torch.bool)}
    with torch.no_grad():
        assert torch.allclose(fast(batch)["logits"], plain(batch)["logits"], atol=1e-5)
    speed_up(fast, SimpleNamespace(train=dataclasses.replace(TrainConfig(), compile=True)))
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints of a compiled run load anywhere
