"""Figures and tables for a run: they render, and their numbers are right."""

import csv
import io
import math

import numpy as np
import pytest
import torch

from facetag.metrics.verification import roc_auc, roc_curve
from facetag.training.figures import (
    confusion_matrix,
    confusion_matrix_figure,
    curves_figure,
    misclassified_grid,
    per_person_accuracy_csv,
    roc_figure,
)

PNG = b"\x89PNG\r\n\x1a\n"


def png_bytes(fig) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def test_confusion_matrix_counts():
    true = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert torch.equal(confusion_matrix(true, pred, 3), expected)


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(
        ValueError, match=r"expected pred labels in \[0, 3\), got values in \[0, 3\]"
    ):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match=r"expected true and pred of the same shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


@pytest.mark.parametrize("P", [3, 40, 400])
def test_confusion_matrix_figure_renders_for_small_and_large_P(P):
    g = torch.Generator().manual_seed(0)
    true = torch.arange(P).repeat(3)
    pred = torch.where(
        torch.rand(3 * P, generator=g) < 0.9, true, torch.randint(0, P, (3 * P,), generator=g)
    )
    names = [f"person {i}" for i in range(P)]
    fig = confusion_matrix_figure(confusion_matrix(true, pred, P), names)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    if P <= 50:
        assert labels == names
    else:
        assert labels == []
    assert "people" in ax.get_title()
    assert png_bytes(fig).startswith(PNG)


def test_confusion_matrix_figure_rejects_mismatched_names():
    with pytest.raises(
        ValueError, match=r"expected a \(P, P\) matrix and P names, got \(2, 2\) and 3"
    ):
        confusion_matrix_figure(torch.eye(2, dtype=torch.long), ["a", "b", "c"])


def test_curves_figure_splits_loss_and_accuracy():
    history = [
        {"train_loss": 2.0, "val_loss": 2.2, "train_acc": 0.3, "val_acc": 0.25, "lr": 0.1},
        {"train_loss": 1.0, "val_loss": 1.3, "train_acc": 0.7, "val_acc": 0.6, "lr": 0.05},
    ]
    fig = curves_figure(history)
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train_loss", "val_loss"]
    assert [line.get_label() for line in acc_ax.get_lines()] == ["train_acc", "val_acc"]
    assert list(acc_ax.get_lines()[1].get_ydata()) == [0.25, 0.6]
    assert list(acc_ax.get_lines()[1].get_xdata()) == [1, 2]
    assert png_bytes(fig).startswith(PNG)


def test_curves_figure_rejects_history_without_loss_or_accuracy():
    with pytest.raises(
        ValueError, match=r"expected metrics named \*loss\* or \*acc\*, got \['lr'\]"
    ):
        curves_figure([{"lr": 0.1}])


@pytest.mark.parametrize(("N", "C"), [(0, 1), (5, 1), (70, 3)])
def test_misclassified_grid_renders(N, C):
    images = torch.randn(N, C, 16, 12)
    true = [f"true {i}" for i in range(N)]
    pred = [f"a very long predicted name {i}" for i in range(N)]
    fig = misclassified_grid(images, true, pred, max_images=64)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(labels) == min(N, 64)
    if N:
        assert labels[0] == "true 0\n-> a very long p…"  # names cut to 14 characters
        mosaic = fig.axes[0].get_images()[0].get_array()
        assert 0 <= mosaic.min() <= mosaic.max() <= 1
    assert png_bytes(fig).startswith(PNG)


def test_misclassified_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1 or 3, H, W\)"):
        misclassified_grid(torch.zeros(2, 16, 16), ["a", "b"], ["b", "a"])
    with pytest.raises(ValueError, match=r"expected 2 true and predicted names, got 1 and 2"):
        misclassified_grid(torch.zeros(2, 1, 8, 8), ["a"], ["b", "a"])


def test_per_person_accuracy_csv_worst_first():
    names = ["Ann", "Bob, Jr.", "Cy", "Dee"]
    true = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 2, 2, 1])  # Dee has no test images
    rows = list(csv.DictReader(io.StringIO(per_person_accuracy_csv(true, pred, names))))
    assert [r["person"] for r in rows] == ["Bob, Jr.", "Cy", "Ann", "Dee"]
    bob = rows[0]
    assert (bob["images"], bob["correct"], bob["accuracy"]) == ("3", "1", "0.3333")
    assert bob["most_confused_with"] == "Cy"
    assert rows[2]["most_confused_with"] == ""
    assert rows[3]["accuracy"] == ""


def test_roc_curve_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    same = torch.rand(300, generator=g) < 0.3
    scores = torch.randn(300, generator=g) + same.double() * 1.5
    scores = (scores * 4).round() / 4  # ties, which must collapse into one point each
    fpr, tpr, thresholds = roc_curve(scores, same)
    ref_fpr, ref_tpr, ref_thr = metrics.roc_curve(
        same.numpy(), scores.numpy(), drop_intermediate=False
    )
    np.testing.assert_allclose(fpr.numpy(), ref_fpr)
    np.testing.assert_allclose(tpr.numpy(), ref_tpr)
    np.testing.assert_allclose(thresholds[1:].numpy(), ref_thr[1:])
    assert thresholds[0] == math.inf
    assert roc_auc(fpr, tpr) == pytest.approx(metrics.roc_auc_score(same.numpy(), scores.numpy()))


def test_roc_curve_perfect_and_rejects_one_class():
    fpr, tpr, _ = roc_curve(
        torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([True, True, False, False])
    )
    assert roc_auc(fpr, tpr) == 1.0
    with pytest.raises(ValueError, match=r"expected both same-person and different-person pairs"):
        roc_curve(torch.tensor([0.9, 0.8]), torch.tensor([True, True]))


def test_roc_figure_marks_operating_point():
    fpr, tpr, _ = roc_curve(
        torch.tensor([0.9, 0.7, 0.6, 0.1]), torch.tensor([True, False, True, False])
    )
    fig = roc_figure(fpr, tpr, operating_point=(0.5, 1.0, 0.6))
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "threshold 0.600" in labels
    assert any(label.startswith("AUC 0.75") for label in labels)
    assert png_bytes(fig).startswith(PNG)
