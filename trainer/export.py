"""Exported models: a trained late-fusion model as a folder of two files, loadable without Ray.

    <out>/model.safetensors   the LateFusion state dict (safetensors, tensors only, no pickle)
    <out>/model.json          what rebuilds it and what it expects from the shards (MODEL_JSON_VERSION)

`model.json` holds the classes, modalities and multi-label flag, the `[model]` config (encoders, width,
fusion, and `pretrained`: where the encoders started; a state-dict file there is never read back, the
weights are in model.safetensors, while an `hf_*` encoder's folder still gives its architecture), the
encoder input specs (`trainer.models.model_input_specs`), the evaluation loader's settings (`inputs`: crop
and the seed of the scenario masks) and dataset.json's `visual` / `audio` / `text` parameters (frames,
mean/std, sample rate, n_mels, hop, tokenizer, vocabulary, max_len, ...), which `python -m trainer.predict`
checks new shards against.

`load_model` rebuilds the model with `trainer.models.build_model` alone: no Ray, no config, no checkpoint
code is imported, so a model folder can be served or scored anywhere the project's package is installed.
`export_checkpoint` turns a training checkpoint (`trainer/checkpoint.py`) into such a folder; the recipe
writes `results/ume`, `results/ume_mma` and `results/chosen` (METHOD.md step 4) this way."""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from shards.writer import atomic_write, atomic_write_bytes, sha256_file
from trainer.models import ENCODERS, LateFusion, build_model, model_input_specs

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
MODEL_JSON_VERSION = 1
MODEL_KEYS = ("encoders", "width", "fusion", "pretrained")  # the [model] settings model.json records


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the one-line message names the file and the fix."""


def save_model(model: torch.nn.Module, info: Any, config: Any, out_dir: str | Path, *, name: str,
               extra: dict | None = None) -> Path:
    """Write `model.safetensors` + `model.json` for `model` (a LateFusion, or DDP around one) into `out_dir`.

    `info` is the `shards.format.DatasetInfo` of the shards it was trained on, `config` the training
    `trainer.config.Config` (its `[model]`, `data.crop_size` and `eval.seed` are recorded); `extra` is stored
    as is (stage, epoch, metrics, source checkpoint, ...). Files are written under temporary names and
    renamed, so a folder never holds half an export. Returns `out_dir`."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_write(out / WEIGHTS_FILE) as weights_tmp:
        save_file(state, str(weights_tmp), metadata={"format": "pt", "name": name})
        sha256 = sha256_file(weights_tmp)
    meta = {
        "format_version": MODEL_JSON_VERSION,
        "name": name,
        "dataset": info.dataset,
        "modalities": list(info.modalities),
        "classes": list(info.classes),
        "multilabel": bool(info.multilabel),
        "model": {key: _plain(getattr(config.model, key)) for key in MODEL_KEYS},
        "input_specs": model_input_specs(info),
        "inputs": {"crop": int(config.data.crop_size), "scenario_seed": int(config.eval.seed)},
        "shards": {m: _plain(getattr(info, m).to_json()) for m in info.modalities},
        "weights_sha256": sha256,
        "extra": _plain(extra or {}),
    }
    atomic_write_bytes(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())  # last: the folder is whole
    return out


def read_meta(model_dir: str | Path) -> dict:
    """model.json of a model folder, checked; a missing folder or file, bad JSON or another version raise
    ModelLoadError naming the file."""
    folder = Path(model_dir)
    fix = "pass a folder written by trainer.export (it holds model.json and model.safetensors), e.g. " \
          "<storage_path>/<run_name>/results/chosen"
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such model folder; {fix}")
    path = folder / META_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: {folder} is not an exported model; {fix}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); export the model again "
                             f"(trainer.export.export_checkpoint)") from None
    if not isinstance(meta, dict) or meta.get("format_version") != MODEL_JSON_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ModelLoadError(f"{path} has format_version {version!r}; this code reads version {MODEL_JSON_VERSION}: "
                             f"export the model again with this version (trainer.export.export_checkpoint)")
    missing = [k for k in ("modalities", "classes", "multilabel", "model", "input_specs") if k not in meta]
    if missing:
        raise ModelLoadError(f"{path} lacks {', '.join(missing)}; export the model again "
                             f"(trainer.export.export_checkpoint)")
    return meta


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[LateFusion, dict]:
    """(model in eval mode on `device`, model.json as a dict) from a folder written by `save_model`.

    `device` may be "auto" (CUDA when available). The encoders are built from model.json's `[model]` by
    `trainer.models.build_model` (pretrained files are not read: the weights come from model.safetensors).
    A missing or corrupt file, or weights that do not fit the model model.json describes, raise
    ModelLoadError in one line naming the file and the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(model_dir)
    meta = read_meta(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: the model folder is incomplete; export the model again "
                             f"(trainer.export.export_checkpoint)")
    recorded = meta.get("weights_sha256")
    if recorded and sha256_file(path) != recorded:
        raise ModelLoadError(f"{path} is not the file {folder / META_FILE} was written with (sha256 differs): the "
                             f"folder mixes two exports or the file was damaged; export the model again")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({str(exc).strip() or type(exc).__name__}); "
                             f"export the model again (trainer.export.export_checkpoint)") from None
    model = build_from_meta(meta, folder / META_FILE)
    _load_weights(model, state, path)
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), meta


def build_from_meta(meta: dict, source: str | Path = META_FILE) -> LateFusion:
    """The LateFusion that model.json describes, before its weights are loaded.

    A pretrained state-dict file is not read (the exported weights replace it); an encoder whose builder
    takes the `pretrained` folder itself (the `hf_*` encoders: architecture, tokenizer, preprocessor) still
    gets it, so such a model loads where that folder is at its recorded path."""
    spec = meta["model"]
    pretrained = {m: path for m, path in (spec.get("pretrained") or {}).items()
                  if path and _takes_folder(spec["encoders"].get(m))}
    cfg_model = SimpleNamespace(encoders=dict(spec["encoders"]), width=int(spec["width"]), fusion=spec["fusion"],
                                pretrained=pretrained)
    try:
        return build_model(cfg_model, list(meta["modalities"]), len(meta["classes"]), input_specs=meta["input_specs"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"{source}: cannot build the model it describes ({exc}); an encoder registered "
                             f"outside trainer.models must be imported before load_model, and an hf_* encoder "
                             f"needs its pretrained folder at the path model.json records") from None


def export_checkpoint(checkpoint_dir: str | Path, config: Any, out_dir: str | Path, name: str,
                      extra: dict | None = None) -> Path:
    """Export a training checkpoint (a `checkpoint_*` folder holding state.pt) of the model `config` builds
    for its dataset (`config.data.dataset_dir`); the stage, epoch, validation metrics and the checkpoint's
    path go to model.json's `extra`, with `extra` on top. Returns `out_dir`."""
    from shards.format import read_dataset_info
    from trainer.checkpoint import load_state, load_weights

    info = read_dataset_info(config.data.dataset_dir)
    model = build_from_meta({"model": {key: getattr(config.model, key) for key in MODEL_KEYS},
                             "modalities": info.modalities, "classes": info.classes,
                             "input_specs": model_input_specs(info)}, f"{checkpoint_dir} ([model] config)")
    state = load_state(checkpoint_dir)
    load_weights(model, state, str(checkpoint_dir))
    record = {"stage": state.get("stage"), "epoch": state.get("epoch"), "metrics": state.get("metrics", {}),
              "checkpoint": str(checkpoint_dir), **(extra or {})}
    return save_model(model, info, config, out_dir, name=name, extra=record)


def _takes_folder(encoder: str | None) -> bool:
    """Whether the registered builder of `encoder` takes a `pretrained` argument (a folder it builds from)."""
    builder = ENCODERS.get(encoder or "")
    return builder is not None and "pretrained" in inspect.signature(builder).parameters


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                    if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        detail = "; ".join(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes)) if keys)
        raise ModelLoadError(f"{path} does not fit the model {path.with_name(META_FILE)} describes ({detail}); the "
                             f"files come from different exports: export the model again")
    model.load_state_dict(state)



def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples become lists, tensors and numpy scalars numbers, paths strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
