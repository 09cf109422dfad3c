"""The LFW-style pair protocol: pair building, 10-fold accuracy, and the pipeline command."""

from __future__ import annotations

import math

import pytest
import torch

from facetag.metrics.verification import protocol_pairs, ten_fold_accuracy


def test_protocol_pairs_take_every_same_pair_and_as_many_different_ones():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # 3 + 1 same pairs
    i, j, same = protocol_pairs(labels, seed=0)
    assert int(same.sum()) == 4
    assert same.numel() == 8
    assert bool((i < j).all())
    assert {(int(a), int(b)) for a, b, s in zip(i, j, same, strict=True) if s} == {
        (0, 1),
        (0, 2),
        (1, 2),
        (3, 4),
    }
    assert all(labels[a] != labels[b] for a, b, s in zip(i, j, same, strict=True) if not s)
    again = protocol_pairs(labels, seed=0)
    assert torch.equal(again[0], i)  # fixed seed: the same pairs


def test_ten_fold_accuracy_of_separable_and_of_random_scores():
    same = torch.tensor([True] * 50 + [False] * 50)
    scores = torch.where(same, 0.9, 0.1) + torch.linspace(0, 0.05, 100)
    perfect = ten_fold_accuracy(scores, same)
    assert perfect.mean == 1.0
    assert all(0.15 < t < 0.9 for t in perfect.thresholds)
    g = torch.Generator().manual_seed(0)
    noise = ten_fold_accuracy(torch.rand(100, generator=g), same)
    assert 0.3 < noise.mean < 0.7


def test_a_pair_that_cannot_be_scored_counts_as_different():
    same = torch.tensor([True] * 10 + [False] * 10)
    scores = torch.where(same, 0.9, 0.1).double()
    scores[0] = -math.inf  # a photo without a face
    r = ten_fold_accuracy(scores, same)
    assert r.mean == pytest.approx(19 / 20)


def test_ten_fold_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"ten_fold_accuracy: expected scores and same"):
        ten_fold_accuracy(torch.zeros(5), torch.zeros(4, dtype=torch.bool))
