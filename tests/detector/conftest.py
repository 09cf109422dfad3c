"""Fixtures for the detector tests: a tiny random-weight model file and photos of every kind."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facetag.checkpoint import save_checkpoint
from facetag.detector_config import DETECTOR
from facetag.metrics.ap import DetectionScores
from facetag.models.detector import Cascade
from facetag.training.detector_train import model_state

TINY = {"pnet": (4, 4, 8), "rnet": (4, 8, 8, 16), "onet": (4, 4, 8, 8, 16)}


def tiny_model_file(path: Path, stages=("pnet", "rnet")) -> Path:
    torch.manual_seed(0)
    cascade = Cascade(TINY, list(stages))
    config = DETECTOR.load(None, {"model.stages": list(stages)})
    scores = DetectionScores(0.0, 0.0, 0.0, 0, 0, 0, 0)
    return save_checkpoint(path, model_state(cascade, config, scores, None))


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return tiny_model_file(tmp_path / "tiny_detector.pt")


def photo(path: Path, size=(96, 64), seed=0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG whose header claims side x side pixels (the data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def photo_zoo(tmp_path) -> tuple[list[Path], list[Path]]:
    """(photos that must work, inputs that must fail with one line each)."""
    d = tmp_path / "zoo"
    d.mkdir()
    good = [
        photo(d / "plain.jpg"),
        photo(d / "palette.png", seed=1, mode="P"),
        photo(d / "alpha.png", seed=2, mode="RGBA"),
        photo(d / "cmyk.jpg", seed=3, mode="CMYK"),
        photo(d / "grey.png", seed=4, mode="L"),
    ]
    sixteen = d / "sixteen.png"
    Image.fromarray((np.arange(64 * 96).reshape(64, 96) * 7).astype(np.uint16)).save(sixteen)
    good.append(sixteen)
    whole = photo(tmp_path / "whole.jpg", seed=5).read_bytes()
    truncated = d / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    text = d / "notes.jpg"
    text.write_text("not a photo")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    bad = [truncated, text, bomb_png(d / "bomb.png"), empty_dir]
    return good, bad
