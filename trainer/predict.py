"""Per-sample predictions of an exported model (`trainer.export`) on a split of built shards, as Parquet.

    python -m trainer.predict --model work/runs/av_digits/results/chosen --shards work/shards/av_digits \\
        --split test --missing visual --out work/predictions/test-missing-visual.parquet

One row per sample, in the split's order: `key`; `label` and `label_class` (the true label: class index
and name, lists of them for multi-label data); `pred` and `pred_class` (top-1, or for multi-label the
classes whose probability exceeds 0.5; null when the sample has no modality left); one bool column
`present_<modality>` per modality (natural missingness of the shards AND the masks asked for); one float
column `prob_<class>` per class (softmax over the fused logits, or sigmoid for multi-label). The file's
schema metadata (`ume_mma`) records the model, shards, split, masks and class order.

Masks are those of the evaluation protocol (`shards.masks`, deterministic by key and seed, so they pick
the same samples as the results table): `--missing M` drops modality M everywhere, `--scenario SPEC`
applies any scenario (`full`, `missing:<m>`, `rate:<m>=<eta>`); several are combined. Before anything
is decoded, the shards' dataset.json is checked against what model.json expects (classes, modalities and
the decoding parameters: frames, mean/std, sample rate, n_mels, hop, tokenizer, ...); a mismatch, a bad
path or an unknown split prints one `error: ...` line and exits 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shards.format import FormatError, read_dataset_info
from shards.loader import make_loader
from shards.masks import ScenarioError, parse_scenario, scenario_keep
from shards.writer import atomic_write
from trainer.export import ModelLoadError, load_model, read_meta

log = logging.getLogger("trainer.predict")
# dataset.json parameters that do not change what a model sees: container and codec choices, the stored
# frame size (evaluation resizes frames to the model's crop) and the crop default (the model's own is used)
NOT_COMPARED = {"visual": {"format", "jpeg_quality", "short_side", "crop"}, "audio": {"codec", "member"}, "text": set()}


class PredictError(ValueError):
    """Arguments, model and shards that do not go together; the message says what differs and the fix."""


def shard_mismatches(meta: dict, info) -> list[str]:
    """What differs between what model.json expects and the shards' dataset.json, one phrase per item."""
    diffs = []
    if list(info.modalities) != list(meta["modalities"]):
        diffs.append(f"modalities: model {'+'.join(meta['modalities'])}, shards {'+'.join(info.modalities)}")
    if list(info.classes) != list(meta["classes"]):
        diffs.append(f"classes: model {len(meta['classes'])} of {meta.get('dataset', '?')} "
                     f"({_first(meta['classes'])}), shards {len(info.classes)} of {info.dataset} ({_first(info.classes)})")
    if bool(info.multilabel) != bool(meta["multilabel"]):
        diffs.append(f"multilabel: model {meta['multilabel']}, shards {info.multilabel}")
    for m in meta["modalities"]:
        if m not in info.modalities:
            continue
        expected, actual = meta.get("shards", {}).get(m, {}), getattr(info, m) or {}
        for key in sorted(set(expected) - NOT_COMPARED.get(m, set())):
            if key not in actual:
                diffs.append(f"{m}.{key}: model {expected[key]!r}, absent from the shards")
            elif _normal(actual[key]) != _normal(expected[key]):
                diffs.append(f"{m}.{key}: model {expected[key]!r}, shards {actual[key]!r}")
    return diffs


def prediction_masks(args_missing: list[str], args_scenarios: list[str], modalities: list[str]) -> list[str]:
    """The scenario specs asked for (`--missing m` is `missing:m`), each checked against the modalities."""
    specs = [f"missing:{m}" for m in args_missing] + list(args_scenarios)
    for spec in specs:
        parse_scenario(spec, modalities)
    return specs or ["full"]


def predict(model_dir: str | Path, shards_dir: str | Path, out: str | Path, *, split: str = "test",
            scenarios: list[str] | None = None, seed: int | None = None, batch_size: int = 32,
            device: str = "auto", backend: str = "auto", num_workers: int = 2, progress: bool = True) -> Path:
    """Write the predictions Parquet file `out` (see the module docstring); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = read_meta(model_dir)
    info = read_dataset_info(shards_dir)
    diffs = shard_mismatches(meta, info)
    if diffs:
        raise PredictError(f"shards {shards_dir} do not match the model {model_dir}: {'; '.join(diffs)}; use shards "
                           f"built with the model's parameters (model.json 'shards') or a model trained on these")
    if split not in info.splits:
        raise PredictError(f"split {split!r} is not in {shards_dir} (it has {', '.join(info.splits)}); pass --split")
    specs = scenarios or ["full"]
    for spec in specs:
        parse_scenario(spec, info.modalities)
    seed = int(meta.get("inputs", {}).get("scenario_seed", 0) if seed is None else seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    model, meta = load_model(model_dir, device)
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    loader = make_loader(shards_dir, split, batch_size, backend=backend, device="gpu" if on_gpu else "cpu",
                         device_id=(dev.index or 0) if on_gpu else None, scenario=specs[0], seed=seed,
                         crop=meta.get("inputs", {}).get("crop"), num_workers=num_workers)
    masks = [parse_scenario(spec, info.modalities) for spec in specs[1:]]  # the first is the loader's own
    keys, labels, presents, probs = [], [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"predict {split}", unit="batch", disable=not progress):
            present = batch["present"].cpu()
            for mask in masks:
                present = present & torch.from_numpy(scenario_keep(batch["key"], info.modalities, mask, seed))
            inputs = {m: batch[m].to(dev, non_blocking=True) for m in info.modalities}
            logits = model({**inputs, "present": present.to(dev)})["logits"].float()
            probs.append((logits.sigmoid() if info.multilabel else logits.softmax(dim=1)).cpu())
            presents.append(present)
            labels.append(batch["label"].cpu())
            keys += list(batch["key"])
    prob = torch.cat(probs).numpy() if probs else np.zeros((0, info.num_classes), np.float32)
    present = torch.cat(presents).numpy() if presents else np.zeros((0, len(info.modalities)), bool)
    label = torch.cat(labels).numpy() if labels else np.zeros((0,), np.int64)
    nothing = ~present.any(axis=1)
    columns: dict[str, pa.Array] = {"key": pa.array(keys, pa.string())}
    classes = list(info.classes)
    if info.multilabel:
        truth = [np.flatnonzero(row > 0.5).tolist() for row in label]
        chosen = [None if empty else np.flatnonzero(row > 0.5).tolist() for row, empty in zip(prob, nothing)]
        columns["label"] = pa.array(truth, pa.list_(pa.int32()))
        columns["label_class"] = pa.array([[classes[i] for i in t] for t in truth], pa.list_(pa.string()))
        columns["pred"] = pa.array(chosen, pa.list_(pa.int32()))
        columns["pred_class"] = pa.array([None if c is None else [classes[i] for i in c] for c in chosen],
                                         pa.list_(pa.string()))
    else:
        top = prob.argmax(axis=1) if len(prob) else np.zeros((0,), np.int64)
        columns["label"] = pa.array(label.astype(np.int64), pa.int64())
        columns["label_class"] = pa.array([classes[i] if 0 <= i < len(classes) else None for i in label], pa.string())
        columns["pred"] = pa.array([None if e else int(t) for t, e in zip(top, nothing)], pa.int64())
        columns["pred_class"] = pa.array([None if e else classes[t] for t, e in zip(top, nothing)], pa.string())
    for i, m in enumerate(info.modalities):
        columns[f"present_{m}"] = pa.array(present[:, i], pa.bool_())
    for c, name in enumerate(classes):
        columns[f"prob_{name}"] = pa.array(prob[:, c].astype(np.float32), pa.float32())
    record = {"model": str(model_dir), "name": meta.get("name"), "shards": str(shards_dir), "dataset": info.dataset,
              "split": split, "scenarios": specs, "seed": seed, "classes": classes, "multilabel": info.multilabel,
              "modalities": list(info.modalities)}
    table = pa.table(columns).replace_schema_metadata({"ume_mma": json.dumps(record)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    if nothing.any():
        log.info("%d of %d samples have no modality left (%s); their probabilities are uniform and pred is null",
                 int(nothing.sum()), len(keys), ", ".join(specs))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description="Per-sample class probabilities of an exported model on built shards, written as Parquet "
                    "(key, label, pred, present_<modality>, prob_<class>).",
        epilog="examples:\n"
               "  python -m trainer.predict --model work/runs/av_digits/results/chosen "
               "--shards work/shards/av_digits --out work/pred/test.parquet\n"
               "  python -m trainer.predict --model work/runs/av_digits/results/ume_mma "
               "--shards work/shards/av_digits --missing visual --out work/pred/no-visual.parquet\n"
               "  python -m trainer.predict --model work/runs/av_digits/results/chosen "
               "--shards work/shards/av_digits --scenario rate:audio=0.5 --device cuda --out work/pred/rate.parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="an exported model folder (model.json + model.safetensors), e.g. "
                             "work/runs/av_digits/results/chosen")
    parser.add_argument("--shards", required=True, metavar="OUT/DATASET",
                        help="a dataset folder written by `pipeline build-shards` (holds dataset.json), e.g. "
                             "work/shards/av_digits")
    parser.add_argument("--split", default="test", help="the split to predict, e.g. test, val or train (default: test)")
    parser.add_argument("--missing", action="append", default=[], metavar="MODALITY",
                        help="treat MODALITY as absent for every sample (repeatable), e.g. --missing visual")
    parser.add_argument("--scenario", action="append", default=[], metavar="SPEC",
                        help="an evaluation scenario: full, missing:<m> or rate:<m>=<eta> (repeatable; combined "
                             "with --missing), e.g. --scenario rate:audio=0.3")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the rate:<m>=<eta> masks (default: the one the model was evaluated with, so "
                             "the same samples lose the modality as in results.md)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="samples per batch (default: 32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs; auto: cuda when a GPU is visible, else cpu (default: auto)")
    parser.add_argument("--backend", choices=("auto", "dali", "torch"), default="auto",
                        help="shard loader: DALI, the torch loader, or auto (DALI when installed) (default: auto)")
    parser.add_argument("--num-workers", type=int, default=2, metavar="N",
                        help="loader worker processes/threads (default: 2)")
    parser.add_argument("--out", required=True, metavar="FILE.parquet",
                        help="the Parquet file to write, e.g. work/pred/test.parquet (its folder is created)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1 or args.num_workers < 0:
        print("error: --batch-size must be >= 1 and --num-workers >= 0", file=sys.stderr)
        return 2
    try:
        modalities = read_meta(args.model)["modalities"]
        specs = prediction_masks(args.missing, args.scenario, modalities)
        out = predict(args.model, args.shards, args.out, split=args.split, scenarios=specs, seed=args.seed,
                      batch_size=args.batch_size, device=args.device, backend=args.backend,
                      num_workers=args.num_workers, progress=not args.quiet)
    except (ModelLoadError, FormatError, ScenarioError, PredictError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _first(classes: list[str], n: int = 3) -> str:
    return ", ".join(classes[:n]) + (", ..." if len(classes) > n else "")


def _normal(value):
    """Compare JSON values with tuples as lists and ints as floats."""
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
