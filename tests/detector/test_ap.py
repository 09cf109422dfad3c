"""The AP scorer: hand-checked precision-recall cases, ignored regions, recall at 1 FP/image."""

import math

import numpy as np
import pytest

from facetag.data.boxes import FaceBox
from facetag.metrics.ap import average_precision, iou_matrix, score_detector


def test_iou_matrix_known_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=float)
    got = iou_matrix(a, b)
    np.testing.assert_allclose(got[0], [1.0, 50 / 150, 0.0])
    assert got.shape == (2, 3)


def test_perfect_detections_score_one():
    truth = {"a": [FaceBox(0, 0, 40, 40), FaceBox(100, 100, 20, 20)], "b": []}
    dets = {"a": [(0, 0, 40, 40, 0.9), (100, 100, 120, 120, 0.8)]}
    s = score_detector(dets, truth)
    assert (s.ap50, s.recall_at_1fp, s.faces, s.images) == (1.0, 1.0, 2, 2)
    assert s.ap50_32 == 1.0
    assert s.faces_32 == 1


def test_ap_hand_computed_curve():
    # scores: TP 0.9, FP 0.8, TP 0.7 of 3 faces -> precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3
    # VOC all-point: 1/3 * 1 + 1/3 * 2/3 = 5/9
    matches = [(0.9, True), (0.8, False), (0.7, True)]
    assert average_precision(matches, 3) == pytest.approx(5 / 9)
    assert average_precision([], 3) == 0.0
    assert math.isnan(average_precision([], 0))


def test_duplicates_are_false_positives_and_recall_at_one_fp():
    truth = {"a": [FaceBox(0, 0, 40, 40)], "b": [FaceBox(0, 0, 40, 40)]}
    dets = {
        "a": [(0, 0, 40, 40, 0.9), (1, 1, 41, 41, 0.85), (200, 200, 240, 240, 0.8)],
        "b": [(300, 300, 340, 340, 0.95), (0, 0, 40, 40, 0.5)],
    }
    s = score_detector(dets, truth)
    # ranked: FP .95, TP .9, FP .85, FP .8, TP .5: 2 images allow 2 FPs -> recall 1/2
    assert s.recall_at_1fp == pytest.approx(0.5)
    # precision at recall 1/2 is 1/2, at recall 1 is 2/5
    assert s.ap50 == pytest.approx(0.5 * 0.5 + 0.5 * 0.4)


def test_false_positives_and_recall_at_the_default_threshold():
    truth = {"a": [FaceBox(0, 0, 40, 40), FaceBox(100, 0, 40, 40)], "b": []}
    dets = {
        "a": [(0, 0, 40, 40, 0.95), (100, 0, 140, 40, 0.5), (200, 0, 240, 40, 0.85)],
        "b": [(0, 0, 40, 40, 0.9), (50, 50, 90, 90, 0.7)],
    }
    s = score_detector(dets, truth, threshold=0.8)
    assert (s.threshold, s.false_positives_at_threshold, s.recall_at_threshold) == (0.8, 2, 0.5)
    assert math.isnan(score_detector(dets, truth).threshold)  # not asked for


def test_invalid_faces_are_ignored_regions():
    truth = {"a": [FaceBox(0, 0, 40, 40), FaceBox(100, 0, 40, 40, invalid=True)]}
    found = score_detector({"a": [(0, 0, 40, 40, 0.9), (100, 0, 140, 40, 0.95)]}, truth)
    missed = score_detector({"a": [(0, 0, 40, 40, 0.9)]}, truth)
    assert found.ap50 == missed.ap50 == 1.0
    assert found.faces == 1


def test_ap_32_ignores_small_faces_and_small_detections():
    truth = {"a": [FaceBox(0, 0, 50, 50), FaceBox(100, 0, 20, 20)]}
    dets = {"a": [(300, 300, 320, 320, 0.99), (0, 0, 50, 50, 0.9), (100, 0, 120, 20, 0.8)]}
    s = score_detector(dets, truth)
    assert s.ap50_32 == 1.0  # the small false positive and the small face do not count
    assert s.ap50 < 1.0  # ... but they do over all faces
    assert s.faces_32 == 1


def test_low_iou_detection_is_a_false_positive():
    truth = {"a": [FaceBox(0, 0, 40, 40)]}
    s = score_detector({"a": [(20, 20, 60, 60, 0.9)]}, truth)
    assert s.ap50 == 0.0
    assert s.recall_at_1fp == 0.0


def _xml(tmp_path, pts):
    parts = "".join(f"<part name='{k:02d}' x='{x}' y='{y}'/>" for k, (x, y) in enumerate(pts))
    text = (
        "<?xml version='1.0'?><dataset><images><image file='a.jpg'>"
        f"<box top='10' left='20' width='40' height='40'>{parts}</box>"
        "</image></images></dataset>"
    )
    path = tmp_path / "faces.xml"
    path.write_text(text)
    return path


def test_landmark_error_against_68_point_annotations(tmp_path):
    import numpy as np

    from facetag.data.boxes import read_landmarks_xml
    from facetag.metrics.ap import five_from_68, landmark_errors

    pts = np.zeros((68, 2))
    pts[36:42] = [25.0, 25.0]  # left eye centre (25, 25), outer corner 36 at (25, 25)
    pts[42:48] = [45.0, 25.0]
    pts[45] = [45.0, 25.0]  # outer corners 20 px apart
    pts[30], pts[48], pts[54] = [35.0, 35.0], [28.0, 45.0], [42.0, 45.0]
    truth = read_landmarks_xml(_xml(tmp_path, pts.tolist()))
    target = five_from_68(truth["a.jpg"][0][1])
    np.testing.assert_allclose(target[[0, 2]], [[25, 25], [35, 35]])
    shifted = (target + np.array([2.0, 0.0])).reshape(-1).tolist()  # every point 2 px off
    found = {"a.jpg": [[20, 10, 60, 50, 0.9, *shifted], [0, 0, 5, 5, 0.99, *[0.0] * 10]]}
    r = landmark_errors(found, truth)
    assert r["landmark_faces"] == 1
    assert r["landmark_missed"] == 0
    assert r["landmark_error"] == pytest.approx(0.1)
    none = landmark_errors({"a.jpg": [[20, 10, 60, 50, 0.9, *[float("nan")] * 10]]}, truth)
    assert (none["landmark_faces"], none["landmark_missed"]) == (0, 1)


def test_landmarks_xml_without_parts_is_one_line(tmp_path):
    from facetag.data.boxes import read_landmarks_xml
    from facetag.errors import DataError

    bad = tmp_path / "x.xml"
    bad.write_text("<dataset><images><image file='a.jpg'><box/></image></images></dataset>")
    with pytest.raises(DataError, match="expected faces with 68 landmark parts, got none"):
        read_landmarks_xml(bad)
