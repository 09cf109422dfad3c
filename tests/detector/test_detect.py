"""The detection pipeline: boxes in displayed pixels, bad photos reported one line each."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from facetag.checkpoint import save_checkpoint
from facetag.errors import DataError, ModelError
from facetag.inference.detect import detect_paths, detect_photo
from facetag.models.detector import (
    StageNet,
    drop_nested,
    load_detector,
    place_landmarks,
    regress,
    square,
)
from facetag.models.io import ModelRef
from tests.detector.conftest import TINY, tiny_model_file


def with_settings(detector, **changes):
    return replace(detector, settings=replace(detector.settings, **changes))


def test_square_keeps_centres():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 9.0, 7.0]])
    torch.testing.assert_close(
        square(boxes), torch.tensor([[-5.0, 0.0, 15.0, 20.0], [5.0, 4.0, 9.0, 8.0]])
    )


def test_regress_moves_corners_by_side_units():
    w = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    got = regress(w, torch.tensor([[0.1, -0.1, 0.0, 0.5]]))
    torch.testing.assert_close(got, torch.tensor([[12.0, 8.0, 30.0, 40.0]]))


def test_detector_output_is_sorted_clipped_boxes(tiny_model):
    det = with_settings(load_detector(tiny_model), threshold=0.0, stage_thresholds=(0.0,))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 70, 90, generator=g) * 255
    found = det.detect(image, min_face=14)
    assert found.ndim == 2
    assert found.shape[1] == 15  # box, score, 5 landmarks
    assert found.shape[0] > 0
    assert torch.isnan(found[:, 5:]).all()  # no ONet: no landmarks
    assert (found[:, 0] >= 0).all()
    assert (found[:, 2] <= 90).all()
    assert (found[:, 3] <= 70).all()
    assert (found[:, 4].diff() <= 0).all()


def test_boxes_are_in_displayed_pixels_of_shrunk_and_rotated_photos(tiny_model, tmp_path):
    det = with_settings(
        load_detector(tiny_model), threshold=0.0, stage_thresholds=(0.0,), max_side=64
    )
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 200, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed: 60x200 stored -> 60 wide, 200 high
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    r = detect_photo(det, path, min_face=12)
    assert (r["width"], r["height"]) == (60, 200)
    boxes = np.array([f["box"] for f in r["faces"]])
    assert len(boxes)
    assert boxes[:, 2].max() <= 60
    assert boxes[:, 3].max() <= 200
    assert boxes[:, 3].max() > 64  # scaled back from the 64-px image detection ran on


def test_detect_paths_goes_on_after_bad_inputs(tiny_model, photo_zoo):
    good, bad = photo_zoo
    lines: list[str] = []
    doc, failed = detect_paths(
        [*good, *bad],
        model=ModelRef(tiny_model, str(tiny_model)),
        device="cpu",
        on_error=lines.append,
    )
    assert failed == len(bad) == len(lines)
    assert sorted(i["path"] for i in doc["images"]) == sorted(str(p) for p in good)
    assert all("\n" not in line for line in lines)
    assert any("truncated" in line for line in lines)
    assert any("decompression bomb" in line for line in lines)
    assert any("not one" in line for line in lines)
    assert any("expected image files" in line for line in lines)
    assert doc["device"] == "cpu"
    assert doc["model"] == {"detector": str(tiny_model)}
    json.dumps(doc)  # plain data
    for image in doc["images"]:
        assert set(image) == {"path", "width", "height", "faces"}
        assert (image["width"], image["height"]) == (96, 64)


def test_detect_paths_with_nothing_to_read(tiny_model, tmp_path):
    lines: list[str] = []
    doc, failed = detect_paths(
        [tmp_path], model=ModelRef(tiny_model, str(tiny_model)), device="cpu", on_error=lines.append
    )
    assert (failed, len(lines), doc["images"]) == (1, 1, [])  # said once, not twice
    assert "expected image files" in lines[0]
    with pytest.raises(DataError, match="no such path"):
        detect_paths(
            [tmp_path / "missing"], model=ModelRef(tiny_model, str(tiny_model)), device="cpu"
        )


def test_load_detector_rejects_other_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a facetag checkpoint"):
        load_detector(junk)
    other = save_checkpoint(tmp_path / "other.pt", {"format": "facetag-embedder/1"})
    with pytest.raises(ModelError, match="expected a facetag detector model"):
        load_detector(other)
    with pytest.raises(ModelError, match="no such file"):
        load_detector(tmp_path / "missing.pt")


def test_drop_nested_removes_boxes_inside_better_ones():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 100.0, 120.0],  # the face
            [40.0, 20.0, 90.0, 85.0],  # inside it (IoU 0.27): dropped
            [90.0, 0.0, 190.0, 120.0],  # a neighbour overlapping a little: kept
            [95.0, 10.0, 185.0, 110.0],  # inside the neighbour: dropped
        ]
    )
    assert drop_nested(boxes, 0.7).tolist() == [0, 2]
    assert drop_nested(boxes[:1], 0.7).tolist() == [0]
    assert drop_nested(boxes, 1.0).tolist() == [0, 1, 2, 3]


def test_onet_landmarks_are_clipped_into_the_photo_and_reported(tmp_path):
    model = tiny_model_file(tmp_path / "onet.pt", stages=("pnet", "rnet", "onet"))
    det = with_settings(load_detector(model), threshold=0.0, stage_thresholds=(0.0, 0.0))
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(0)) * 255
    found = det.detect(image, min_face=14)  # random weights: landmarks land anywhere
    assert found.shape[0] > 0
    marks = found[:, 5:]
    assert not torch.isnan(marks).any()
    assert (marks[:, 0::2] >= 0).all()
    assert (marks[:, 0::2] <= 90).all()
    assert (marks[:, 1::2] >= 0).all()
    assert (marks[:, 1::2] <= 70).all()
    path = tmp_path / "p.png"
    Image.fromarray(image.permute(1, 2, 0).byte().numpy()).save(path)
    face = detect_photo(det, path, min_face=14)["faces"][0]
    assert len(face["landmarks"]) == 5
    assert all(len(p) == 2 for p in face["landmarks"])


def test_stage_net_landmark_head_only_on_onet():
    x = torch.zeros(2, 3, 48, 48)
    face, box, marks = StageNet("onet", TINY["onet"]).outputs(x)
    assert (face.shape, box.shape, marks.shape) == ((2, 1, 1, 1), (2, 4, 1, 1), (2, 10, 1, 1))
    assert StageNet("rnet", TINY["rnet"]).outputs(torch.zeros(2, 3, 24, 24))[2] is None


def test_place_landmarks_in_window_units():
    windows = torch.tensor([[10.0, 20.0, 30.0, 40.0]])  # side 20
    marks = torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.25, 1.0, 0.75, 1.0]])
    got = place_landmarks(windows, marks)
    want = torch.tensor([[10.0, 20.0, 30.0, 30.0, 20.0, 30.0, 15.0, 40.0, 25.0, 40.0]])
    torch.testing.assert_close(got, want)
