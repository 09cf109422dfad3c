"""Config resolution: defaults < TOML < overrides, and one-line errors that say how to fix."""

import dataclasses
from pathlib import Path

import pytest

from facetag.config import (
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    flatten,
    load_config,
)
from facetag.errors import ConfigError

PRESETS = Path(__file__).parents[2] / "experiments" / "configs"


def write(tmp_path: Path, text: str, name: str = "orl.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_config_defaults_without_file():
    assert load_config(None, {}) == Config()


def test_config_precedence_default_toml_override(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 7\nlr = 0.1\n[data]\nsplit = '3/7'\n")
    cfg = load_config(path, {"epochs": 9, "train.batch_size": 4, "lr": None})
    assert cfg.train.epochs == 9  # flag beats TOML
    assert cfg.train.lr == 0.1  # TOML beats default; a None flag is "not given"
    assert cfg.train.batch_size == 4  # dotted override
    assert cfg.data.split == "3/7"
    assert cfg.train.seed == TrainConfig().seed  # untouched default


def test_config_flag_names_map_to_sections(tmp_path):
    cfg = load_config(None, {"data": str(tmp_path / "faces"), "seed": 3, "device": "cpu"})
    assert cfg.data.path == str(tmp_path / "faces")
    assert cfg.train.seed == 3
    assert cfg.train.device == "cpu"


@pytest.mark.parametrize(
    ("path", "name"), [("data/orl", "orl"), ("../shared/data/yaleb/", "yaleb"), ("", "")]
)
def test_config_dataset_name_defaults_to_folder(path, name):
    assert load_config(None, {"data": path}).data.name == name


def test_config_dataset_name_from_toml_wins_over_folder(tmp_path):
    path = write(tmp_path, '[data]\nname = "orl"\n')
    assert load_config(path, {"data": "data/olivetti"}).data.name == "orl"


def test_config_int_accepted_for_float_and_list_for_tuple(tmp_path):
    path = write(tmp_path, "[train]\nlr = 1\n[data]\nscale = [1, 2]\nimage_size = [32, 48]\n")
    cfg = load_config(path, {})
    assert isinstance(cfg.train.lr, float)
    assert cfg.data.scale == (1.0, 2.0)
    assert all(isinstance(s, float) for s in cfg.data.scale)
    assert cfg.data.image_size == (32, 48)


@pytest.mark.parametrize("name", ["orl", "yaleb", "smoke"])
def test_config_presets_load_and_round_trip(name, tmp_path):
    cfg = load_config(PRESETS / f"{name}.toml", {})
    assert cfg.data.name == name
    again = load_config(write(tmp_path, config_to_toml(cfg), "resolved.toml"), {})
    assert again == cfg


def test_config_presets_comment_every_changed_value():
    for path in PRESETS.glob("*.toml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "=" in line and not line.lstrip().startswith("#"):
                assert "#" in line, f"{path.name}:{number} has no comment: {line}"


def test_config_to_toml_round_trips_awkward_values(tmp_path):
    cfg = Config(
        data=DataConfig(path='C:\\faces\\"odd"\tname é/\x7f', name="ünï", split="0.25"),
        model=ModelConfig(widths=(3, 5, 7, 9, 11, 13), dropout=0.3333333333333333),
        train=TrainConfig(lr=1e-05, weight_decay=0.0, epochs=1, seed=2**40, device="cuda"),
    )
    again = load_config(write(tmp_path, config_to_toml(cfg)), {})
    assert again == cfg
    assert again.model.dropout == 0.3333333333333333  # bit-exact floats


def test_config_dict_round_trip():
    cfg = load_config(PRESETS / "yaleb.toml", {"epochs": 3})
    d = config_to_dict(cfg)
    assert d["model"]["widths"] == [16, 32, 64, 128]
    assert config_from_dict(d) == cfg


def test_config_flatten_has_dotted_scalar_params():
    flat = flatten(Config())
    assert flat["train.lr"] == TrainConfig().lr
    assert flat["model.widths"] == "[16, 32, 64, 128]"
    assert flat["data.flip"] is True
    n_fields = sum(len(dataclasses.fields(c)) for c in (DataConfig, ModelConfig, TrainConfig))
    assert len(flat) == n_fields
    assert all(isinstance(v, str | int | float | bool) for v in flat.values())


def test_config_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "[train]\nlr_rate = 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"^unknown key 'lr_rate' in .*orl\.toml \[train\]; "
        r"did you mean 'lr'\?$",
    ):
        load_config(path, {})


def test_config_key_in_wrong_section_names_its_section(tmp_path):
    path = write(tmp_path, "[data]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"'epochs' belongs in \[train\]"):
        load_config(path, {})


def test_config_top_level_key_points_at_its_section(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'epochs' .*\(top level\); did you mean "
        r"\[train\] epochs\?",
    ):
        load_config(write(tmp_path, "epochs = 3\n"), {})


def test_config_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[trian\] .*did you mean \[train\]"):
        load_config(write(tmp_path, "[trian]\nepochs = 3\n"), {})


def test_config_unknown_override():
    with pytest.raises(ConfigError, match=r"unknown override 'train.lrr'; did you mean 'train.lr'"):
        load_config(None, {"train.lrr": 0.1})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[train]\nepochs = "10"\n',
            r'\[train\] epochs: expected an integer, got string "10"; '
            r"write the number without quotes$",
        ),
        ("[train]\nepochs = true\n", r"epochs: expected an integer, got boolean true$"),
        ("[train]\nepochs = 2.5\n", r"epochs: expected an integer, got float 2.5$"),
        ("[train]\nlr = false\n", r"lr: expected a number, got boolean false$"),
        ("[data]\nflip = 1\n", r"flip: expected true or false, got integer 1$"),
        ("[data]\nimage_size = 64\n", r"image_size: expected an array of 2 integers, got integer"),
        ("[data]\nimage_size = [64, 64, 3]\n", r"expected an array of 2 integers, got array"),
        ("[model]\nwidths = [16, 32.5, 64, 128]\n", r"widths: expected an integer, got float 32.5"),
        ("[data]\npath = 3\n", r"path: expected a string, got integer 3$"),
        ("[train]\nlr = inf\n", r"lr: expected a number, got float inf$"),
        ("[train]\ndata = 1\n", r"unknown key 'data'"),
        ("train = 3\n", r"\[train\]: expected a table of keys, got integer 3"),
    ],
)
def test_config_rejects_wrong_types(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, {})
    assert str(path) in str(info.value) or "unknown key" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[train]\noptimizer = "adam"\n',
            r'optimizer: expected one of "adamw", "sgd", got string "adam"$',
        ),
        ('[train]\ndevice = "gpu"\n', r'expected one of "auto", "cpu", "cuda", got string "gpu"'),
        ('[model]\nactivation = "tanh"\n', r'expected one of "prelu", "relu"'),
        ('[model]\nhead = "cosface"\n', r'expected one of "softmax", "arcface"'),
        ('[train]\nschedule = "step"\n', r'expected one of "onecycle", "cosine", "constant"'),
        ("[train]\nepochs = 0\n", r"epochs: expected an integer >= 1, got 0$"),
        ("[train]\nlr = -0.1\n", r"lr: expected a value > 0, got -0.1$"),
        ("[model]\ndropout = 1.0\n", r"dropout: expected a probability in \[0, 1\), got 1.0$"),
        (
            "[model]\nwidths = [8, 16, 32]\n",
            r"widths: expected 4 to 6 widths >= 1, got \[8, 16, 32\]",
        ),
        ("[data]\nchannels = 2\n", r"channels: expected 0 \(from the data\), 1 \(grey\) or 3"),
        ("[data]\nscale = [1.2, 0.8]\n", r"scale: expected 0 < low <= high, got \[1.2, 0.8\]"),
        ('[data]\nsplit = "5-5"\n', r'split: expected "a/b" .* got "5-5"$'),
        ('[data]\nsplit = "0/5"\n', r'got "0/5"$'),
        ('[data]\nsplit = "1.5"\n', r'got "1.5"$'),
        (
            "[data]\nimage_size = [8, 8]\n",
            r"expected image_size >= 16 for 4 stages .*, got \(8, 8\); use fewer",
        ),
    ],
)
def test_config_rejects_bad_values(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, {})
    assert str(path) in str(info.value)


def test_config_accepts_split_ratio_and_counts(tmp_path):
    assert load_config(None, {"data.split": "0.8"}).data.split == "0.8"
    assert load_config(None, {"data.split": "5/5"}).data.split == "5/5"
    assert load_config(None, {"data.image_size": [16, 16], "model.widths": [2, 2, 2, 2]})


def test_config_bad_flag_value_names_the_flag():
    with pytest.raises(ConfigError, match=r"^--epochs: expected an integer >= 1, got -1$"):
        load_config(None, {"epochs": -1})
    with pytest.raises(ConfigError, match=r"^--batch-size: expected an integer, got string"):
        load_config(None, {"batch_size": "8"})


def test_config_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file; expected a TOML"):
        load_config(missing, {})


def test_config_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match=r"expected a TOML file, got a directory"):
        load_config(tmp_path, {})


def test_config_invalid_toml_names_line_and_column(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 3\nlr = = 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"orl\.toml: expected valid TOML, got .*line 3, "
        r"column \d+\); fix that line$",
    ):
        load_config(path, {})


def test_config_binary_file(tmp_path):
    path = tmp_path / "orl.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"expected UTF-8 TOML text"):
        load_config(path, {})


def test_config_from_dict_rejects_unknown_keys():
    d = config_to_dict(Config())
    d["train"]["lr_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown key 'lr_rate' in checkpoint x \[train\]"):
        config_from_dict(d, source="checkpoint x")
