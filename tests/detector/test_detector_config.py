"""The detector's config goes through the same loader as the embedder's: same errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from facetag.detector_config import (
    DETECTOR,
)
from facetag.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("[trian]\nepochs = 1\n", {}, r"unknown section \[trian\] in .*; did you mean \[train\]\?"),
        (
            "[train]\nepoch = 1\n",
            {},
            r"unknown key 'epoch' in .* \[train\]; did you mean 'epochs'\?",
        ),
        ("[train]\nmin_face = 30.0\n", {}, r"'min_face' belongs in \[data\]"),
        ("epochs = 1\n", {}, r"unknown key 'epochs' in .* \(top level\); did you mean \[train\]"),
        ("[data]\nmin_face = 2.0\n", {}, r"\[data\] min_face: expected a size >= 4 px, got 2.0"),
        ('[train]\nlr = "fast"\n', {}, r"\[train\] lr: expected"),
        ("", {"train.lrr": 1.0}, r"unknown override 'train.lrr'; did you mean 'train.lr'\?"),
        ("", {"epochs": 0}, r"^--epochs: expected an integer >= 1, got 0$"),
    ],
)
def test_bad_detector_configs_are_one_line_errors(tmp_path, text, overrides, match):
    path = tmp_path / "detector.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        DETECTOR.load(path, overrides)


def test_presets_load_with_flag_overrides_and_round_trip():
    for name in ("detector.toml", "detector-fast.toml"):
        cfg = DETECTOR.load(PRESETS / name, {"epochs": 2, "lr": None, "seed": 3})
        assert (cfg.train.epochs, cfg.train.seed) == (2, 3)
        assert DETECTOR.from_dict(DETECTOR.to_dict(cfg)) == cfg
