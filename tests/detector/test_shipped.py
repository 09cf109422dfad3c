"""The weights shipped in the package: they find a real face, and reach the dlib_faces target."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facetag.inference.detect import detect_photo
from facetag.metrics.ap import iou_matrix
from facetag.models.detector import load_detector, shipped_detector
from facetag.training.evaluate_detector import evaluate_boxes

# Eileen Collins' face in skimage's astronaut photo (512x512), forehead to chin, by eye.
ASTRONAUT_FACE = (178, 62, 264, 172)


def test_shipped_weights_find_the_astronauts_face(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    assert shipped_detector().is_file(), "facetag/weights/detector.pt is missing: make weights"
    path = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    faces = detect_photo(load_detector(), path)["faces"]
    assert faces, "no face found"
    boxes = np.array([f["box"] for f in faces])
    overlaps = iou_matrix(np.array([ASTRONAUT_FACE], dtype=float), boxes)[0]
    assert overlaps[0] > 0.6, faces  # the best-scoring box is the face
    assert (overlaps[1:] < 0.3).all(), faces  # ... and it is reported once


@pytest.mark.data
@pytest.mark.skipif(not os.environ.get("FACETAG_DATA_DIR"), reason="FACETAG_DATA_DIR not set")
def test_shipped_weights_reach_the_dlib_faces_target():
    root = Path(os.environ["FACETAG_DATA_DIR"]) / "dlib_faces"
    r = evaluate_boxes(root / "boxes.csv", root, device="cpu")
    assert (r["faces"], r["images"]) == (43, 9)
    assert r["ap50"] >= 0.92, r
