"""Pretrained Hugging Face `transformers` encoders from a local folder: `hf_text`, `hf_vision`, `hf_audio`.

`model.pretrained.<modality>` names a folder holding `config.json` and the weights as `save_pretrained` writes
them, or a Hugging Face cache snapshot (`.../models--org--name/snapshots/<hash>`, or the `models--org--name`
folder itself: its `refs/main` snapshot). Nothing is downloaded: models load with `local_files_only=True` and
`HF_HUB_OFFLINE=1` is set in the process that builds them (which also gets transformers' progress bars
turned off and its logging set to errors: the weights a folder lacks are logged here, in one line).
`transformers` is imported only here, and only when such an encoder is built, so the rest of the project runs without it.

The branch's feature is the model's `pooler_output`, or, where the model has no pooler (or the folder's
weights have none: a pooler `from_pretrained` would initialise at random is removed), the mean of its last
hidden state over the tokens that are not padding. LateFusion puts the method's linear head on top.

What each encoder converts, so that the loaders stay as they are (DESIGN.md loader contract):
- text: the shards must be tokenised with the model's own tokenizer (`pipeline build-shards --tokenizer DIR`);
  the `sha256` of `tokenizer.json` recorded in dataset.json must equal that of the folder's `tokenizer.json`
  (a folder without one is checked on the vocabulary size only). Ids are zero-padded at the end
  (pipeline/text.py), so the attention mask keeps every position up to the last non-zero id: a real id 0 at
  the start (RoBERTa's `<s>`) stays, and padding positions get the model's own `pad_token_id`.
- vision: the loaders give frames `[B, T, 3, H, W]` normalised with dataset.json's mean/std at the crop size.
  The encoder undoes that normalisation, applies the model's (`image_mean`, `image_std`, `rescale_factor` of
  `preprocessor_config.json`), resizes with `F.interpolate` (bilinear, antialiased) to the model's image size
  (its `crop_size`, else `size`, else `config.image_size`) and averages the features over the T frames.
- audio: models that take log-mel frames as `input_values [B, frames, mel bins]` (Audio Spectrogram
  Transformer, `ASTModel`). dataset.json's `n_mels` must equal the model's `num_mel_bins`; the frames are cut
  or padded to `max_length` as AST's feature extractor does (one warning says so). The loaders' log-mel,
  (dB + 40) / 40, is turned back into natural-log mel energies and normalised with the folder's `mean` and
  `std` ((x - mean) / (2 std), AST's). The loaders' filter bank is Slaney's, area-normalised, not Kaldi's, so
  the features are close to, not equal to, those the model was trained on; fine-tuning (not freezing) adapts.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shards.writer import sha256_file

log = logging.getLogger(__name__)

INPUTS = {"text": "input_ids", "vision": "pixel_values", "audio": "input_values"}
MODALITY = {"text": "text", "vision": "visual", "audio": "audio"}
EXAMPLES = {"text": "a BERT-style text encoder (BertModel, RobertaModel, ...)",
            "vision": "an image encoder (ViTModel, CLIPVisionModel, ...)",
            "audio": "an Audio Spectrogram Transformer (ASTModel)"}


def _transformers():
    """The `transformers` module, offline; a ValueError naming the install when it is missing."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError:
        raise ValueError("the hf_text/hf_vision/hf_audio encoders need the transformers package: "
                         "pip install 'transformers>=5,<6' safetensors") from None
    # its progress bars and load reports would break one-line errors; load_model logs what matters itself
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def resolve_folder(path: str, kind: str) -> Path:
    """The model folder named by `model.pretrained.<modality>`: a save_pretrained folder or a cache snapshot."""
    key = f"model.pretrained.{MODALITY[kind]}"
    fix = ("a folder written by save_pretrained (config.json + model.safetensors) or a Hugging Face cache "
           "snapshot (.../models--org--name/snapshots/<hash>)")
    if not path:
        raise ValueError(f"hf_{kind} needs a local model folder: set {key} = \"<folder>\", {fix}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{key} = {path}: no such folder; point it at {fix}")
    if not (folder / "config.json").is_file() and (folder / "snapshots").is_dir():
        ref = folder / "refs" / "main"
        snapshots = sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir())
        if ref.is_file() and (folder / "snapshots" / ref.read_text().strip()).is_dir():
            folder = folder / "snapshots" / ref.read_text().strip()
        elif len(snapshots) == 1:
            folder = snapshots[0]
    if not (folder / "config.json").is_file():
        raise ValueError(f"{key} = {path}: no config.json in {folder}; point it at {fix}")
    return folder


def load_model(folder: Path, kind: str) -> tuple[nn.Module, Any]:
    """The folder's model for `kind` (a composite model such as CLIP gives its tower) and its config, with a
    pooler the weights do not hold removed; every failure is a ValueError of one line."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        tower = getattr(config, f"{kind}_config", None)
        model_class = transformers.MODEL_MAPPING[type(tower)] if tower is not None else None
        loader = model_class or transformers.AutoModel
        model, info = loader.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                             output_loading_info=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, RuntimeError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{folder}: cannot load a transformers model for hf_{kind} ({type(exc).__name__}: {first}); "
                         f"check that it holds config.json and the weights of {EXAMPLES[kind]}") from None
    missing = list(info.get("missing_keys", []))
    if getattr(model, "pooler", None) is not None and any(k.split(".")[0] == "pooler" or ".pooler." in f".{k}"
                                                          for k in missing):
        model.pooler = None  # not in the weights: a random pooler would only add noise; use the mean instead
        log.info("%s: the weights hold no pooler; hf_%s uses the mean of the last hidden state", folder, kind)
    others = [k for k in missing if "pooler" not in k]
    if others:
        log.warning("%s: %d weights not in the folder were initialised at random (%s%s)", folder, len(others),
                    ", ".join(others[:3]), " ..." if len(others) > 3 else "")
    return model, (tower if tower is not None else config)


def check_takes(model: nn.Module, folder: Path, kind: str) -> None:
    """Refuse a model whose forward does not take this modality's input."""
    if INPUTS[kind] not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{folder}: {type(model).__name__} (model_type {model.config.model_type!r}) takes no "
                         f"{INPUTS[kind]}, so it is no hf_{kind} encoder; use {EXAMPLES[kind]}")


def pooled_features(out: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`pooler_output` flattened to [B, D], else the (masked) mean of `last_hidden_state` [B, N, D]."""
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled.flatten(1)
    hidden = getattr(out, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = None if not isinstance(hidden, torch.Tensor) else tuple(hidden.shape)
        raise ValueError(f"the model's output has no pooler_output and no last_hidden_state [B, N, D] (got {shape})")
    if mask is None:
        return hidden.mean(dim=1)
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class HFEncoder(nn.Module):
    """A transformers model as a branch encoder: ``model`` holds its weights (state-dict keys ``model.*``)."""

    kind = ""

    def __init__(self, model: nn.Module, folder: Path) -> None:
        super().__init__()
        self.model = model
        self.folder = str(folder)
        self.out_dim = 0

    def probe(self, example: torch.Tensor) -> None:
        """Run one example through the model: sets ``out_dim`` and turns an unusable output into a ValueError."""
        try:
            with torch.no_grad():
                features = self(example)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{self.folder}: {type(self.model).__name__} gives no usable feature for hf_{self.kind} "
                             f"({exc}); use {EXAMPLES[self.kind]}") from None
        self.out_dim = int(features.shape[1])

    def extra_repr(self) -> str:
        """Show the folder and the feature size."""
        return f"folder={self.folder!r}, out_dim={self.out_dim}"


class HFTextEncoder(HFEncoder):
    """Token ids ``[B, L]`` (zero-padded at the end) -> pooled text features ``[B, out_dim]``."""

    kind = "text"

    def __init__(self, model: nn.Module, folder: Path, pad_id: int = 0) -> None:
        super().__init__(model, folder)
        self.pad_id = pad_id
        model_pad = getattr(model.config, "pad_token_id", None)
        self.model_pad_id = int(model_pad) if model_pad is not None else 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features of the tokens up to each row's last non-padding id; an all-padding row gives zeros."""
        tokens = tokens.long()
        real = tokens != self.pad_id
        keep = real.flip(1).cumsum(1).flip(1) > 0  # padding is trailing: every position before a real id stays
        empty = ~keep.any(dim=1)
        keep[:, 0] |= empty  # an empty row attends to position 0 (no all-masked softmax), then gets zeros
        ids = torch.where(keep, tokens, self.model_pad_id)
        out = self.model(input_ids=ids, attention_mask=keep.long())
        features = pooled_features(out, keep)
        return torch.where(empty[:, None], 0.0, features)


class HFVisionEncoder(HFEncoder):
    """Frames ``[B, T, 3, H, W]`` normalised as dataset.json says -> features averaged over T ``[B, out_dim]``.

    Per channel, x_model = (x_01 * 255 * rescale - mean_model) / std_model with x_01 = x * std_data + mean_data,
    one affine map (buffers ``scale``, ``shift``, not saved), then a resize to ``size`` (height, width)."""

    kind = "vision"

    def __init__(self, model: nn.Module, folder: Path, size: tuple[int, int], scale: torch.Tensor,
                 shift: torch.Tensor) -> None:
        super().__init__(model, folder)
        self.size = size
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame features of the model, averaged over time."""
        batch, steps = frames.shape[:2]
        x = frames.flatten(0, 1).float() * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.size:
            shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=shrink)
        features = pooled_features(self.model(pixel_values=x))
        return features.view(batch, steps, -1).mean(dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, size={self.size}"


class HFAudioEncoder(HFEncoder):
    """The loaders' log-mel ``[B, 1, n_mels, n_frames]`` -> AST input ``[B, max_length, n_mels]`` -> features."""

    kind = "audio"

    def __init__(self, model: nn.Module, folder: Path, max_length: int, mean: float, std: float) -> None:
        super().__init__(model, folder)
        self.max_length = max_length
        self.mean = mean
        self.std = std

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """Natural-log mel energies, cut or padded (with 0, as AST's extractor) to max_length, normalised."""
        from shards.features import DB_OFFSET, DB_SCALE

        x = logmel.float().squeeze(1).transpose(1, 2)  # [B, frames, mels]
        x = (x * DB_SCALE - DB_OFFSET) * (math.log(10.0) / 10.0)  # dB -> ln(energy)
        frames = x.shape[1]
        if frames > self.max_length:
            x = x[:, :self.max_length]
        elif frames < self.max_length:
            x = F.pad(x, (0, 0, 0, self.max_length - frames))
        x = (x - self.mean) / (2.0 * self.std)
        return pooled_features(self.model(input_values=x))


def build_text(pretrained: str, params: Mapping[str, Any] | None, max_len: int) -> HFTextEncoder:
    """`hf_text`: check the shards' tokenizer against the folder, then wrap the model."""
    folder = resolve_folder(pretrained, "text")
    model, config = load_model(folder, "text")
    check_takes(model, folder, "text")
    if params is not None:
        check_tokenizer(folder, config, params)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_len > positions:
        dataset = (params or {}).get("dataset", "<dataset>")
        raise ValueError(f"hf_text: the shards hold {max_len} token ids per text, {folder} takes at most {positions} "
                         f"positions; rebuild them with pipeline build-shards {dataset} ... --max-len {positions} "
                         f"--tokenizer {folder}")
    encoder = HFTextEncoder(model, folder, pad_id=int((params or {}).get("pad_id", 0)))
    encoder.probe(torch.tensor([[3, 4, 5, 0]]).clamp(max=int(config.vocab_size) - 1))
    return encoder


def check_tokenizer(folder: Path, config: Any, params: Mapping[str, Any]) -> None:
    """The tokenizer dataset.json records (`text`) must be the folder's; else one line with the rebuild."""
    dataset = params.get("dataset", "<dataset>")
    rebuild = f"rebuild the shards with: pipeline build-shards {dataset} --src RAW --out OUT --tokenizer {folder}"
    if params.get("tokenizer") != "huggingface":
        raise ValueError(f"hf_text: the {dataset} shards were tokenised with the built-in {params.get('tokenizer')!r} "
                         f"tokenizer, not {folder}'s; {rebuild}")
    file = folder / "tokenizer.json"
    if file.is_file():
        digest = sha256_file(file)
        if digest != params.get("sha256"):
            raise ValueError(f"hf_text: the {dataset} shards were tokenised with another tokenizer.json (from "
                             f"{params.get('source')!r}, sha256 {str(params.get('sha256'))[:12]}) than {file} "
                             f"(sha256 {digest[:12]}); {rebuild}")
    else:
        log.warning("%s has no tokenizer.json: hf_text checks only that the shards' vocabulary (%s) fits the model",
                    folder, params.get("vocab_size"))
    vocab = int(params.get("vocab_size", 0))
    if vocab > int(config.vocab_size):
        raise ValueError(f"hf_text: the {dataset} shards' tokenizer has {vocab} tokens, {folder} embeds "
                         f"{config.vocab_size}; {rebuild}")


def build_vision(pretrained: str, params: Mapping[str, Any] | None) -> HFVisionEncoder:
    """`hf_vision`: the folder's preprocessor_config.json decides size, mean and std."""
    folder = resolve_folder(pretrained, "vision")
    model, config = load_model(folder, "vision")
    check_takes(model, folder, "vision")
    if params is None or "mean" not in params:
        raise ValueError("hf_vision needs the dataset's visual mean and std (dataset.json `visual`); build the "
                         "model with trainer.models.model_for_dataset")
    pre = read_preprocessor(folder, "vision")
    size = image_size(pre, config, folder)
    rescale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
    normalize = pre.get("do_normalize", True)
    model_mean = torch.tensor(pre.get("image_mean", [0.0] * 3) if normalize else [0.0] * 3, dtype=torch.float32)
    model_std = torch.tensor(pre.get("image_std", [1.0] * 3) if normalize else [1.0] * 3, dtype=torch.float32)
    data_mean = torch.tensor(params["mean"], dtype=torch.float32)
    data_std = torch.tensor(params["std"], dtype=torch.float32)
    pixel = 255.0 * rescale  # model input per unit of x_01
    scale = data_std * pixel / model_std
    shift = (data_mean * pixel - model_mean) / model_std
    encoder = HFVisionEncoder(model, folder, size, scale, shift)
    encoder.probe(torch.zeros(1, 1, 3, *size))
    return encoder


def read_preprocessor(folder: Path, kind: str) -> dict:
    """The folder's preprocessor_config.json as a dict; a ValueError naming the fix when it is missing."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        saver = "AutoImageProcessor" if kind == "vision" else "AutoFeatureExtractor"
        raise ValueError(f"hf_{kind}: {folder} has no preprocessor_config.json (the model's input size and "
                         f"normalisation); save it there with {saver}.from_pretrained(...).save_pretrained({folder})")
    return json.loads(file.read_text())


def image_size(pre: Mapping[str, Any], config: Any, folder: Path) -> tuple[int, int]:
    """(height, width) the model takes: the preprocessor's crop_size, else its size, else config.image_size."""
    for key in ("crop_size", "size"):
        if key == "crop_size" and not pre.get("do_center_crop", "crop_size" in pre):
            continue
        value = pre.get(key)
        if isinstance(value, int):
            return value, value
        if isinstance(value, Mapping):
            if "height" in value and "width" in value:
                return int(value["height"]), int(value["width"])
            if "shortest_edge" in value and key == "size" and not pre.get("crop_size"):
                return int(value["shortest_edge"]), int(value["shortest_edge"])
    side = getattr(config, "image_size", None)
    if isinstance(side, int):
        return side, side
    raise ValueError(f"hf_vision: neither {folder}/preprocessor_config.json nor config.json says the image size")


def build_audio(pretrained: str, params: Mapping[str, Any] | None) -> HFAudioEncoder:
    """`hf_audio`: an AST-style model whose mel bins match the shards' log-mel."""
    from shards.features import STORED_AUDIO_KINDS, AudioParams
    from shards.format import AudioInfo

    folder = resolve_folder(pretrained, "audio")
    model, config = load_model(folder, "audio")
    check_takes(model, folder, "audio")
    n_bins, max_length = getattr(config, "num_mel_bins", None), getattr(config, "max_length", None)
    if n_bins is None or max_length is None:
        raise ValueError(f"{folder}: {type(model).__name__} has no num_mel_bins/max_length in config.json, so it "
                         f"takes no log-mel frames; use {EXAMPLES['audio']}")
    if params is None or not params:
        raise ValueError("hf_audio needs the dataset's audio parameters (dataset.json `audio`); build the model "
                         "with trainer.models.model_for_dataset")
    dataset = params.get("dataset", "<dataset>")
    kind = params.get("kind", "waveform")
    if kind == "spectrogram_array":
        raise ValueError(f"hf_audio: the {dataset} shards store spectrogram arrays (audio.kind = {kind}), not the "
                         f"log-mel an AST takes; use the resnet18_spec encoder for them")
    if kind in STORED_AUDIO_KINDS:
        n_mels, frames = (int(v) for v in params["shape"])
    else:
        audio = AudioParams.from_info(AudioInfo(**{k: v for k, v in params.items() if k != "dataset"}))
        n_mels, frames = audio.n_mels, audio.n_frames
    shift_ms = 1000.0 * params["hop_length"] / params["sample_rate"]
    if n_mels != n_bins:
        raise ValueError(f"hf_audio: {folder} takes num_mel_bins={n_bins}, the {dataset} shards have n_mels={n_mels}; "
                         f"rebuild them with pipeline build-shards {dataset} ... --n-mels {n_bins}")
    if frames != max_length or not math.isclose(shift_ms, 10.0):
        log.warning("hf_audio: the %s shards have %d log-mel frames %.3g ms apart, %s takes max_length=%d frames "
                    "10 ms apart (AST); frames are %s to %d", dataset, frames, shift_ms, folder, max_length,
                    "cut" if frames > max_length else "zero-padded" if frames < max_length else "kept", max_length)
    pre = read_preprocessor(folder, "audio") if (folder / "preprocessor_config.json").is_file() else {}
    normalize = pre.get("do_normalize", bool(pre))
    mean = float(pre.get("mean", 0.0)) if normalize else 0.0
    std = float(pre.get("std", 0.5)) if normalize else 0.5  # (x - 0) / (2 * 0.5): unchanged
    encoder = HFAudioEncoder(model, folder, int(max_length), mean, std)
    encoder.probe(torch.zeros(1, 1, n_mels, frames))
    return encoder
