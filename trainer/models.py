"""Encoders and the late-fusion model of UME-MMA (METHOD.md, steps 1-2).

Encoders are chosen by name from a registry, so a config can swap them; every encoder maps one
modality's batch tensor to features ``[B, out_dim]``. The ResNet-18 keeps torchvision's state-dict
names so torchvision checkpoints load with :func:`load_pretrained`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Fusion = Literal["sum", "concat"]

ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register an encoder builder under ``name`` so configs can select it.

    Builders are called as ``builder(width=..., **input_spec)`` (see :func:`build_model`) and return a
    module with an ``out_dim`` attribute whose forward maps the modality's batch tensor to ``[B, out_dim]``.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered (by {ENCODERS[name].__qualname__})")
        ENCODERS[name] = builder
        return builder

    return decorate


def build_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered encoder ``name`` with the builder's keyword arguments."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name](**kwargs)


# ---------------------------------------------------------------------------------------------------
# ResNet-18 (torchvision layout)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection, as torchvision's ``BasicBlock``."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 trunk without ``fc``: images ``[N, C, H, W]`` -> pooled features ``[N, 8 * width]``.

    ``width`` is the first stage's channel count (64 = torchvision's ResNet-18; the stages have
    width, 2w, 4w, 8w channels). The classifier head lives in :class:`LateFusion`.
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.width = width
        self.out_dim = 8 * width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, stride=2), BasicBlock(4 * width, 4 * width))
        self.layer4 = nn.Sequential(BasicBlock(4 * width, 8 * width, stride=2), BasicBlock(8 * width, 8 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features of a batch of images (in channels-last layout when the weights are)."""
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of ``[N, C, H, W]`` images (the spectrogram encoder's input is ``[B, 1, n_mels, n_frames]``)."""
        return self.features(x)

    def extra_repr(self) -> str:
        """Show the options that decide which checkpoints fit."""
        return f"in_channels={self.in_channels}, width={self.width}"


class FrameResNet18(ResNet18):
    """2D ResNet-18 run on every frame of ``[B, T, 3, H, W]``, features averaged over T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame features averaged over time: ``[B, T, C, H, W]`` -> ``[B, out_dim]``."""
        batch, frames = x.shape[:2]
        return self.features(x.flatten(0, 1)).view(batch, frames, -1).mean(dim=1)


@register_encoder("resnet18_frames")
def resnet18_frames(width: int = 64) -> FrameResNet18:
    """Visual encoder for frame stacks ``[B, T, 3, H, W]``."""
    return FrameResNet18(in_channels=3, width=width)


@register_encoder("resnet18_spec")
def resnet18_spec(width: int = 64) -> ResNet18:
    """Audio encoder for log-mel spectrograms ``[B, 1, n_mels, n_frames]``."""
    return ResNet18(in_channels=1, width=width)


# ---------------------------------------------------------------------------------------------------
# Text


class TextTransformer(nn.Module):
    """Small transformer over token ids ``[B, L]`` (0 = padding) -> masked mean of token states ``[B, d_model]``."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 512,
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.out_dim = d_model
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.positions = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.positions, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean of the non-padding token states; an all-padding row gives zero features."""
        length = tokens.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"text length {length} exceeds max_len {self.positions.shape[0]}; raise max_len")
        padding = tokens == 0
        # A row of padding only would make every attention weight -inf (NaN); let it attend to position 0.
        attend_padding = padding.clone()
        attend_padding[:, 0] &= ~padding.all(dim=1)
        hidden = self.embedding(tokens) + self.positions[:length]
        hidden = self.transformer(hidden, src_key_padding_mask=attend_padding)
        keep = (~padding).unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


@register_encoder("text_transformer")
def text_transformer(vocab_size: int, max_len: int = 512, width: int = 64) -> TextTransformer:
    """Text encoder; ``width`` scales it like the ResNets: d_model = 2 * width (128 at the standard 64)."""
    return TextTransformer(vocab_size=vocab_size, max_len=max_len, d_model=2 * width)


class TextBag(nn.Module):
    """fastText-style bag of words over token ids ``[B, L]`` (0 = padding): the mean of the embeddings of the
    tokens and, with ``bigram_buckets > 0``, of their hashed bigrams -> ``[B, dim]``.

    A linear model over averaged embeddings (Joulin et al., "Bag of Tricks for Efficient Text Classification",
    2016) is a strong, cheap baseline on small corpora, where a transformer from scratch has too little text
    to learn from. Padding is left out of the mean (an all-padding row gives zero features); a bigram of two
    adjacent non-padding tokens (a, b) gets the id ``vocab_size + (a * 1000003 + b) % bigram_buckets``, so word
    order enters as fastText's ``-wordNgrams 2`` does, at the cost of a second table of ``bigram_buckets`` rows.
    """

    def __init__(self, vocab_size: int, dim: int = 128, bigram_buckets: int = 0) -> None:
        super().__init__()
        if bigram_buckets < 0:
            raise ValueError(f"bigram_buckets must be >= 0, got {bigram_buckets}")
        self.vocab_size = vocab_size
        self.bigram_buckets = bigram_buckets
        self.out_dim = dim
        self.bag = nn.EmbeddingBag(vocab_size + bigram_buckets, dim, mode="mean", padding_idx=0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean embedding of the non-padding tokens (and bigrams) of each row."""
        ids = tokens.long()
        if self.bigram_buckets and ids.shape[1] > 1:
            left, right = ids[:, :-1], ids[:, 1:]
            bigrams = self.vocab_size + (left * 1000003 + right) % self.bigram_buckets
            ids = torch.cat([ids, torch.where((left != 0) & (right != 0), bigrams, 0)], dim=1)
        return self.bag(ids)

    def extra_repr(self) -> str:
        """Show the options that decide which checkpoints fit."""
        return f"vocab_size={self.vocab_size}, dim={self.out_dim}, bigram_buckets={self.bigram_buckets}"


@register_encoder("text_bow")
def text_bow(vocab_size: int, width: int = 64) -> TextBag:
    """Bag-of-words text encoder: dim = 2 * width (128 at the standard 64) and ``vocab_size`` hashed bigram
    buckets (twice the unigram table: cheap, and fastText's bigrams are worth a few points on topic labels)."""
    return TextBag(vocab_size=vocab_size, dim=2 * width, bigram_buckets=vocab_size)


# ---------------------------------------------------------------------------------------------------
# Pretrained Hugging Face models (trainer/hf_encoders.py; transformers is imported only when one is built)


@register_encoder("hf_text")
def hf_text(pretrained: str = "", params: Mapping[str, Any] | None = None, max_len: int = 0, width: int = 64) -> nn.Module:
    """A local transformers text model (BERT-style) over the shards' token ids; ``width`` is not used."""
    from trainer.hf_encoders import build_text

    return build_text(pretrained, params, max_len)


@register_encoder("hf_vision")
def hf_vision(pretrained: str = "", params: Mapping[str, Any] | None = None, width: int = 64) -> nn.Module:
    """A local transformers image model (ViT, CLIP vision, ...) over frame stacks; ``width`` is not used."""
    from trainer.hf_encoders import build_vision

    return build_vision(pretrained, params)


@register_encoder("hf_audio")
def hf_audio(pretrained: str = "", params: Mapping[str, Any] | None = None, width: int = 64) -> nn.Module:
    """A local Audio Spectrogram Transformer over the shards' log-mel; ``width`` is not used."""
    from trainer.hf_encoders import build_audio

    return build_audio(pretrained, params)


# ---------------------------------------------------------------------------------------------------
# Pretrained weights


def load_pretrained(encoder: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``encoder``, accepting torchvision ResNet checkpoints.

    A full-model torchvision state dict works: ``fc.*`` is dropped, and a 3-channel ``conv1`` is averaged
    over its input channels when the encoder takes 1 channel (spectrograms). Missing, unexpected or
    mis-shaped keys raise ``ValueError`` naming the file and the keys.
    """
    state = torch.load(path, weights_only=True, map_location="cpu")
    described = f"{type(encoder).__name__}({_describe(encoder)})"
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (name -> tensor); expected weights for {described}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = encoder.state_dict()
    conv1 = state.get("conv1.weight")
    if conv1 is not None and "conv1.weight" in expected:
        if conv1.shape[1] == 3 and expected["conv1.weight"].shape[1] == 1:
            state["conv1.weight"] = conv1.mean(dim=1, keepdim=True)
    # Checkpoints saved before PyTorch 0.4.1 (torchvision's own) have no BatchNorm batch counters.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the encoder"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' and more' if len(keys) > 5 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(
            f"{path}: does not fit the encoder {described}; "
            + "; ".join(problems)
            + ". Check the encoder name and model.width against the checkpoint."
        )
    encoder.load_state_dict(state)


def _describe(encoder: nn.Module) -> str:
    """Short description of an encoder for error messages."""
    return encoder.extra_repr() or f"out_dim={getattr(encoder, 'out_dim', '?')}"


# ---------------------------------------------------------------------------------------------------
# Late fusion


class LateFusion(nn.Module):
    """One encoder and one linear head per modality; fused logits over the present modalities.

    ``fusion="sum"``: logits = sum over present m of head_m(f_m(x_m)); at UME initialisation this is
    exactly the uni-modal ensemble. ``fusion="concat"``: one linear layer over the concatenated features
    (absent modality = zero features) plus one bias row per modality that counts only when the modality is
    present, so after :meth:`init_concat_from_heads` it is the same function as sum fusion.

    An encoder runs only on the samples whose modality is present (none at all when the whole batch lacks
    it): absent inputs never enter BatchNorm statistics, and the output does not depend on them. Under DDP
    use ``find_unused_parameters=True``, since a skipped encoder (or, with concat, the heads) gets no gradient.

    State-dict keys: ``encoders.<m>.*``, ``heads.<m>.{weight,bias}``; with concat also
    ``fusion.weight`` and ``fusion_bias``.
    """

    def __init__(
        self,
        modalities: list[str],
        encoders: Mapping[str, nn.Module],
        num_classes: int,
        fusion: Fusion = "sum",
        frozen: Iterable[str] = (),
    ) -> None:
        super().__init__()
        if fusion not in ("sum", "concat"):
            raise ValueError(f"unknown fusion {fusion!r}; use 'sum' or 'concat'")
        if sorted(encoders) != sorted(modalities):
            raise ValueError(f"encoders for {sorted(encoders)} do not match the modalities {modalities}")
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.fusion_kind = fusion
        self.encoders = nn.ModuleDict({m: encoders[m] for m in modalities})
        self.heads = nn.ModuleDict({m: nn.Linear(encoders[m].out_dim, num_classes) for m in modalities})
        if fusion == "concat":
            self.fusion = nn.Linear(sum(encoders[m].out_dim for m in modalities), num_classes, bias=False)
            self.fusion_bias = nn.Parameter(torch.zeros(len(modalities), num_classes))
        self.frozen = sorted(set(frozen))
        unknown = [m for m in self.frozen if m not in self.encoders]
        if unknown:
            raise ValueError(f"cannot freeze {unknown}: not modalities of this model ({', '.join(modalities)})")
        for m in self.frozen:
            self.encoders[m].requires_grad_(False)
            self.encoders[m].eval()

    def train(self, mode: bool = True) -> LateFusion:
        """Train mode, except for frozen encoders: they stay in eval mode (no dropout, fixed BatchNorm
        statistics), so a frozen encoder computes the same features in every epoch."""
        super().train(mode)
        for m in self.frozen:
            self.encoders[m].eval()
        return self

    def encode(self, modality: str, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_dim]`` of one modality, computed on its present samples only; zeros elsewhere."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and modality not in self.frozen):
            return self._encode(modality, x, present)

    def _encode(self, modality: str, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        encoder = self.encoders[modality]
        if bool(present.all()):
            return encoder(x)
        if not bool(present.any()):
            head = self.heads[modality]
            return torch.zeros(present.shape[0], encoder.out_dim, device=head.weight.device, dtype=head.weight.dtype)
        index = present.nonzero().squeeze(1)
        features = encoder(x.index_select(0, index))
        return features.new_zeros(present.shape[0], features.shape[1]).index_copy(0, index, features)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Fused and per-modality logits for a loader batch (``batch[m]`` tensors, ``batch["present"]`` ``[B, M]``).

        Returns ``{"logits": [B, C], "unimodal": {m: [B, C]}}``; a modality's unimodal logits are 0 on the
        rows where it is absent, so with sum fusion ``logits`` is exactly the sum of the unimodal logits.
        """
        present = batch["present"]
        features = {m: self.encode(m, batch[m], present[:, i]) for i, m in enumerate(self.modalities)}
        return self.fuse(features, present)

    def fuse(self, features: Mapping[str, torch.Tensor], present: torch.Tensor) -> dict[str, Any]:
        """Heads and fusion over per-modality features; rows where a modality is absent count as zeros.

        Evaluation caches the features of one pass and calls this per scenario with other `present` masks."""
        features = {m: torch.where(present[:, i, None], features[m], 0.0) for i, m in enumerate(self.modalities)}
        unimodal: dict[str, torch.Tensor] = {}
        for i, m in enumerate(self.modalities):
            unimodal[m] = torch.where(present[:, i, None], self.heads[m](features[m]), 0.0)
        if self.fusion_kind == "sum":
            logits = torch.stack([unimodal[m] for m in self.modalities]).sum(dim=0)
        else:
            concatenated = torch.cat([features[m] for m in self.modalities], dim=1)
            logits = self.fusion(concatenated) + present.to(self.fusion_bias.dtype) @ self.fusion_bias
        return {"logits": logits, "unimodal": unimodal}

    @torch.no_grad()
    def init_concat_from_heads(self) -> None:
        """Copy the heads block-wise into the concat layer, so concat fusion equals sum fusion (METHOD.md step 2)."""
        if self.fusion_kind != "concat":
            raise ValueError("init_concat_from_heads needs fusion='concat'")
        self.fusion.weight.copy_(torch.cat([self.heads[m].weight for m in self.modalities], dim=1))
        self.fusion_bias.copy_(torch.stack([self.heads[m].bias for m in self.modalities]))


def build_model(
    cfg_model: Any,
    modalities: list[str],
    num_classes: int,
    input_specs: Mapping[str, Mapping[str, Any]] | None = None,
) -> LateFusion:
    """Build the late-fusion model named by a ``[model]`` config, loading pretrained encoder weights.

    ``cfg_model`` is a :class:`trainer.config.ModelConfig`; ``input_specs[m]`` holds builder arguments read
    from ``dataset.json`` (:func:`model_input_specs`: for text ``vocab_size``, ``max_len``; for every modality
    ``params``, its dataset.json section). Each encoder is built as ``build_encoder(cfg_model.encoders[m],
    width=cfg_model.width, **spec)`` with the part of ``input_specs[m]`` its builder declares. A builder that
    takes ``pretrained`` (the ``hf_*`` encoders) gets ``model.pretrained.<m>`` (a folder) itself; for the
    others it is a state-dict file loaded with :func:`load_pretrained`. ``model.freeze.<m> = true`` freezes
    that encoder (see :class:`LateFusion`).
    """
    specs = input_specs or {}
    encoders: dict[str, nn.Module] = {}
    for m in modalities:
        if m not in cfg_model.encoders:
            raise ValueError(f'no encoder configured for modality {m!r}; set model.encoders.{m} = "<encoder name>"')
        name = cfg_model.encoders[m]
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}")
        accepted = _accepted_arguments(ENCODERS[name])
        kwargs = {k: v for k, v in specs.get(m, {}).items() if accepted is None or k in accepted}
        pretrained = cfg_model.pretrained.get(m)
        takes_folder = "pretrained" in (accepted or ())
        if takes_folder:
            kwargs["pretrained"] = pretrained or ""
        encoders[m] = build_encoder(name, width=cfg_model.width, **kwargs)
        if pretrained and not takes_folder:
            load_pretrained(encoders[m], pretrained)
    frozen = [m for m in modalities if getattr(cfg_model, "freeze", {}).get(m)]
    return LateFusion(modalities, encoders, num_classes, fusion=cfg_model.fusion, frozen=frozen)


def _accepted_arguments(builder: Callable[..., nn.Module]) -> set[str] | None:
    """The keyword arguments a builder declares; None when it takes ``**kwargs`` (then it gets them all)."""
    parameters = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def param_groups(model: nn.Module, model_config: Any, lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the ``[model]`` config: one per trainable encoder at
    ``lr * model.lr_scale.<m>`` (default 1), and one for the heads and the fusion layer at ``lr``.

    Frozen encoders (``model.freeze.<m> = true``; their parameters have ``requires_grad`` False since
    :func:`build_model`) are left out, as is any other parameter that does not require a gradient. Works on
    the DDP-wrapped model too. Each group has ``name`` (``encoders.<m>`` or ``heads``), ``params`` and ``lr``.
    """
    inner = getattr(model, "module", model)
    scales = getattr(model_config, "lr_scale", {}) or {}
    frozen = {m for m, on in (getattr(model_config, "freeze", {}) or {}).items() if on}
    groups: list[dict[str, Any]] = []
    in_encoders: set[int] = set()
    for m, encoder in inner.encoders.items():
        params = list(encoder.parameters())
        in_encoders.update(id(p) for p in params)
        if m in frozen:
            encoder.requires_grad_(False)
            continue
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append({"name": f"encoders.{m}", "params": trainable, "lr": lr * float(scales.get(m, 1.0))})
    rest = [p for p in inner.parameters() if id(p) not in in_encoders and p.requires_grad]
    if rest:
        groups.append({"name": "heads", "params": rest, "lr": lr})
    return groups


def model_input_specs(info) -> dict[str, dict]:
    """Encoder builder arguments read from dataset.json (`trainer.models.build_model(input_specs=...)`):
    for every modality ``params``, its dataset.json section with the dataset's name added (the ``hf_*``
    encoders check the tokenizer, mel settings and normalisation against it); for text also the vocabulary
    size and sequence length. :func:`build_model` hands each builder only the arguments it declares."""
    specs: dict[str, dict] = {}
    for m in info.modalities:
        specs[m] = {"params": dict(getattr(info, m).to_json(), dataset=info.dataset)}
    if "text" in info.modalities:
        specs["text"].update(vocab_size=info.text.vocab_size, max_len=info.text.max_len)
    return specs


def model_for_dataset(model_config, info) -> LateFusion:
    """The late-fusion model of `[model]` for the dataset whose dataset.json `info` describes."""
    return build_model(model_config, info.modalities, info.num_classes, input_specs=model_input_specs(info))
