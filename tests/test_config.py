"""TOML configs: the shipped files, overrides, and errors that name the file, the key and the fix."""

import dataclasses
import json
from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    """A config file with ``text`` under a minimal valid [data] section."""
    path = tmp_path / "run.toml"
    path.write_text('[data]\ndataset_dir = "work/shards/x"\n' + text)
    return path


@pytest.mark.parametrize("name", ["av_digits", "kinetics_sound", "ave"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert isinstance(cfg, Config)
    assert cfg.data.dataset_dir == f"work/shards/{name}"
    assert cfg.ray.run_name == name
    assert set(cfg.model.encoders) == {"visual", "audio"}


@pytest.mark.parametrize("name", ["kinetics_sound", "ave"])
def test_reference_configs_follow_method_md(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert (cfg.model.width, cfg.model.fusion, cfg.model.pretrained) == (64, "sum", {})
    assert (cfg.data.batch_size, cfg.data.crop_size) == (64, 224)
    train = cfg.train
    assert (train.optimizer, train.lr, train.momentum, train.weight_decay) == ("sgd", 1e-3, 0.9, 1e-4)
    assert (train.epochs, train.lr_milestones, train.lr_gamma) == (100, [70], 0.1)
    assert cfg.mma.scheme == "drop_one" and set(cfg.mma.drop_probs) == {"full", "visual", "audio"}


def test_overrides_use_toml_values_and_accept_bare_strings():
    cfg = load_config(
        CONFIGS / "av_digits.toml",
        [
            "train.lr=0.01",
            "train.lr_milestones=[2, 4]",
            'model.encoders.visual="resnet18_spec"',
            "data.dataset_dir=/data/shards/av_digits",
            "ray.run_name=2024",
            "ray.use_gpu=true",
            "mma.lr=1",
        ],
    )
    assert cfg.train.lr == 0.01 and cfg.train.lr_milestones == [2, 4]
    assert cfg.model.encoders == {"visual": "resnet18_spec", "audio": "resnet18_spec"}
    assert cfg.data.dataset_dir == "/data/shards/av_digits"
    assert cfg.ray.run_name == "2024" and cfg.ray.use_gpu is True
    assert cfg.mma.lr == 1.0 and isinstance(cfg.mma.lr, float)


def test_override_of_a_table_entry_keeps_the_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["model.pretrained.visual=weights/resnet18.pth", "model.encoders.text=bert"])
    assert cfg.model.pretrained == {"visual": "weights/resnet18.pth"}
    assert cfg.model.encoders == {"visual": "resnet18_frames", "audio": "resnet18_spec", "text": "bert"}


def test_unknown_key_in_the_file_suggests_the_close_match(tmp_path):
    path = write(tmp_path, "[train]\nlearning_rate = 0.1\nlrr = 0.1\n")
    with pytest.raises(ConfigError, match=r"run\.toml: unknown key 'train\.learning_rate'; valid: train\.epochs"):
        load_config(path)
    path = write(tmp_path, "[train]\nlrr = 0.1\n")
    with pytest.raises(ConfigError, match=r"run\.toml: unknown key 'train\.lrr'; did you mean 'train\.lr'\?"):
        load_config(path)


def test_unknown_section_or_override_key_is_an_error():
    with pytest.raises(ConfigError, match=r"override 'trian\.lr=1'.*did you mean 'train'\?"):
        load_config(CONFIGS / "av_digits.toml", ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'mma\.epoch'; did you mean 'mma\.epochs'\?"):
        load_config(CONFIGS / "av_digits.toml", ["mma.epoch=1"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(CONFIGS / "av_digits.toml", ["train.lr"])
    with pytest.raises(ConfigError, match=r"'model\.encoders\.vision'; did you mean 'model\.encoders\.visual'"):
        load_config(CONFIGS / "av_digits.toml", ["model.encoders.vision=resnet18_frames"])


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.toml: train\.epochs must be int or 'auto', got str 'ten'"):
        load_config(write(tmp_path, '[train]\nepochs = "ten"\n'))
    with pytest.raises(ConfigError, match=r"data\.batch_size must be int, got float"):
        load_config(CONFIGS / "av_digits.toml", ["data.batch_size=64.5"])
    with pytest.raises(ConfigError, match=r"ray\.use_gpu must be bool or 'auto', got int"):
        load_config(CONFIGS / "av_digits.toml", ["ray.use_gpu=1"])
    with pytest.raises(ConfigError, match=r"eval\.rates\[1\] must be float, got str"):
        load_config(CONFIGS / "av_digits.toml", ['eval.rates=[0.1, "half"]'])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.fusion=product", r"model\.fusion = 'product' is not allowed; use one of: sum, concat"),
        ("data.backend=dal", r"data\.backend = 'dal' is not allowed; did you mean 'dali'\?"),
        ("mma.scheme=drop-one", r"mma\.scheme = 'drop-one' is not allowed; did you mean 'drop_one'\?"),
        ("train.optimizer=adam", r"train\.optimizer = 'adam' is not allowed; did you mean 'adamw'\?"),
        ("mma.drop_probs.full=0.5", r"mma\.drop_probs = .*summing to 1"),
        ("joint_dropout.rate=1.0", r"joint_dropout\.rate = 1\.0; it must be in \[0, 1\)"),
        ("unimodal.epochs=soon", r"unimodal\.epochs must be int or .auto., got str .soon.; fix"),
        ("unimodal.patience=0", r"unimodal\.patience = 0; it must be >= 1"),
        ("eval.scenarios=['full', 'missing:audio']", r"eval\.scenarios = 'missing:audio' is not allowed"),
    ],
)
def test_invalid_values_name_the_allowed_ones(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "av_digits.toml", [override])


@pytest.mark.parametrize("name", ["kinetics_sound", "ave", "food101", "mm_imdb"])
def test_gpu_reference_configs_leave_gpu_and_cpu_counts_to_the_cluster(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert (cfg.ray.use_gpu, cfg.ray.cpus_per_worker, cfg.data.num_workers) == ("auto", "auto", "auto")
    assert cfg.ray.resume == "same" and cfg.ray.resource_timeout_s > 0


def test_auto_or_a_typed_value_and_a_bad_one_names_the_key_and_the_allowed_values():
    cfg = load_config(CONFIGS / "av_digits.toml", ["ray.use_gpu=auto", "ray.cpus_per_worker=auto",
                                                   'data.num_workers="auto"', "ray.resume=extend"])
    assert (cfg.ray.use_gpu, cfg.ray.cpus_per_worker, cfg.data.num_workers, cfg.ray.resume) == (
        "auto", "auto", "auto", "extend")
    cfg = load_config(CONFIGS / "food101.toml", ["ray.use_gpu=false", "ray.cpus_per_worker=3", "data.num_workers=0"])
    assert (cfg.ray.use_gpu, cfg.ray.cpus_per_worker, cfg.data.num_workers) == (False, 3.0, 0)
    for override, message in [
        ("ray.use_gpu=yes", r"ray\.use_gpu must be bool or 'auto', got str 'yes'"),
        ("ray.cpus_per_worker=all", r"ray\.cpus_per_worker must be float or 'auto', got str 'all'"),
        ("ray.cpus_per_worker=0", r"ray\.cpus_per_worker = 0\.0; it must be > 0 or \"auto\""),
        ("data.num_workers=1.5", r"data\.num_workers must be int or 'auto', got float 1\.5"),
        ("data.num_workers=-1", r"data\.num_workers = -1; it must be >= 0 or \"auto\""),
        ("ray.resume=extnd", r"ray\.resume = 'extnd' is not allowed; did you mean 'extend'\? use one of: same, extend"),
        ("ray.resource_timeout_s=-1", r"ray\.resource_timeout_s = -1\.0; it must be >= 0 seconds"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(CONFIGS / "food101.toml", [override])


def test_independent_scheme_takes_per_modality_probabilities():
    cfg = load_config(CONFIGS / "av_digits.toml", ["mma.scheme=independent", "mma.drop_probs={visual=0.3, audio=0.5}"])
    assert cfg.mma.drop_probs == {"visual": 0.3, "audio": 0.5}
    with pytest.raises(ConfigError, match=r"unknown independent outcome 'mma\.drop_probs\.full'"):
        load_config(CONFIGS / "av_digits.toml", ["mma.scheme=independent"])


def test_missing_file_and_missing_dataset_dir_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found; shipped configs .*av_digits\.toml"):
        load_config(tmp_path / "nope.toml")
    path = tmp_path / "empty.toml"
    path.write_text("[train]\nepochs = 1\n")
    with pytest.raises(ConfigError, match=r"empty\.toml: missing required key data\.dataset_dir"):
        load_config(path)
    assert issubclass(ConfigError, ValueError)


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[train\n")
    with pytest.raises(ConfigError, match=r"run\.toml: invalid TOML"):
        load_config(path)


def test_config_dumps_to_json_and_rebuilds():
    cfg = load_config(CONFIGS / "kinetics_sound.toml", ["train.lr=0.01"])
    stored = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert config_from_dict(stored, source="checkpoint/config.json") == cfg


def test_scenario_names_expand_kinds_per_modality():
    cfg = load_config(CONFIGS / "av_digits.toml", ["eval.rates=[0.1, 0.5]"])
    assert cfg.eval.scenario_names(["visual", "audio"]) == [
        "full",
        "missing:visual",
        "missing:audio",
        "rate:visual=0.1",
        "rate:visual=0.5",
        "rate:audio=0.1",
        "rate:audio=0.5",
    ]


def test_a_moved_key_says_how_to_write_it_now(tmp_path):
    """[train] modality_dropout became [joint_dropout] rate: an old config fails with one line saying so."""
    old = (CONFIGS / "av_digits.toml").read_text().replace("[train]\n", "[train]\nmodality_dropout = 0.3\n", 1)
    (tmp_path / "old.toml").write_text(old)
    with pytest.raises(ConfigError, match=r"old\.toml: train\.modality_dropout has moved; write it as "
                                          r"\[joint_dropout\] rate = 0\.3 \(or --set joint_dropout\.rate=\.\.\.\)"):
        load_config(tmp_path / "old.toml")
    with pytest.raises(ConfigError, match=r"train\.modality_dropout has moved; write it as \[joint_dropout\] rate"):
        load_config(CONFIGS / "av_digits.toml", ["train.modality_dropout=0.2"])


def test_stage_tables_inherit_the_train_schedule():
    from trainer import recipe

    config = load_config(CONFIGS / "av_digits.toml", ["train.epochs=7", "joint.epochs=2", "joint.lr=0.01",
                                                       "unimodal.epochs=auto", "unimodal.max_epochs=9"])
    unimodal, joint, mma = (recipe.schedule(config, recipe.STAGES[s]) for s in ("unimodal", "joint", "mma"))
    assert (unimodal.auto, unimodal.limit, unimodal.patience, unimodal.lr) == (True, 9, 3, config.train.lr)
    assert (joint.epochs, joint.lr, joint.lr_milestones) == (2, 0.01, ())  # milestone 4 lies past its 2 epochs
    assert recipe.schedule(config, recipe.STAGES["joint_dropout"]).epochs == 7
    assert (mma.epochs, mma.lr, mma.lr_milestones) == (config.mma.epochs, config.mma.lr, ())  # [mma]'s own
    assert [s.name for s in recipe.plan(["mma"])] == ["unimodal", "mma"]
