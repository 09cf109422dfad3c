"""Patch sampling: exact crops, IoU labels, jitter around faces, offsets that invert, flips."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facetag.data.boxes import FaceBox
from facetag.data.patches import (
    NEG,
    PART,
    POS,
    PatchSet,
    balance,
    box_offsets,
    crop_windows,
    halvings,
    label_windows,
    patches_from_windows,
    random_windows,
)
from facetag.metrics.ap import iou_matrix
from facetag.models.detector import regress, square
from facetag.training.detector_losses import augment


def test_crop_windows_native_size_is_exact():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 50), generator=g).float()
    windows = torch.tensor([[5.0, 7.0, 17.0, 19.0], [30.0, 0.0, 42.0, 12.0]])
    crops = crop_windows(image, windows, 12)
    assert crops.shape == (2, 3, 12, 12)
    torch.testing.assert_close(crops[0], image[:, 7:19, 5:17])
    torch.testing.assert_close(crops[1], image[:, 0:12, 30:42])


def test_crop_windows_averages_when_shrinking_and_pads_with_black():
    image = torch.zeros(3, 8, 8)
    image[:, ::2, ::2] = 4.0  # one bright pixel in every 2x2 block: mean 1
    crops = crop_windows(image, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), 4)
    torch.testing.assert_close(crops, torch.ones(1, 3, 4, 4))
    # roi_align reads the border pixel up to 1 px outside the image, black beyond
    outside = crop_windows(torch.full((3, 8, 8), 9.0), torch.tensor([[-12.0, 0.0, -4.0, 8.0]]), 4)
    assert outside.abs().max() == 0


def test_label_windows_by_iou():
    faces = [FaceBox(0, 0, 10, 10), FaceBox(100, 100, 10, 10, invalid=True)]
    windows = np.array(
        [
            [0, 0, 10, 10],  # IoU 1 -> positive
            [2, 2, 12, 12],  # IoU 64/136 = 0.47 -> part
            [5, 0, 15, 10],  # IoU 1/3 -> in between: unused
            [50, 50, 60, 60],  # far -> negative
            [100, 100, 110, 110],  # the invalid face: neither positive nor negative
        ],
        dtype=float,
    )
    labels, offsets = label_windows(windows, faces)
    assert labels.tolist() == [POS, PART, -1, NEG, -1]
    np.testing.assert_allclose(offsets[1], [-0.2, -0.2, -0.2, -0.2])
    np.testing.assert_allclose(offsets[3], 0)


def test_offsets_and_regress_invert_each_other():
    rng = np.random.default_rng(0)
    windows = square(torch.from_numpy(rng.uniform(0, 100, (20, 4))).sort(dim=1).values)
    boxes = windows + torch.from_numpy(rng.normal(0, 3, (20, 4)))
    offsets = torch.from_numpy(box_offsets(windows.numpy(), boxes.numpy()))
    torch.testing.assert_close(regress(windows, offsets), boxes)


def test_random_windows_cover_every_label():
    rng = np.random.default_rng(0)
    faces = [FaceBox(40, 30, 40, 52), FaceBox(150, 60, 8, 9)]  # the second is too small
    windows = random_windows(
        faces,
        200,
        160,
        rng,
        min_face=12,
        jitter_per_face=40,
        negatives=30,
        near_negatives_per_face=5,
        min_side=12,
    )
    assert windows.shape == (40 + 5 + 30, 4)  # no windows around the too-small face
    np.testing.assert_allclose(windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1])
    labels, _ = label_windows(windows, faces)
    counts = {k: int((labels == k).sum()) for k in (POS, PART, NEG)}
    assert min(counts.values()) > 0, counts
    negatives = windows[labels == NEG]
    boxes = np.array([f.xyxy for f in faces])
    assert iou_matrix(negatives, boxes).max() < 0.3


def test_patches_from_windows_and_balance():
    rng = np.random.default_rng(0)
    image = torch.rand(3, 120, 160) * 255
    faces = [FaceBox(40, 30, 40, 48)]
    windows = random_windows(
        faces,
        160,
        120,
        rng,
        min_face=12,
        jitter_per_face=30,
        negatives=40,
        near_negatives_per_face=4,
        min_side=12,
    )
    patches = patches_from_windows(image, windows, faces, 24)
    assert patches.images.dtype == torch.uint8
    assert patches.images.shape[1:] == (3, 24, 24)
    assert len(patches) == int((label_windows(windows, faces)[0] >= 0).sum())
    small = balance(patches, rng, {NEG: 5, POS: 3})
    assert small.counts()["negative"] == 5
    assert small.counts()["positive"] == min(3, patches.counts()["positive"])
    assert len(PatchSet.cat([small, PatchSet.empty(24)])) == len(small)


def test_augment_flip_mirrors_offsets():
    g = torch.Generator().manual_seed(1)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    offsets = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    flipped_any = False
    for _ in range(10):
        _, out, _ = augment(x, offsets, g)
        for row in out:
            if torch.allclose(row, torch.tensor([-0.3, 0.2, -0.1, 0.4])):
                flipped_any = True
            else:
                torch.testing.assert_close(row, offsets[0])
    assert flipped_any


@pytest.mark.parametrize("size", [12, 24, 48])
def test_crop_size_matches_stage(size):
    image = torch.rand(3, 64, 64) * 255
    assert crop_windows(image, torch.tensor([[3.0, 4.0, 40.0, 41.0]]), size).shape == (
        1,
        3,
        size,
        size,
    )


@pytest.mark.parametrize(("H", "W"), [(37, 50), (64, 31), (2, 3)])
def test_halvings_equal_avg_pool_bit_for_bit(H, W):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, H, W), generator=g).float()
    image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # a photo's (H, W, C) memory
    levels = halvings(image)
    expected = [image]
    while len(expected) < 4 and min(expected[-1].shape[1:]) >= 2:
        expected.append(F.avg_pool2d(expected[-1][None], 2)[0])
    assert len(levels) == len(expected)
    for got, want in zip(levels, expected, strict=True):
        assert torch.equal(got, want)
