"""facetag train --init: fine-tuning the dlib-resnet with distillation, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facetag.checkpoint import save_checkpoint
from facetag.errors import ConfigError
from facetag.models.io import EMBEDDER_FORMAT, load_embedder, weights_id
from facetag.models.resnet import DlibResNet
from facetag.training.runner import run_training
from tests.helpers import write_faces


def resnet_file(path: Path) -> Path:
    """A dlib-resnet model file as facetag import dlib writes one (random weights)."""
    torch.manual_seed(0)
    weights = DlibResNet().state_dict()
    return save_checkpoint(
        path,
        {
            "format": EMBEDDER_FORMAT,
            "architecture": "dlib-resnet",
            "embedder": weights,
            "in_channels": 3,
            "image_size": [150, 150],
            "embedding_dim": 128,
            "people": [],
            "threshold": None,
            "model_id": weights_id(weights),
            "weights_dtype": "float32",
            "provenance": {"source": "test"},
        },
    )


def fine_tune(tmp_path: Path, train: str) -> tuple[dict, Path]:
    """One epoch of facetag train --init on 2 generated people; (its result, the init)."""
    data = write_faces(tmp_path / "faces", ["ann", "bob"], 3, size=150)
    init = resnet_file(tmp_path / "dlib.pt")
    config = tmp_path / "ft.toml"
    config.write_text(
        '[data]\nimage_size = [150, 150]\nchannels = 3\nsplit = "2/1"\n'
        '[model]\narchitecture = "dlib-resnet"\nhead = "arcface"\n'
        f"[train]\nepochs = 1\nbatch_size = 2\n{train}\n"
    )
    return run_training(config, {"data": str(data), "init": str(init)}, track=False), init


def test_fine_tune_resnet_with_distillation_writes_a_loadable_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FACETAG_RUNS_DIR", str(tmp_path / "runs"))
    out, init = fine_tune(tmp_path, "lr = 1e-5\ndistill_weight = 1.0")
    assert out["epochs"] == 1
    model = load_embedder(out["model_path"])
    assert model.aligned
    assert model.state["provenance"]["fine_tuned_from"] == load_embedder(init).version
    assert model.version != load_embedder(init).version  # the weights moved


def test_resnet_without_init_is_a_config_error(tmp_path):
    config = tmp_path / "ft.toml"
    config.write_text(
        '[data]\nimage_size = [150, 150]\nchannels = 3\n[model]\narchitecture = "dlib-resnet"\n'
    )
    with pytest.raises(ConfigError, match=r"\[train\] init: expected the model file to fine-tune"):
        run_training(config, {"data": str(tmp_path)}, track=False)
    config.write_text('[data]\nimage_size = [112, 112]\n[model]\narchitecture = "dlib-resnet"\n')
    with pytest.raises(ConfigError, match=r"expected image_size = \[150, 150\] and channels = 3"):
        run_training(config, {"data": str(tmp_path)}, track=False)


def test_fine_tune_only_the_head_moves_only_the_embedding_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("FACETAG_RUNS_DIR", str(tmp_path / "runs"))
    out, init = fine_tune(tmp_path, 'lr = 1e-2\ntrainable = "head"')
    before = load_embedder(init).net.state_dict()
    after = load_embedder(out["model_path"], fold=False).net.state_dict()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert moved == ["fc.weight"]


def test_trainable_must_be_all_or_head(tmp_path):
    config = tmp_path / "ft.toml"
    config.write_text('[train]\ntrainable = "body"\n')
    with pytest.raises(ConfigError, match="trainable"):
        run_training(config, {"data": str(tmp_path)}, track=False)
