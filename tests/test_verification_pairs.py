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


def test_bcubed_of_a_perfect_a_merged_and_a_split_clustering():
    from facetag.metrics.verification import bcubed

    truth = [0, 0, 1, 1]
    assert bcubed(truth, ["a", "a", "b", "b"]) == (1.0, 1.0, 1.0)
    p, r, _ = bcubed(truth, ["a", "a", "a", "a"])  # everyone merged
    assert (p, r) == (0.5, 1.0)
    p, r, _ = bcubed(truth, ["a", "b", "c", "d"])  # everyone alone
    assert (p, r) == (1.0, 0.5)


def test_open_set_f1_counts_strangers_named_as_errors():
    from facetag.tune import _open_set_f1

    G = torch.eye(2)  # person 0 along x, person 1 along y
    probes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.141], [float("nan"), 0.0]])
    r = _open_set_f1(G, torch.tensor([0, 1]), probes, [0, 1, -1, 0], threshold=0.05)
    assert r["named"] == 3  # the stranger (row 2) is named person 0 wrongly
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)  # row 3: no face found


def test_score_pairs_euclidean_reports_distance_thresholds_for_raw_descriptors():
    from facetag.inference.verify import score_pairs

    # dlib-like raw descriptors: people 0.3 apart inside, 1.0 apart between; one photo lost
    base = torch.eye(3, 4, dtype=torch.float64) * 2.0
    vectors = torch.cat(
        [base[k] + torch.tensor([0.0, 0.0, 0.0, 0.3 * s]) for k in range(3) for s in (0, 1, 2)]
    ).reshape(9, 4)
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    r = score_pairs(vectors, labels, metric="euclidean")
    assert (r["pairs"], r["same_pairs"], r["no_face"]) == (18, 9, 0)
    assert (r["accuracy_10fold"], r["auc"]) == (1.0, 1.0)
    assert 0.6 < r["best_threshold"] < 2.8  # a Euclidean distance, not a similarity
    vectors[4] = float("nan")
    lost = score_pairs(vectors, labels, metric="euclidean")
    assert lost["no_face"] == 1
    assert lost["best_accuracy"] == pytest.approx(16 / 18)  # two same pairs with it: missed
