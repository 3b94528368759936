"""Encoders, the registry, pretrained loading and the late-fusion model (DESIGN.md trainer contract)."""

from pathlib import Path

import pytest
import torch

from trainer import models
from trainer.config import load_config
from trainer.models import (
    FrameResNet18,
    LateFusion,
    ResNet18,
    build_encoder,
    build_model,
    load_pretrained,
    param_groups,
    register_encoder,
)

CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"

# torchvision.models.resnet18().state_dict().keys(), in order (torchvision is not installed here).
# fmt: off
TORCHVISION_RESNET18_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked", "layer1.0.conv2.weight",
    "layer1.0.bn2.weight", "layer1.0.bn2.bias", "layer1.0.bn2.running_mean", "layer1.0.bn2.running_var",
    "layer1.0.bn2.num_batches_tracked", "layer1.1.conv1.weight", "layer1.1.bn1.weight", "layer1.1.bn1.bias",
    "layer1.1.bn1.running_mean", "layer1.1.bn1.running_var", "layer1.1.bn1.num_batches_tracked",
    "layer1.1.conv2.weight", "layer1.1.bn2.weight", "layer1.1.bn2.bias", "layer1.1.bn2.running_mean",
    "layer1.1.bn2.running_var", "layer1.1.bn2.num_batches_tracked", "layer2.0.conv1.weight",
    "layer2.0.bn1.weight", "layer2.0.bn1.bias", "layer2.0.bn1.running_mean", "layer2.0.bn1.running_var",
    "layer2.0.bn1.num_batches_tracked", "layer2.0.conv2.weight", "layer2.0.bn2.weight", "layer2.0.bn2.bias",
    "layer2.0.bn2.running_mean", "layer2.0.bn2.running_var", "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked", "layer2.1.conv1.weight", "layer2.1.bn1.weight",
    "layer2.1.bn1.bias", "layer2.1.bn1.running_mean", "layer2.1.bn1.running_var",
    "layer2.1.bn1.num_batches_tracked", "layer2.1.conv2.weight", "layer2.1.bn2.weight", "layer2.1.bn2.bias",
    "layer2.1.bn2.running_mean", "layer2.1.bn2.running_var", "layer2.1.bn2.num_batches_tracked",
    "layer3.0.conv1.weight", "layer3.0.bn1.weight", "layer3.0.bn1.bias", "layer3.0.bn1.running_mean",
    "layer3.0.bn1.running_var", "layer3.0.bn1.num_batches_tracked", "layer3.0.conv2.weight",
    "layer3.0.bn2.weight", "layer3.0.bn2.bias", "layer3.0.bn2.running_mean", "layer3.0.bn2.running_var",
    "layer3.0.bn2.num_batches_tracked", "layer3.0.downsample.0.weight", "layer3.0.downsample.1.weight",
    "layer3.0.downsample.1.bias", "layer3.0.downsample.1.running_mean", "layer3.0.downsample.1.running_var",
    "layer3.0.downsample.1.num_batches_tracked", "layer3.1.conv1.weight", "layer3.1.bn1.weight",
    "layer3.1.bn1.bias", "layer3.1.bn1.running_mean", "layer3.1.bn1.running_var",
    "layer3.1.bn1.num_batches_tracked", "layer3.1.conv2.weight", "layer3.1.bn2.weight", "layer3.1.bn2.bias",
    "layer3.1.bn2.running_mean", "layer3.1.bn2.running_var", "layer3.1.bn2.num_batches_tracked",
    "layer4.0.conv1.weight", "layer4.0.bn1.weight", "layer4.0.bn1.bias", "layer4.0.bn1.running_mean",
    "layer4.0.bn1.running_var", "layer4.0.bn1.num_batches_tracked", "layer4.0.conv2.weight",
    "layer4.0.bn2.weight", "layer4.0.bn2.bias", "layer4.0.bn2.running_mean", "layer4.0.bn2.running_var",
    "layer4.0.bn2.num_batches_tracked", "layer4.0.downsample.0.weight", "layer4.0.downsample.1.weight",
    "layer4.0.downsample.1.bias", "layer4.0.downsample.1.running_mean", "layer4.0.downsample.1.running_var",
    "layer4.0.downsample.1.num_batches_tracked", "layer4.1.conv1.weight", "layer4.1.bn1.weight",
    "layer4.1.bn1.bias", "layer4.1.bn1.running_mean", "layer4.1.bn1.running_var",
    "layer4.1.bn1.num_batches_tracked", "layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer4.1.bn2.bias",
    "layer4.1.bn2.running_mean", "layer4.1.bn2.running_var", "layer4.1.bn2.num_batches_tracked", "fc.weight",
    "fc.bias",
]
# fmt: on
ENCODER_KEYS = [k for k in TORCHVISION_RESNET18_KEYS if not k.startswith("fc.")]
MODALITIES = ["visual", "audio", "text"]
NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(fusion: str = "sum") -> LateFusion:
    """A three-modality model small enough to run in milliseconds."""
    torch.manual_seed(0)
    encoders = {
        "visual": build_encoder("resnet18_frames", width=4),
        "audio": build_encoder("resnet18_spec", width=4),
        "text": build_encoder("text_transformer", width=8, vocab_size=50, max_len=8),
    }
    return LateFusion(MODALITIES, encoders, NUM_CLASSES, fusion=fusion).eval()


def tiny_batch(present: list[list[bool]] | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    """A loader-shaped batch of 4 samples; all modalities present unless ``present`` says otherwise."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 50, (4, 6), generator=generator)
    text[:, 4:] = 0
    return {
        "visual": torch.randn(4, 2, 3, 32, 32, generator=generator),
        "audio": torch.randn(4, 1, 32, 40, generator=generator),
        "text": text,
        "present": torch.tensor(present or [[True] * 3] * 4),
    }


def masked_reference(model: LateFusion, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum fusion computed the naive way: every encoder on the whole batch, absent terms masked out."""
    terms = [
        torch.where(batch["present"][:, i, None], model.heads[m](model.encoders[m](batch[m])), 0.0)
        for i, m in enumerate(model.modalities)
    ]
    return torch.stack(terms).sum(dim=0)


def test_resnet18_state_dict_names_are_torchvision_names():
    frames = build_encoder("resnet18_frames")
    spec = build_encoder("resnet18_spec")
    assert list(frames.state_dict()) == ENCODER_KEYS
    assert list(spec.state_dict()) == ENCODER_KEYS
    assert frames.state_dict()["conv1.weight"].shape == (64, 3, 7, 7)
    assert spec.state_dict()["conv1.weight"].shape == (64, 1, 7, 7)
    assert frames.state_dict()["layer4.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert frames.out_dim == spec.out_dim == 512


def test_width_scales_every_stage():
    encoder = ResNet18(in_channels=1, width=16)
    assert encoder.state_dict()["layer4.1.conv2.weight"].shape == (128, 128, 3, 3)
    assert encoder(torch.randn(2, 1, 64, 201)).shape == (2, encoder.out_dim) == (2, 128)


def test_frame_encoder_averages_per_frame_features():
    encoder = FrameResNet18(width=4).eval()
    frames = torch.randn(2, 3, 3, 32, 32)
    expected = torch.stack([encoder.features(frames[:, t]) for t in range(3)]).mean(dim=0)
    torch.testing.assert_close(encoder(frames), expected)


def test_text_encoder_ignores_padding_and_survives_empty_text():
    encoder = build_encoder("text_transformer", vocab_size=50, max_len=8).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 0, 0, 0]])
    features = encoder(tokens)
    assert features.shape == (2, 128)
    assert torch.equal(features[1], torch.zeros(128))
    torch.testing.assert_close(encoder(tokens[:1, :3]), features[:1])


def test_unknown_encoder_lists_known_names():
    with pytest.raises(ValueError, match="hf_audio, hf_text, hf_vision, resnet18_frames, resnet18_spec, text_bow, "
                                         "text_transformer"):
        build_encoder("resnet50_frames")


def test_text_bow_is_the_mean_of_token_and_bigram_embeddings_without_padding():
    encoder = build_encoder("text_bow", width=8, vocab_size=50)
    assert encoder.out_dim == 16 and encoder.bag.num_embeddings == 100  # 50 words + 50 bigram buckets
    tokens = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 0, 0, 0]])
    features = encoder(tokens)
    assert features.shape == (2, 16)
    assert torch.equal(features[1], torch.zeros(16))  # empty text: zero features
    torch.testing.assert_close(encoder(tokens[:1, :3]), features[:1])  # padding changes nothing
    table = encoder.bag.weight
    bigrams = [50 + (a * 1000003 + b) % 50 for a, b in ((5, 6), (6, 7))]
    torch.testing.assert_close(features[0], table[[5, 6, 7, *bigrams]].mean(dim=0))
    assert not torch.allclose(encoder(torch.tensor([[7, 6, 5]])), features[:1])  # word order enters via bigrams
    unigrams = models.TextBag(vocab_size=50, dim=16, bigram_buckets=0)
    torch.testing.assert_close(unigrams(torch.tensor([[7, 6, 5, 0]])), unigrams(torch.tensor([[5, 6, 7, 0]])))


def test_text_bow_learns_which_keyword_decides_the_class():
    """Class k iff keyword k (ids 2, 3, 4) occurs among random filler words and padding: a linear bag of words
    learns it in a few hundred steps and gets held-out texts right."""
    generator = torch.Generator().manual_seed(0)

    def texts(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 3, (n,), generator=generator)
        tokens = torch.randint(5, 40, (n, 12), generator=generator)
        lengths = torch.randint(3, 13, (n,), generator=generator)
        where = (torch.rand(n, generator=generator) * lengths).long()
        tokens[torch.arange(n), where] = labels + 2
        tokens[torch.arange(12)[None] >= lengths[:, None]] = 0
        return tokens, labels

    torch.manual_seed(0)
    model = LateFusion(["text"], {"text": build_encoder("text_bow", width=8, vocab_size=40)}, num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        tokens, labels = texts(32)
        out = model({"text": tokens, "present": torch.ones(32, 1, dtype=torch.bool)})
        loss = torch.nn.functional.cross_entropy(out["logits"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens, labels = texts(200)
    with torch.no_grad():
        predicted = model({"text": tokens, "present": torch.ones(200, 1, dtype=torch.bool)})["logits"].argmax(1)
    assert (predicted == labels).float().mean() >= 0.95


def test_text_bow_is_selected_by_the_config_and_sized_by_the_dataset():
    cfg = load_config(CONFIGS / "mm_imdb.toml", ["model.encoders.text=text_bow", "model.width=8"])
    model = build_model(cfg.model, ["visual", "text"], 23, {"text": {"vocab_size": 100, "max_len": 16, "params": {}}})
    assert isinstance(model.encoders["text"], models.TextBag) and model.encoders["text"].vocab_size == 100
    assert model.heads["text"].in_features == 16


def test_registered_encoder_is_built_by_name(monkeypatch):
    monkeypatch.setattr(models, "ENCODERS", dict(models.ENCODERS))

    @register_encoder("mean_pixels")
    def mean_pixels(width: int) -> torch.nn.Module:
        layer = torch.nn.Flatten()
        layer.out_dim = 3 * 4 * 4
        return layer

    assert build_encoder("mean_pixels", width=1).out_dim == 48
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("mean_pixels")(mean_pixels)


def test_sum_fusion_with_all_present_is_the_sum_of_the_heads():
    model = tiny_model()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch)
        heads = [model.heads[m](model.encoders[m](batch[m])) for m in MODALITIES]
    assert out["logits"].shape == (4, NUM_CLASSES)
    torch.testing.assert_close(out["logits"], heads[0] + heads[1] + heads[2])
    for m, logits in zip(MODALITIES, heads, strict=True):
        torch.testing.assert_close(out["unimodal"][m], logits)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_absent_modality_contributes_nothing(mode):
    model = tiny_model().train(mode == "train")
    present = [[True, True, True], [True, False, True], [False, True, True], [True, False, False]]
    batch = tiny_batch(present)
    changed = dict(batch, audio=batch["audio"].clone(), visual=batch["visual"].clone())
    changed["audio"][[1, 3]] = 7.0
    changed["visual"][2] = -3.0
    with torch.no_grad():
        torch.manual_seed(0)  # the same dropout masks in both passes
        out = model(batch)
        torch.manual_seed(0)
        out_changed = model(changed)
    assert torch.equal(out["logits"], out_changed["logits"])
    assert torch.equal(out["unimodal"]["audio"][[1, 3]], torch.zeros(2, NUM_CLASSES))
    torch.testing.assert_close(out["logits"][3], out["unimodal"]["visual"][3])


def test_encoder_of_a_modality_absent_from_the_whole_batch_is_skipped():
    model = tiny_model()
    batch = tiny_batch([[True, False, True]] * 4)
    calls = []
    model.encoders["audio"].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = model(batch)
        expected = masked_reference(model, batch)
    assert calls == [1]  # only masked_reference ran the audio encoder
    assert torch.equal(out["logits"], expected)
    assert torch.equal(out["unimodal"]["audio"], torch.zeros(4, NUM_CLASSES))


def test_partially_present_modality_matches_the_masked_computation():
    model = tiny_model()
    batch = tiny_batch([[True, False, True], [False, True, True], [True, True, False], [True, True, True]])
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logits"], masked_reference(model, batch))


@pytest.mark.parametrize(
    "present",
    [[[True, True, True]] * 4, [[True, False, True], [False, True, True], [True, True, False], [True, False, False]]],
    ids=["all-present", "some-absent"],
)
def test_concat_initialised_from_heads_equals_sum_fusion(present):
    summed = tiny_model("sum")
    concat = tiny_model("concat")
    missing, unexpected = concat.load_state_dict(summed.state_dict(), strict=False)
    assert sorted(missing) == ["fusion.weight", "fusion_bias"] and not unexpected
    concat.init_concat_from_heads()
    batch = tiny_batch(present)
    with torch.no_grad():
        torch.testing.assert_close(concat(batch)["logits"], summed(batch)["logits"], rtol=1e-5, atol=1e-6)


def torchvision_style_checkpoint(path: Path, width: int) -> dict[str, torch.Tensor]:
    """Save a full-model state dict the way torchvision's resnet18 has it (with ``fc``) and return it."""
    torch.manual_seed(3)
    state = ResNet18(width=width).state_dict()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    state["fc.weight"] = torch.randn(1000, 8 * width)
    state["fc.bias"] = torch.randn(1000)
    torch.save(state, path)
    return state


def test_load_pretrained_roundtrips_a_torchvision_checkpoint(tmp_path):
    path = tmp_path / "resnet18.pth"
    saved = torchvision_style_checkpoint(path, width=8)
    frames = build_encoder("resnet18_frames", width=8)
    load_pretrained(frames, path)
    for key, value in frames.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_load_pretrained_averages_rgb_conv1_for_the_spectrogram_encoder(tmp_path):
    path = tmp_path / "resnet18.pth"
    saved = torchvision_style_checkpoint(path, width=8)
    spec = build_encoder("resnet18_spec", width=8)
    load_pretrained(spec, path)
    torch.testing.assert_close(spec.conv1.weight, saved["conv1.weight"].mean(dim=1, keepdim=True))
    assert torch.equal(spec.layer3[0].bn1.running_var, saved["layer3.0.bn1.running_var"])


def test_load_pretrained_accepts_checkpoints_without_batch_counters(tmp_path):
    path = tmp_path / "old.pth"
    saved = torchvision_style_checkpoint(path, width=8)
    torch.save({k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}, path)
    frames = build_encoder("resnet18_frames", width=8)
    load_pretrained(frames, path)
    assert torch.equal(frames.conv1.weight, saved["conv1.weight"])


def test_load_pretrained_names_file_keys_and_encoder_on_mismatch(tmp_path):
    path = tmp_path / "width8.pth"
    torchvision_style_checkpoint(path, width=8)
    with pytest.raises(ValueError, match=r"width8\.pth.*FrameResNet18\(in_channels=3, width=16\).*conv1\.weight"):
        load_pretrained(build_encoder("resnet18_frames", width=16), path)
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "head.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): bn1\.weight.*unexpected keys \(1\): head\.weight"):
        load_pretrained(build_encoder("resnet18_frames", width=8), path)


def test_build_model_from_the_demo_config_with_pretrained_audio(tmp_path):
    path = tmp_path / "audio.pth"
    saved = torchvision_style_checkpoint(path, width=16)
    cfg = load_config(CONFIGS / "av_digits.toml", [f"model.pretrained.audio={path}"])
    model = build_model(cfg.model, ["visual", "audio"], num_classes=10).eval()
    assert torch.equal(model.encoders["audio"].layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    batch = {
        "visual": torch.randn(2, 3, 3, 64, 64),
        "audio": torch.randn(2, 1, 64, 201),
        "present": torch.tensor([[True, True], [True, False]]),
    }
    with torch.no_grad():
        out = model(batch)
    assert out["logits"].shape == (2, 10) and set(out["unimodal"]) == {"visual", "audio"}


def test_build_model_passes_input_specs_to_the_text_encoder():
    cfg = load_config(CONFIGS / "av_digits.toml", ["model.fusion=concat"])
    with pytest.raises(ValueError, match='set model.encoders.text = "<encoder name>"'):
        build_model(cfg.model, ["visual", "text"], 23, {"text": {"vocab_size": 100, "max_len": 16}})
    cfg = load_config(CONFIGS / "av_digits.toml", ["model.fusion=concat", "model.encoders.text=text_transformer"])
    model = build_model(cfg.model, ["visual", "text"], 23, {"text": {"vocab_size": 100, "max_len": 16}})
    assert model.encoders["text"].embedding.num_embeddings == 100
    assert model.fusion.in_features == 8 * 16 + 2 * 16


def test_frozen_encoders_stay_fixed_in_eval_mode_and_lr_scale_sets_their_group():
    cfg = load_config(CONFIGS / "av_digits.toml", ["model.width=4", "model.freeze.visual=true",
                                                   "model.lr_scale.audio=0.1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, ["visual", "audio"], num_classes=3)
    groups = param_groups(model, cfg.model, lr=0.5)
    assert [(g["name"], g["lr"]) for g in groups] == [("encoders.audio", pytest.approx(0.05)), ("heads", 0.5)]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    assert not model.encoders["visual"].training and model.encoders["audio"].training
    before = {k: v.clone() for k, v in model.encoders["visual"].state_dict().items()}
    batch = {"visual": torch.randn(2, 2, 3, 32, 32), "audio": torch.randn(2, 1, 32, 40),
             "present": torch.ones(2, 2, dtype=torch.bool)}
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    loss = model(batch)["logits"].sum()
    loss.backward()
    optimizer.step()
    for key, value in model.encoders["visual"].state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, before[key]), key
    assert model.encoders["audio"].conv1.weight.grad is not None
