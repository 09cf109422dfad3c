"""Tiny models, a fake detector and generated photos for the enrolment and tagging tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from facetag.checkpoint import save_checkpoint
from facetag.config import Config, DataConfig, ModelConfig
from facetag.inference.models import Models
from facetag.models.embedder import EmbeddingNet, FaceClassifier
from facetag.models.io import load_embedder
from facetag.training.loop import model_file_state

SIZE = (16, 16)  # (H, W) of the tiny embedder's input


def write_model(
    path: Path, channels: int = 3, seed: int = 0, threshold: float | None = None
) -> Path:
    """A freshly initialised tiny embedder saved as a model file (what facetag train writes)."""
    torch.manual_seed(seed)
    config = Config(
        data=dataclasses.replace(DataConfig(), image_size=SIZE, channels=channels),
        model=dataclasses.replace(ModelConfig(), widths=(4, 8), embedding_dim=8),
    )
    net = EmbeddingNet(channels, (4, 8), 8, "prelu")
    model = FaceClassifier(net, 2)
    extra = (
        {"run_id": "run123"} if threshold is None else {"run_id": "run123", "threshold": threshold}
    )
    save_checkpoint(path, model_file_state(model, config, ("a", "b"), channels, extra=extra))
    return path


@dataclass(frozen=True)
class FakeSettings:
    max_side: int = 512


@dataclass
class FakeDetector:
    """Finds faces at fixed places: boxes as fractions (x1, y1, x2, y2) of the image."""

    boxes: list[tuple[float, float, float, float]]
    name: str = "fake-detector"
    settings: FakeSettings = field(default_factory=FakeSettings)
    landmarks: bool = False  # also give each face five landmarks (an ONet's output)

    def detect(self, image: Tensor) -> Tensor:
        _, H, W = image.shape
        rows = []
        for x1, y1, x2, y2 in self.boxes:
            row = [x1 * W, y1 * H, x2 * W, y2 * H, 0.9]
            if self.landmarks:  # eyes, nose, mouth corners at fixed places in the box
                for fx, fy in ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8)):
                    row += [(x1 + fx * (x2 - x1)) * W, (y1 + fy * (y2 - y1)) * H]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, 15 if self.landmarks else 5)


def pattern(seed: int, size: int = 32) -> np.ndarray:
    """A colour image (size, size, 3) uint8: smooth blobs, different for each seed."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        torch.rand(1, 3, 4, 4, generator=g), size=(size, size), mode="bilinear"
    )[0]
    return (base * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy()


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def side_by_side(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=1)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model.pt")


def make_models(model_path: Path, detector: object, threshold: float = 1e-3) -> Models:
    emb = load_embedder(model_path)
    return Models(emb, detector, "cpu", threshold, "--threshold", str(model_path))  # type: ignore[arg-type]


@pytest.fixture
def people(tmp_path: Path) -> Path:
    """people/Alice/1.png (pattern 1), people/Bob/1.png (pattern 2): whole-image faces."""
    root = tmp_path / "people"
    save(root / "Alice" / "1.png", pattern(1))
    save(root / "Bob" / "1.png", pattern(2))
    return root


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """tag's default manifest is ./facetag-manifest.jsonl: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)
