"""The landmark teachers: how their points combine, and what a user without them sees."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from facetag.data.folders import held_out
from facetag.errors import ModelError
from facetag.training import teachers
from facetag.training.teachers import AGREE, label_landmarks, merge_teachers

MTCNN = np.array([[30.0, 40.0], [70.0, 40.0], [50.0, 60.0], [35.0, 80.0], [65.0, 80.0]])


def test_merge_takes_dlib_eyes_and_mtcnn_nose_and_mouth():
    eyes = np.array([[31.0, 42.0], [69.0, 41.0]])
    merged = merge_teachers(MTCNN, eyes)
    assert merged is not None
    np.testing.assert_array_equal(merged[:2], eyes)
    np.testing.assert_array_equal(merged[2:], MTCNN[2:])


def test_merge_drops_a_face_the_teachers_disagree_on():
    eyes = np.array([[30.0, 40.0 + (AGREE + 0.01) * 40], [70.0, 40.0]])  # eye distance 40
    assert merge_teachers(MTCNN, eyes) is None


def test_lfw_people_n_to_z_are_held_out():
    assert held_out(Path("/data/lfw"), "Tom_Hanks")
    assert held_out("lfw", "Nicole_Kidman")
    assert not held_out("lfw", "Angelina_Jolie")
    assert not held_out("glint_celebs", "Tom_Hanks")  # only LFW's N-Z are the held-out set


def test_missing_teacher_is_one_line_with_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        teachers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "facenet_pytorch" else real(name, *a),
    )
    with pytest.raises(ModelError, match=r"^facenet_pytorch: .*pip install --no-deps facenet"):
        label_landmarks(tmp_path, tmp_path / "lm.json")


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("facenet_pytorch", "tqdm", "dlib", "skimage")),
    reason="needs facenet-pytorch, tqdm and dlib-bin (the teacher extra)",
)
def test_astronaut_gets_five_landmarks_in_order(tmp_path):
    from PIL import Image
    from skimage import data

    (tmp_path / "johns" / "Eileen_Collins").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(tmp_path / "johns" / "Eileen_Collins" / "a.png")
    (tmp_path / "lfw" / "Zed_Z").mkdir(parents=True)  # held out: never labelled
    Image.fromarray(data.astronaut()).save(tmp_path / "lfw" / "Zed_Z" / "z.png")
    report = label_landmarks(tmp_path, tmp_path / "lm.json", sets=("johns", "lfw"))
    doc = json.loads((tmp_path / "lm.json").read_text())
    assert (report.faces, report.per_set) == (1, {"johns": 1, "lfw": 0})
    (face,) = doc["images"]["johns/Eileen_Collins/a.png"]
    pts = np.array(face["landmarks"])
    assert pts.shape == (5, 2)
    assert pts[0, 0] < pts[2, 0] < pts[1, 0]  # left eye, nose, right eye from left to right
    assert pts[3, 0] < pts[4, 0]
    assert pts[:2, 1].max() < pts[2, 1] < pts[3:, 1].min()  # eyes above nose above mouth
    x1, y1, x2, y2 = face["box"]
    assert (x1 < pts[:, 0]).all()
    assert (pts[:, 0] < x2).all()
    assert (y1 < pts[:, 1]).all()
    assert (pts[:, 1] < y2).all()
