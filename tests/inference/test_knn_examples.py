"""The issue's tagging target with the shipped models, on the real knn_examples photos.

Enrol knn_examples/train (5 people, 1-2 ordinary photos each), tag knn_examples/test and
compare with expected.csv: every expected name found and no wrong name (name precision
and recall 1.0). Needs FACETAG_DATA_DIR (.ci/run sets it); skipped without the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facetag.cli import app

DATA = Path(os.environ.get("FACETAG_DATA_DIR", "/nonexistent"))
KNN = DATA / "knn_examples"

pytestmark = pytest.mark.skipif(not KNN.is_dir(), reason="needs FACETAG_DATA_DIR with knn_examples")


def _cli(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"}, prog_name="facetag")


def test_shipped_models_name_everyone_in_knn_examples(tmp_path: Path):
    gallery = tmp_path / "gallery.json"
    enrolled = _cli(["enroll", str(KNN / "train"), "--gallery", str(gallery)])
    assert enrolled.exit_code == 0, enrolled.output
    tagged = _cli(
        [
            "tag",
            str(KNN / "test"),
            "--gallery",
            str(gallery),
            "--json",
            "--expected",
            str(KNN / "expected.csv"),
            "--manifest",
            str(tmp_path / "manifest.jsonl"),
        ]
    )
    assert tagged.exit_code == 0, tagged.output
    doc = json.loads(tagged.stdout)
    score = doc["score"]
    wrong = {
        Path(p["path"]).name: (p["wrong"], p["missed"])
        for p in score["photos"]
        if p["wrong"] or p["missed"]
    }
    assert wrong == {}
    assert (score["precision"], score["recall"]) == (1.0, 1.0)
    assert score["names_expected"] == 9  # the unknown face is not a name
    assert not score["not_tagged"]
    assert doc["model"]["embedder_source"] == "shipped"
    assert doc["model"]["threshold_source"] == "model file"
    provenance = doc["model"]["embedder_provenance"]  # dlib's public-domain ResNet, imported
    assert provenance["sha256"].startswith("55533b28a958")
    assert provenance["licence"].startswith("CC0 1.0")
