"""Outputs of `tag` besides the sidecars (tests/inference/test_xmp.py): JSON, CSV, annotated."""

from __future__ import annotations

import csv
import io
import json

from PIL import Image

from facetag.inference.writers import CSV_COLUMNS, annotate, csv_text

IMAGE = {
    "path": "p/a.jpg",
    "width": 400,
    "height": 200,
    "faces": [
        {
            "box": [100.0, 50.0, 140.0, 130.0],
            "score": 0.9,
            "name": "Alice",
            "distance": 0.1,
            "confidence": 0.8,
        },
        {
            "box": [300.0, 20.0, 350.0, 80.0],
            "score": 0.8,
            "name": None,
            "distance": 0.9,
            "confidence": 0.6,
        },
    ],
}


def test_csv_has_one_row_per_face():
    rows = list(csv.reader(io.StringIO(csv_text([IMAGE, {**IMAGE, "faces": []}]))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[1] == ["p/a.jpg", "100.0", "50.0", "140.0", "130.0", "0.9", "Alice", "0.1", "0.8"]
    assert rows[2][6] == ""  # unknown
    assert len(rows) == 3


def test_annotate_draws_boxes():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    out = annotate(img, IMAGE, scale=0.5)
    assert out.size == (200, 100)
    assert out.getpixel((50, 45)) != (0, 0, 0)  # Alice's left edge at x = 100 * 0.5
    assert img.getpixel((50, 45)) == (0, 0, 0)  # the input is not drawn on


def test_json_of_tag_is_detect_json_plus_names():
    from facetag.inference.writers import to_json

    doc = json.loads(to_json({"device": "cpu", "model": {}, "images": [IMAGE]}))
    assert set(doc["images"][0]["faces"][0]) == {"box", "score", "name", "distance", "confidence"}
