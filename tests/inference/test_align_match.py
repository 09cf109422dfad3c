"""Face crops (align) and the joint naming of the faces of one photo (match)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facetag.inference import match
from facetag.inference.align import crop_face, crop_faces, embed_crops, face_square
from facetag.inference.match import assign, person_distances


def test_face_square_expands_the_longer_side_around_the_centre():
    assert face_square([10, 20, 30, 60], margin=0.5) == (-10, 10, 50, 70)  # side 40 * 1.5


def test_face_square_rejects_negative_margin():
    with pytest.raises(ValueError, match="face_square: expected margin >= 0"):
        face_square([0, 0, 1, 1], margin=-0.1)


def test_crop_face_pads_outside_the_photo_with_grey():
    img = Image.new("RGB", (20, 20), (255, 0, 0))
    crop = crop_face(img, [0, 0, 10, 10], (20, 20), channels=3, margin=1.0)  # square -5..15
    assert crop.shape == (3, 20, 20)
    assert crop[:, 0, 0].tolist() == [128, 128, 128]  # above-left of the photo
    assert crop[:, 15, 15].tolist() == [255, 0, 0]  # inside it


def test_crop_face_whole_photo_matches_training_fit():
    from facetag.data.transforms import fit_image

    img = Image.fromarray(np.arange(92 * 112, dtype=np.uint8).reshape(112, 92) % 251)
    assert torch.equal(crop_face(img, None, (32, 32), 1), fit_image(img, (32, 32), 1))


def test_crop_faces_grey_batch_shape():
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    crops = crop_faces(img, [[0, 0, 20, 20], [30, 10, 60, 40]], (16, 12), channels=1)
    assert crops.shape == (2, 1, 16, 12)
    assert crops.dtype == torch.uint8
    assert crop_faces(img, [], (16, 12), 1).shape == (0, 1, 16, 12)


def test_embed_crops_rejects_float_input():
    with pytest.raises(ValueError, match="embed_crops: expected uint8 crops"):
        embed_crops(torch.nn.Identity(), torch.zeros(1, 3, 4, 4), 8, "cpu")


def test_person_distances_take_each_persons_nearest_photo():
    e = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])  # person 0 twice, person 1
    d = person_distances(e, g, torch.tensor([0, 0, 1]), 2, nearest=1)
    torch.testing.assert_close(d, torch.tensor([[0.0, 2.0]]))


def test_person_distances_average_all_of_a_persons_photos_but_one_up_to_three():
    angles = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 1.2, 0.4, 0.7, 0.6, 0.05, 1.5, 1.0])
    g = torch.stack([angles.cos(), angles.sin()], dim=1)  # (12, 2) unit vectors
    # person 0: 5 photos; 1: one; 2: none; 3: one; 4: three; 5: two
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 3, 4, 4, 4, 5, 5])
    d = person_distances(torch.tensor([[1.0, 0.0]]), g, labels, 6)  # (1, 6)
    dist = 1.0 - angles.cos()
    expected = [
        dist[[0, 2, 4]].mean(),  # the 3 nearest of 5
        dist[5],
        float("inf"),
        dist[6],
        dist[[9, 8]].mean(),  # 2 of 3: the odd one out (0.7 rad) left aside
        dist[11],  # 1 of 2: the nearest, as with one photo
    ]
    torch.testing.assert_close(d[0], torch.tensor(expected))
    # rows in any order, the same answer
    perm = torch.tensor([6, 3, 11, 0, 8, 5, 2, 10, 4, 1, 9, 7])
    torch.testing.assert_close(
        person_distances(torch.tensor([[1.0, 0.0]]), g[perm], labels[perm], 6), d
    )


def test_assign_gives_a_contested_person_to_the_closer_face():
    # Both faces are nearest to person 0; face 1 is closer, so it gets them.
    d = torch.tensor([[0.30, 0.90], [0.10, 0.95]])
    m = assign(d, threshold=0.5)
    assert [x.person for x in m] == [None, 0]
    assert m[1].distance == pytest.approx(0.10)
    assert m[0].distance == pytest.approx(0.30)  # its nearest person, though not given
    assert m[0].confidence == 0.0  # it was under the threshold: an uncertain unknown


def test_assign_moves_a_face_to_its_second_choice_when_that_is_best_overall():
    d = torch.tensor([[0.10, 0.20], [0.15, 0.90]])
    assert [x.person for x in assign(d, threshold=0.5)] == [1, 0]


def test_assign_threshold_makes_unknowns():
    d = torch.tensor([[0.49, 0.7], [0.8, 0.51]])
    m = assign(d, threshold=0.5)
    assert [x.person for x in m] == [0, None]
    assert m[0].confidence == pytest.approx(0.02)
    assert m[1].confidence == pytest.approx(0.02)
    assert assign(torch.tensor([[1.5]]), 0.5)[0].confidence == 1.0


def test_assign_confidence_is_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    for m in assign(torch.rand(6, 4, generator=g) * 2, threshold=0.6):
        assert 0.0 <= m.confidence <= 1.0
        assert not math.isnan(m.distance)


def test_assign_no_faces_and_bad_threshold():
    assert assign(torch.zeros(0, 3), 0.5) == []
    with pytest.raises(ValueError, match="assign: expected threshold > 0"):
        assign(torch.zeros(1, 1), 0.0)


def test_person_distances_in_row_blocks_equal_one_gather(monkeypatch):
    g = torch.Generator().manual_seed(0)
    faces = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    gallery = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (20,), generator=g)
    whole = person_distances(faces, gallery, labels, 6)
    monkeypatch.setattr(match, "GATHER_LIMIT", 1)  # one face at a time
    torch.testing.assert_close(person_distances(faces, gallery, labels, 6), whole)
