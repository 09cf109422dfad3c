"""Aligned chips: the similarity fit and the chip cut from five landmarks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facetag.inference.align import (
    BOX_LANDMARKS,
    CHIP_TEMPLATE,
    face_chip,
    face_landmarks,
    similarity,
)

TEMPLATE = np.asarray(CHIP_TEMPLATE)


def rotation(deg: float) -> np.ndarray:
    r = np.deg2rad(deg)
    return np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])


def test_similarity_recovers_an_exact_transform():
    A = 1.7 * rotation(20)
    t = np.array([12.0, -5.0])
    src = TEMPLATE
    got_A, got_t = similarity(src, src @ A.T + t, [0.4, 0.4, 0.1, 0.05, 0.05])
    np.testing.assert_allclose(got_A, A, atol=1e-9)
    np.testing.assert_allclose(got_t, t, atol=1e-9)


def test_similarity_never_reflects():
    mirrored = TEMPLATE * np.array([-1.0, 1.0])
    A, _ = similarity(TEMPLATE, mirrored)
    assert np.linalg.det(A) > 0


def gradient_photo(W: int, H: int) -> Image.Image:
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 255 // max(W - 1, 1), y * 255 // max(H - 1, 1), (x + y) % 256], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


def test_landmarks_on_the_template_give_the_photo_itself():
    img = gradient_photo(150, 150)
    chip = face_chip(img, TEMPLATE).permute(1, 2, 0).numpy()
    assert chip.shape == (150, 150, 3)
    assert np.abs(chip.astype(int) - np.asarray(img).astype(int)).max() <= 1


@pytest.mark.parametrize("deg", [0.0, 30.0])
def test_a_larger_rotated_face_is_shrunk_and_turned_back(deg):
    # The 150-px photo drawn 3x larger and rotated about its centre: the chip undoes it.
    small = gradient_photo(150, 150)
    big = small.resize((450, 450), Image.Resampling.BICUBIC).rotate(deg, center=(225, 225))
    centre = np.array([224.5, 224.5])
    R = rotation(-deg)  # PIL's rotate is counter-clockwise on screen
    marks = ((TEMPLATE * 3 + 1) - centre) @ R.T + centre
    chip = face_chip(big, marks).permute(1, 2, 0).numpy().astype(int)
    inner = (slice(40, 110), slice(40, 110))  # away from the black corners rotation leaves
    diff = np.abs(chip[inner] - np.asarray(small).astype(int)[inner])
    assert np.median(diff) <= 2
    assert diff.mean() < 4


def test_parts_of_the_chip_outside_the_photo_are_black():
    img = gradient_photo(150, 150)
    chip = face_chip(img, TEMPLATE - 100).permute(1, 2, 0).numpy()
    assert chip[:40, :40].max() == 0  # the photo moved down-right out of this corner


def test_faces_without_landmarks_get_them_from_their_box():
    face = [10.0, 20.0, 110.0, 140.0, 0.9] + [float("nan")] * 10
    marks = face_landmarks(face)
    np.testing.assert_allclose(marks[0], [10 + BOX_LANDMARKS[0][0] * 100, 20 + 0.40 * 120])
    with_marks = face[:5] + list(range(10))
    np.testing.assert_array_equal(face_landmarks(with_marks), np.arange(10.0).reshape(5, 2))
