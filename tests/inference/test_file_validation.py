"""Model and gallery files are checked field by field at load: one line naming file and field."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from facetag.checkpoint import load_checkpoint, save_checkpoint
from facetag.errors import DataError, FacetagError, ModelError
from facetag.inference.align import WholePhotoDetector
from facetag.inference.enroll import enroll
from facetag.inference.gallery import load_gallery
from facetag.inference.tag import tag_photos
from facetag.models.detector import load_detector
from facetag.models.io import load_embedder
from tests.detector.conftest import tiny_model_file
from tests.inference.conftest import make_models, write_model


def _edited(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    state = {k: v for k, v in load_checkpoint(src).items() if k != "facetag"}
    edit(state)
    return save_checkpoint(dst, state)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda s: s.pop(key)


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(s: dict[str, Any]) -> None:
        for k in keys[:-1]:
            s = s[k]
        s[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_drop("config"), "config.model"),
        (
            _set("config", "model", "widths", value=[4, 16]),
            re.escape("embedder['stages.1.conv.weight']"),
        ),
        (_set("config", "model", "widths", value=[4, 10**9]), r"config.model.widths\[1\]"),
        (_set("image_size", value=[100000, 100000]), r"image_size\[0\]"),
        (_set("threshold", value=0.0), "threshold"),
        (_set("threshold", value=-1.0), "threshold"),
        (_set("threshold", value=math.nan), "threshold"),
        (_set("config", "model", "activation", value="gelu2"), "config.model.activation"),
        (_set("in_channels", value="3"), "in_channels"),
    ],
)
def test_bad_embedder_fields_are_one_line(tmp_path: Path, edit, field: str):
    bad = _edited(write_model(tmp_path / "m.pt"), tmp_path / "bad.pt", edit)
    with pytest.raises(ModelError) as e:
        load_embedder(bad)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}: expected ")
    assert re.search(field, message), message


def test_nan_weights_are_refused(tmp_path: Path):
    def poison(s: dict[str, Any]) -> None:
        name = next(iter(s["embedder"]))
        s["embedder"][name] = torch.full_like(s["embedder"][name], math.nan)

    bad = _edited(write_model(tmp_path / "m.pt"), tmp_path / "bad.pt", poison)
    with pytest.raises(ModelError, match="to be finite numbers, got NaN or infinity"):
        load_embedder(bad)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_set("settings", "threshold", value=math.nan), "settings.threshold"),
        (_set("settings", "min_face", value=0.0), "settings.min_face"),
        (_set("settings", "max_side", value=10**9), "settings.max_side"),
        (_set("settings", "landmark_rounds", value=1.5), "settings.landmark_rounds"),
        (_set("settings", "stage_thresholds", value=[math.nan]), "settings.stage_thresholds"),
        (_set("widths", "pnet", value=[10, 16]), "widths.pnet"),
        (_set("widths", "rnet", value=[28, 48, 64, 129]), "weights\\['stages.rnet"),
        (_set("stages", value=["rnet"]), "stages"),
        (_drop("weights"), "weights"),
    ],
)
def test_bad_detector_fields_are_one_line(tmp_path: Path, edit, field: str):
    src = tiny_model_file(tmp_path / "d.pt")
    if "settings" not in load_checkpoint(src):
        pytest.fail("the tiny detector stores no settings")
    bad = _edited(src, tmp_path / "bad.pt", edit)
    with pytest.raises(ModelError) as e:
        load_detector(bad)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}: expected ")
    assert re.search(field, message), message


@pytest.fixture
def gallery_doc(tmp_path: Path, people: Path) -> tuple[Path, dict[str, Any], Any]:
    model = write_model(tmp_path / "model.pt")
    models = make_models(model, WholePhotoDetector())
    enroll(people, tmp_path / "g.json", models)
    return tmp_path / "g.json", json.loads((tmp_path / "g.json").read_text()), models


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(values.astype("<f4").tobytes()).decode()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(margin="NaN"), "margin to be a number in"),
        (lambda d: d.update(margin=math.nan), "margin to be a number in"),
        (
            lambda d: d["people"]["Alice"][0].update(embedding=_b64(np.zeros(8))),
            r'people\["Alice"\]\[0\]\.embedding to be a unit-length vector, got length 0',
        ),
        (
            lambda d: d["people"]["Alice"][0].update(embedding=_b64(np.full(8, np.nan))),
            r'people\["Alice"\]\[0\]\.embedding to be finite values',
        ),
        (
            lambda d: d["people"]["Alice"][0].update(box=[1, 2, math.inf, 4]),
            r'people\["Alice"\]\[0\]\.box',
        ),
        (lambda d: d["people"]["Bob"][0].update(faces=0), r'people\["Bob"\]\[0\]\.faces'),
        (lambda d: d.update(people=[]), "people to be an object"),
    ],
)
def test_bad_gallery_fields_are_one_line(gallery_doc, change, field: str):
    path, doc, _ = gallery_doc
    change(doc)
    path.write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    with pytest.raises(DataError, match=field) as e:
        load_gallery(path)
    assert str(e.value).startswith(f"{path}: expected ")
    assert "\n" not in str(e.value)


def test_gallery_of_another_size_than_the_model_is_refused_at_tag(gallery_doc, tmp_path: Path):
    path, doc, models = gallery_doc
    v = np.ones(64) / 8.0  # unit length, 64 values: the model gives 8
    for entries in doc["people"].values():
        for e in entries:
            e["embedding"] = _b64(v)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"expected embeddings of 8 values \(the model's\), got 64"):
        tag_photos([tmp_path / "people"], path, models)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("[" * 100_000 + "]" * 100_000, "nesting too deep"),
        ('{"format": "facetag-gallery/1", "margin": ' + "9" * 5000 + "}", "4300 digits"),
    ],
)
def test_hostile_json_is_one_line(tmp_path: Path, text: str, what: str):
    path = tmp_path / "g.json"
    path.write_text(text)
    with pytest.raises(FacetagError, match=what) as e:
        load_gallery(path)
    assert "\n" not in str(e.value)
