"""The tag JSON, byte for byte in structure, against a committed golden file.

A tiny embedder initialised with a fixed seed, a fake detector at fixed places and
generated photos: any change to what `facetag tag --json` prints (keys, order, names,
rounding, the model block) shows up here. Paths become file names and the model id a
placeholder, so the file does not depend on where the test runs; numbers are compared
to 2e-3 (float sums may differ in the last digit between CPUs).

Regenerate after an intended change: FACETAG_UPDATE_GOLDEN=1 pytest tests/inference/test_golden.py
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from facetag.inference.align import WholePhotoDetector
from facetag.inference.enroll import enroll
from facetag.inference.tag import TagOptions, tag_photos
from facetag.inference.writers import to_json
from facetag.metrics.names import read_expected, score_tags
from tests.inference.conftest import FakeDetector, make_models, pattern, save, side_by_side

GOLDEN = Path(__file__).parent / "golden" / "tag.json"
HALVES = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]


def _portable(doc: Any, tmp: str) -> Any:
    if isinstance(doc, dict):
        return {k: _portable(v, tmp) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_portable(v, tmp) for v in doc]
    if isinstance(doc, str):
        if doc.startswith("embedder-"):
            return "<model id>"
        return re.sub(re.escape(tmp) + r"(/[^/\s:]+)*/", "", doc)  # paths -> file names
    return doc


def _close(got: Any, want: Any, where: str = "$") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {got!r} is not an object"
        assert list(got) == list(want), f"{where}: keys {list(got)}"
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list), f"{where}: {got!r} is not a list"
        assert len(got) == len(want), f"{where}: length {len(got)}, want {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, abs=2e-3), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_tag_json_matches_the_golden_file(tmp_path: Path, model_file: Path):
    people = tmp_path / "people"
    save(people / "Alice" / "1.png", pattern(1))
    save(people / "Bob" / "1.png", pattern(2))
    save(people / "Bob" / "2.png", pattern(2)[::-1].copy())  # a second, different photo
    gallery = tmp_path / "g.json"
    enroll(people, gallery, make_models(model_file, WholePhotoDetector()))
    lib = tmp_path / "lib"
    for name, seeds in {"a.png": (1, 2), "b.png": (2, 9), "c.png": (9, 1)}.items():
        save(lib / name, side_by_side(*(pattern(s) for s in seeds)))
    (lib / "broken.jpg").write_bytes(b"not a jpeg")
    models = make_models(model_file, FakeDetector(HALVES, landmarks=True), threshold=0.05)
    run = tag_photos([lib], gallery, models, TagOptions(margin=0.0, resume=False))
    doc = json.loads(to_json(run.doc))
    csv = tmp_path / "expected.csv"
    csv.write_text(
        "image,names\nlib/a.png,Alice;Bob\nlib/b.png,Bob;unknown\nlib/c.png,unknown;Alice\n"
    )
    doc["score"] = score_tags(run.doc["images"], read_expected(csv)).to_json()
    got = _portable(doc, str(tmp_path))
    if os.environ.get("FACETAG_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    _close(got, json.loads(GOLDEN.read_text()))
