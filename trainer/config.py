"""Training configuration: typed dataclasses filled from a TOML file plus ``section.key=value`` overrides.

One TOML file per dataset lives in ``trainer/configs/``. Relative paths in a config (``data.dataset_dir``,
``model.pretrained.*``, ``ray.storage_path``) are relative to the current working directory of the
process that loads it; stages resolve them to absolute paths before handing them to Ray workers.

``ray.use_gpu``, ``ray.cpus_per_worker`` and ``data.num_workers`` also accept ``"auto"``: the launcher
replaces it with a value that fits the Ray cluster it runs on (``trainer.resources.resolve_auto``) before
any stage starts, so the stages and the Ray workers only ever see concrete values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shards.format import MODALITIES

SCENARIO_KINDS = ("full", "missing", "rate")
AUTO = "auto"
RESUME_MODES = ("same", "extend")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file, the key and the fix."""


@dataclass
class DataConfig:
    """``[data]``: where the shards are and how the loader batches them."""

    dataset_dir: str  # OUT/<dataset> of `pipeline build-shards` (holds dataset.json)
    batch_size: int = 64  # per Ray worker
    backend: str = "auto"  # "dali" | "torch" | "auto" (DALI when importable, else the torch loader)
    num_workers: int | Literal["auto"] = 4  # loader worker processes/threads per Ray worker; "auto": one per CPU
    crop_size: int = 224  # square frame crop (random-resized in training, center in eval)
    min_crop_area: float = 0.35  # training random-resized crop keeps this..100% of the frame area
    flip: bool = True  # random horizontal flips in training (off for digits and text-like images)


@dataclass
class ModelConfig:
    """``[model]``: encoders per modality, their width, pretrained weights, freezing, lr scales and the fusion."""

    fusion: str = "sum"  # "sum" | "concat"
    width: int = 64  # encoder base width: ResNet stages width..8*width; text d_model = 2*width
    # modality -> encoder name: resnet18_frames, resnet18_spec, text_transformer, text_bow, hf_vision, hf_audio, hf_text
    encoders: dict[str, str] = field(
        default_factory=lambda: {"visual": "resnet18_frames", "audio": "resnet18_spec", "text": "text_transformer"}
    )
    # modality -> local state-dict file, or for the hf_* encoders a local transformers model folder
    pretrained: dict[str, str] = field(default_factory=dict)
    freeze: dict[str, bool] = field(default_factory=dict)  # modality -> true: that encoder is not trained (unimodal, mma)
    lr_scale: dict[str, float] = field(default_factory=dict)  # modality -> the encoder's lr multiplier (default 1)


@dataclass
class TrainConfig:
    """``[train]``: what every stage shares (optimizer, seed, precision) and the schedule of the stages
    trained from scratch (``unimodal``, ``joint``, ``joint_dropout``) where their own tables leave it out."""

    epochs: int | Literal["auto"] = 100  # "auto": early stopping on validation, up to max_epochs (trainer/recipe.py)
    max_epochs: int = 50  # the most epochs an "auto" stage trains
    patience: int = 3  # "auto": stop after this many epochs without a better validation metric
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    lr_milestones: list[int] = field(default_factory=lambda: [70])  # epochs where lr *= lr_gamma
    lr_gamma: float = 0.1
    seed: int = 0
    amp: str = "none"  # "none" | "bf16": forward and loss under torch.autocast in bfloat16 (GPU training)
    # also checkpoint every this many steps inside an epoch (0: at the end of each epoch only); a run resumed
    # from one ends exactly as an uninterrupted run would (same worker count)
    checkpoint_every_steps: int = 0
    channels_last: bool = False  # convolutions in channels-last memory format (often faster with bf16 on GPUs)
    # torch.compile each encoder: the first steps pay the compilation (minutes on a CPU) and a new batch size
    # (a batch where some samples lack the modality) one recompilation; for long GPU runs
    compile: bool = False


@dataclass
class StageConfig:
    """``[unimodal]``, ``[joint]``: one stage's schedule; a key left out takes ``[train]``'s value."""

    epochs: int | Literal["auto"] | None = None
    max_epochs: int | None = None
    patience: int | None = None
    lr: float | None = None
    lr_milestones: list[int] | None = None
    lr_gamma: float | None = None


@dataclass
class JointDropoutConfig(StageConfig):
    """``[joint_dropout]``: the joint baseline with per-sample, per-modality dropout of probability ``rate``."""

    rate: float = 0.5


@dataclass
class MMAConfig(StageConfig):
    """``[mma]``: missing-modality adaptation, fine-tuning from the UME checkpoint (METHOD.md step 3).

    Its schedule defaults are its own (a short fine-tune without lr steps), not ``[train]``'s; the
    optimizer, momentum and weight decay are ``[train]``'s.
    """

    epochs: int | Literal["auto"] | None = 20
    lr: float | None = 1e-3
    lr_milestones: list[int] | None = field(default_factory=list)
    scheme: str = "drop_one"  # "drop_one" | "independent"
    # drop_one: probability of keeping all ("full") or dropping exactly that modality; sums to 1; {} = full
    # and each of the dataset's modalities with equal probability (METHOD.md's default, any modality set).
    # independent: per-modality drop probability (never all modalities dropped).
    drop_probs: dict[str, float] = field(default_factory=lambda: {"full": 1 / 3, "visual": 1 / 3, "audio": 1 / 3})


@dataclass
class RayConfig:
    """``[ray]``: Ray Train scaling, storage and fault tolerance."""

    # DDP workers (ScalingConfig.num_workers); [min, max]: elastic, Ray Train starts with what the cluster has
    # (at least min) and resizes the group as workers come and go (needs max_failures > 0 to survive a loss)
    num_workers: int | list[int] = 1
    use_gpu: bool | Literal["auto"] = False  # "auto": true iff the Ray cluster has GPUs
    storage_path: str = "work/ray_results"  # RunConfig.storage_path (made absolute by the stage)
    run_name: str = "ume_mma"  # RunConfig.name; rerunning with the same name resumes
    max_failures: int = 0  # FailureConfig.max_failures (-1 = retry forever)
    # ScalingConfig.resources_per_worker["CPU"]; "auto": the cluster's CPUs shared by the workers, 1..8
    cpus_per_worker: float | Literal["auto"] = 1.0
    # "same": a rerun resumes or skips stages trained with the same settings and refuses changed ones;
    # "extend": a finished stage whose epochs grew trains on to the new count (stages after it rerun)
    resume: str = "same"
    # a cluster that can grow (autoscaler) gets this long to provide the workers' resources; 0: fail at once
    resource_timeout_s: float = 600.0


    @property
    def min_workers(self) -> int:
        """The workers a stage needs at least (all of them unless elastic)."""
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def scaling_workers(self) -> int | tuple[int, int]:
        """`ScalingConfig(num_workers=...)`: a count, or Ray Train's elastic (min, max)."""
        return tuple(self.num_workers) if isinstance(self.num_workers, list) else self.num_workers


@dataclass
class TrackConfig:
    """``[track]``: training curves besides metrics.jsonl (trainer/tracking.py), written by rank 0."""

    tensorboard: bool = True  # event files under <storage_path>/<run_name>/tensorboard/<stage>/
    log_every_steps: int = 0  # also the training loss every N steps (0: per epoch only)
    mlflow_uri: str = ""  # e.g. http://mlflow:5000 or file:///mnt/shared/mlruns; "" = no MLflow
    mlflow_experiment: str = ""  # "" = ray.run_name


@dataclass
class EvalConfig:
    """``[eval]``: the scenario matrix scored for every method."""

    scenarios: list[str] = field(default_factory=lambda: list(SCENARIO_KINDS))  # kinds: full, missing, rate
    rates: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # eta for "rate"
    split: str = "test"
    val_split: str = "val"  # used to choose between UME and UME-MMA (METHOD.md step 4)
    seed: int = 0  # seeds the key hash that picks the samples of a rate:<m>=<eta> scenario

    def scenario_names(self, modalities: list[str]) -> list[str]:
        """Concrete scenario names for a dataset: ``full``, ``missing:<m>``, ``rate:<m>=<eta>``."""
        names: list[str] = []
        for kind in self.scenarios:
            if kind == "full":
                names.append("full")
            elif kind == "missing":
                names += [f"missing:{m}" for m in modalities]
            else:
                names += [f"rate:{m}={eta:g}" for m in modalities for eta in self.rates]
        return names


@dataclass
class Config:
    """A whole training config, one attribute per TOML section."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unimodal: StageConfig = field(default_factory=StageConfig)
    mma: MMAConfig = field(default_factory=MMAConfig)
    joint: StageConfig = field(default_factory=StageConfig)
    joint_dropout: JointDropoutConfig = field(default_factory=JointDropoutConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML config and apply ``section.key=value`` overrides (TOML values; bare strings allowed)."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).parent / "configs").glob("*.toml"))
        raise ConfigError(f"{path}: config file not found; shipped configs in trainer/configs/: {', '.join(shipped)}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    for override in overrides or []:
        _apply_override(raw, override, source=str(path))
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from nested dicts (a parsed TOML file or a stored ``asdict``)."""
    _check_moved(raw, source)
    _check_names(raw, SECTIONS, source, "section", "")
    sections = {name: _build_section(SECTIONS[name], raw.get(name, {}), name, source) for name in SECTIONS}
    config = Config(**sections)
    _validate(config, source)
    return config


def _apply_override(raw: dict[str, Any], override: str, source: str) -> None:
    """Set one ``section.key[.subkey]=value`` override in the parsed TOML tree."""
    where = f"{source}: override {override!r}"
    dotted, sep, text = override.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"{where}: expected section.key=value, e.g. train.lr=0.01")
    _check_moved({parts[0]: {parts[1]: text.strip()}}, where)
    _check_names({parts[0]: None}, SECTIONS, where, "section", "")
    section_type = SECTIONS[parts[0]]
    fields = {f.name: typing.get_type_hints(section_type)[f.name] for f in dataclasses.fields(section_type)}
    _check_names({parts[1]: None}, fields, where, "key", parts[0] + ".")
    field_type = fields[parts[1]]
    if len(parts) > 3 or (len(parts) == 3 and typing.get_origin(field_type) is not dict):
        raise ConfigError(f"{where}: {parts[0]}.{parts[1]} has no sub-keys; use {parts[0]}.{parts[1]}=<value>")
    target_type = typing.get_args(field_type)[1] if len(parts) == 3 else field_type
    text = text.strip()
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare string such as work/shards/ave
    if target_type is str and not isinstance(value, str):
        value = text  # e.g. ray.run_name=2024 is the name "2024"
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: {parts[0]} is not a table in the file")
    if len(parts) == 2:
        section[parts[1]] = value
        return
    # An entry of a table not given in the file updates the default table rather than replacing it.
    default = next(f for f in dataclasses.fields(section_type) if f.name == parts[1]).default_factory()
    table = section.setdefault(parts[1], default)
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {parts[0]}.{parts[1]} is not a table in the file")
    table[parts[2]] = value


def _check_names(given: dict[str, Any], valid: dict[str, Any], source: str, kind: str, prefix: str) -> None:
    """Reject unknown sections/keys, suggesting a close match and listing the valid names."""
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(
                f"{source}: unknown {kind} '{prefix}{name}'; {hint}valid: {', '.join(prefix + v for v in valid)}"
            )


def _build_section(section_type: type, raw: Any, name: str, source: str) -> Any:
    """Fill one section dataclass from its TOML table, checking key names and value types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{name}] must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(section_type)
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    _check_names(raw, fields, source, "key", name + ".")
    values = {}
    for key, f in fields.items():
        if key in raw:
            values[key] = _coerce(raw[key], hints[key], f"{name}.{key}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"{source}: missing required key {name}.{key}; set it in [{name}] or override {name}.{key}=..."
            )
    return section_type(**values)


def _coerce(value: Any, expected: Any, key: str, source: str) -> Any:
    """Check ``value`` against a field type (int is accepted for float); return it in that type."""
    origin = typing.get_origin(expected)
    if origin is Literal:
        if value not in typing.get_args(expected) or isinstance(value, bool):
            raise _type_error(value, expected, key, source)
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. bool | Literal["auto"]: the first that fits
        for option in typing.get_args(expected):
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise _type_error(value, expected, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, expected, key, source)
        (item,) = typing.get_args(expected)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, expected, key, source)
        _, item = typing.get_args(expected)
        return {k: _coerce(v, item, f"{key}.{k}", source) for k, v in value.items()}
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise _type_error(value, expected, key, source)
    return value


def _type_error(value: Any, expected: Any, key: str, source: str) -> ConfigError:
    """A type mismatch error naming the key and showing the expected TOML type."""
    return ConfigError(f"{source}: {key} must be {_type_name(expected)}, got {type(value).__name__} {value!r}; "
                       f"fix the value's type")


def _type_name(expected: Any) -> str:
    """A field type as a user reads it: ``int``, ``bool or 'auto'``."""
    origin = typing.get_origin(expected)
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(expected))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(expected) if option is not type(None))
    return getattr(expected, "__name__", str(expected))


STAGE_TABLES = ("unimodal", "mma", "joint", "joint_dropout")  # the stages of trainer/recipe.py, one table each
# Keys that moved: old key -> (section, key) now; a config that still has one gets a line saying how to rewrite it.
MOVED = {"train.modality_dropout": ("joint_dropout", "rate")}


def _validate_schedule(table: Any, name: str, require) -> None:
    """The schedule keys of [train] or a stage table (None: taken from [train])."""
    if table.epochs is not None and table.epochs != AUTO:
        require(table.epochs >= 0, f"{name}.epochs", table.epochs, '>= 0 or "auto"')
    for key in ("max_epochs", "patience"):
        value = getattr(table, key)
        require(value is None or value >= 1, f"{name}.{key}", value, ">= 1")
    for key in ("lr", "lr_gamma"):
        value = getattr(table, key)
        require(value is None or value > 0, f"{name}.{key}", value, "> 0")
    milestones = table.lr_milestones
    require(milestones is None or (milestones == sorted(set(milestones)) and all(m > 0 for m in milestones)),
            f"{name}.lr_milestones", milestones, "strictly increasing positive epochs")


def _check_moved(raw: dict[str, Any], source: str) -> None:
    """A key of an older version's config: one line saying how to write it now."""
    for old, (section, key) in MOVED.items():
        old_section, old_key = old.split(".")
        table = raw.get(old_section)
        if isinstance(table, dict) and old_key in table:
            raise ConfigError(f"{source}: {old} has moved; write it as [{section}] {key} = {table[old_key]!r} "
                              f"(or --set {section}.{key}=...)")


def _validate(config: Config, source: str) -> None:
    """Check the values' ranges and enumerations, naming the key and the allowed values."""

    def choose(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{source}: {key} = {value!r} is not allowed; {hint}use one of: {', '.join(allowed)}")

    def require(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key} = {value!r}; it must be {rule}")

    data, model, train, mma, ray = config.data, config.model, config.train, config.mma, config.ray
    require(bool(data.dataset_dir), "data.dataset_dir", data.dataset_dir, "the path of a built dataset")
    choose("data.backend", data.backend, ("auto", "dali", "torch"))
    for key, value in (
        ("data.batch_size", data.batch_size),
        ("data.crop_size", data.crop_size),
        ("model.width", model.width),
    ):
        require(value > 0, key, value, "a positive integer")
    require(data.num_workers == AUTO or data.num_workers >= 0, "data.num_workers", data.num_workers, '>= 0 or "auto"')
    require(0 < data.min_crop_area <= 1, "data.min_crop_area", data.min_crop_area, "in (0, 1]")

    choose("model.fusion", model.fusion, ("sum", "concat"))
    for table in ("encoders", "pretrained", "freeze", "lr_scale"):
        _check_names(getattr(model, table), dict.fromkeys(MODALITIES), source, "modality", f"model.{table}.")
    for modality, scale in model.lr_scale.items():
        require(scale > 0, f"model.lr_scale.{modality}", scale, "> 0 (freeze the encoder with model.freeze instead of 0)")

    choose("train.optimizer", train.optimizer, ("sgd", "adamw"))
    choose("train.amp", train.amp, ("none", "bf16"))
    require(
        train.momentum >= 0 and train.weight_decay >= 0,
        "train.momentum/weight_decay",
        (train.momentum, train.weight_decay),
        ">= 0",
    )
    require(config.track.log_every_steps >= 0, "track.log_every_steps", config.track.log_every_steps, ">= 0")
    require(train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", train.checkpoint_every_steps,
            ">= 0 (0: end of epoch only)")
    for name in ("train", *STAGE_TABLES):
        _validate_schedule(getattr(config, name), name, require)
    require(0 <= config.joint_dropout.rate < 1, "joint_dropout.rate", config.joint_dropout.rate, "in [0, 1)")

    choose("mma.scheme", mma.scheme, ("drop_one", "independent"))
    outcomes = ("full", *MODALITIES) if mma.scheme == "drop_one" else MODALITIES
    _check_names(mma.drop_probs, dict.fromkeys(outcomes), source, f"{mma.scheme} outcome", "mma.drop_probs.")
    for outcome, p in mma.drop_probs.items():
        require(0 <= p <= 1, f"mma.drop_probs.{outcome}", p, "a probability in [0, 1]")
    if mma.scheme == "drop_one" and mma.drop_probs:
        total = sum(mma.drop_probs.values())
        require(
            math.isclose(total, 1.0, abs_tol=1e-3),
            "mma.drop_probs",
            mma.drop_probs,
            f"probabilities summing to 1 for drop_one (they sum to {total:g})",
        )

    workers = ray.num_workers if isinstance(ray.num_workers, list) else [ray.num_workers]
    require(len(workers) in (1, 2) and 1 <= workers[0] <= workers[-1], "ray.num_workers", ray.num_workers,
            ">= 1, or [min, max] with 1 <= min <= max for elastic training")
    require(ray.cpus_per_worker == AUTO or ray.cpus_per_worker > 0, "ray.cpus_per_worker", ray.cpus_per_worker,
            '> 0 or "auto"')
    choose("ray.resume", ray.resume, RESUME_MODES)
    require(ray.resource_timeout_s >= 0, "ray.resource_timeout_s", ray.resource_timeout_s, ">= 0 seconds")
    require(ray.max_failures >= -1, "ray.max_failures", ray.max_failures, ">= -1 (-1 retries forever)")
    require(bool(ray.run_name), "ray.run_name", ray.run_name, "a non-empty name")

    for kind in config.eval.scenarios:
        choose("eval.scenarios", kind, SCENARIO_KINDS)
    for eta in config.eval.rates:
        require(0 < eta < 1, "eval.rates", config.eval.rates, "missing rates strictly between 0 and 1")
