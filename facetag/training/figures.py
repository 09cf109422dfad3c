"""Figures and tables logged with a run: confusion matrix, curves, gradient health, mistakes, ROC.

matplotlib is imported inside the functions (it is slow to import and only training and
evaluation need it). Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas,
never through pyplot: no GUI backend, no global figure list to leak into. Save one with
``tracker.log_figure(fig, "figures/x.png")`` or ``fig.savefig(path)``.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from facetag.metrics.verification import roc_auc
from facetag.training.health import HEALTHY_UPDATE_RATIO, HealthSample

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAMED_TICKS_UP_TO = 50  # beyond this many people, tick labels are unreadable: plain heat-map
ANNOTATE_UP_TO = 20  # write the counts in the cells up to this many people


def confusion_matrix(true: Tensor, pred: Tensor, P: int) -> Tensor:
    """Counts (P, P) int64: row = true person, column = predicted person.

    true, pred: (M,) integer labels in [0, P).
    """
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(
            f"confusion_matrix: expected true and pred of the same shape (M,), got "
            f"{tuple(true.shape)} and {tuple(pred.shape)}"
        )
    for name, labels in (("true", true), ("pred", pred)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= P):
            raise ValueError(
                f"confusion_matrix: expected {name} labels in [0, {P}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
    flat = true.long() * P + pred.long()  # (M,) cell index row * P + column
    return torch.bincount(flat, minlength=P * P).view(P, P)  # (P, P)


def confusion_matrix_figure(
    matrix: Tensor, names: Sequence[str], *, title: str = "Confusion matrix"
) -> Figure:
    """Heat-map of a (P, P) count matrix, each row scaled to sum 1 (per-person recall).

    Up to 50 people the axes carry the names (and up to 20 the cells their counts);
    beyond, a plain heat-map: with ~400 people a mistake shows as an off-diagonal dot.
    """
    P = matrix.shape[0]
    if matrix.shape != (P, P) or len(names) != P:
        raise ValueError(
            f"confusion_matrix_figure: expected a (P, P) matrix and P names, got "
            f"{tuple(matrix.shape)} and {len(names)} names"
        )
    counts = matrix.double()
    rows = counts.sum(dim=1, keepdim=True).clamp(min=1)  # (P, 1); empty rows stay 0
    recall = (counts / rows).numpy()  # (P, P)
    accuracy = counts.trace().item() / max(counts.sum().item(), 1)
    side = min(4 + 0.22 * P, 14) if P <= NAMED_TICKS_UP_TO else 10
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot()
    image = ax.imshow(recall, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true person")
    ax.set_title(f"{title} (accuracy {accuracy:.2%}, {P} people)")
    if P <= NAMED_TICKS_UP_TO:
        size = max(5, min(9, 300 / max(P, 1)))
        labels = [_short(n, 18) for n in names]
        ax.set_xticks(range(P), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(P), labels, fontsize=size)
        ax.set_xlabel("predicted person")
        ax.set_ylabel("true person")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"predicted person (0..{P - 1}, names in per_person.csv)")
        ax.set_ylabel("true person")
    if P <= ANNOTATE_UP_TO:
        for i in range(P):
            for j in range(P):
                n = int(matrix[i, j])
                if n:
                    color = "black" if recall[i, j] > 0.5 else "white"
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    return fig


def curves_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    """Loss and accuracy per epoch, from one metrics dict per epoch.

    Keys containing "loss" go in the left panel, keys containing "acc" in the right
    (e.g. train_loss, val_loss | train_acc, val_acc); other keys are ignored.
    """
    keys = list(dict.fromkeys(k for epoch in history for k in epoch))
    panels = [
        ("loss", [k for k in keys if "loss" in k]),
        ("accuracy", [k for k in keys if "acc" in k]),
    ]
    if not any(found for _, found in panels):
        raise ValueError(
            f"curves_figure: expected metrics named *loss* or *acc*, got {keys or 'no epochs'}"
        )
    epochs = list(range(1, len(history) + 1))
    fig = _figure(11, 4)
    for i, (label, found) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for key in found:
            values = [float(epoch.get(key, math.nan)) for epoch in history]
            ax.plot(epochs, values, marker="o" if len(epochs) <= 30 else None, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if found:
            ax.legend()
    fig.tight_layout()
    return fig


def gradient_health_figure(samples: Sequence[HealthSample], title: str) -> Figure:
    """Every layer on one log-scale plot by depth (model order): the update ratio and the
    gradient norm, each the median over the sampled steps with a bar from the smallest to
    the largest, and the healthy update-ratio band (around 1e-3) shaded.

    Vanishing gradients show as early layers falling far below the band, exploding ones as
    norms climbing by decades towards the input.
    """
    layers = list(dict.fromkeys(k for sample in samples for k in sample.layers))
    if not layers:
        raise ValueError("gradient_health_figure: expected sampled steps, got none")
    depth = np.arange(len(layers))
    fig = _figure(max(7.0, 0.28 * len(layers) + 3), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    low, high = HEALTHY_UPDATE_RATIO
    ax.axhspan(low, high, color="tab:green", alpha=0.15, label="healthy update ratio")
    for index, (label, marker) in enumerate((("gradient norm", "s"), ("update ratio", "o"))):
        values = np.array(
            [[s.layers.get(k, (math.nan, math.nan))[index] for k in layers] for s in samples]
        )
        values = np.where(values > 0, values, np.nan)  # log scale: zeros are not drawn
        with warnings.catch_warnings():  # a layer no step reached is all NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mid = np.nanmedian(values, axis=0)
            lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        ax.errorbar(depth, mid, yerr=[mid - lo, hi - mid], fmt=marker, ms=4, capsize=2, label=label)
    ax.set_yscale("log")
    ax.set_xticks(depth)
    ax.set_xticklabels(layers, rotation=70, ha="right", fontsize=6)
    ax.set_xlabel("layer, input to output")
    ax.set_title(f"gradient health, {title} ({len(samples)} sampled steps)")
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def misclassified_grid(
    images: Tensor,
    true_names: Sequence[str],
    pred_names: Sequence[str],
    *,
    max_images: int = 64,
    columns: int = 8,
) -> Figure:
    """A grid of misclassified faces, each titled with the true and the predicted name.

    images: (N, C, H, W), C = 1 or 3, any range (each face is scaled to its own
    min..max for display); the first ``max_images`` are shown.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"misclassified_grid: expected images of shape (N, 1 or 3, H, W), got "
            f"{tuple(images.shape)}"
        )
    N = images.shape[0]
    if len(true_names) != N or len(pred_names) != N:
        raise ValueError(
            f"misclassified_grid: expected {N} true and predicted names, got "
            f"{len(true_names)} and {len(pred_names)}"
        )
    shown = min(N, max_images)
    if shown == 0:
        fig = _figure(4, 1.5)
        fig.text(0.5, 0.5, "no misclassified faces", ha="center", va="center")
        return fig
    # One mosaic image and one imshow: a subplot per face made a 64-face grid take seconds.
    x = images[:shown].detach().float().cpu()  # (n, C, H, W)
    low = x.amin(dim=(1, 2, 3), keepdim=True)  # (n, 1, 1, 1)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    x = ((x - low) / (high - low).clamp(min=1e-8)).expand(-1, 3, -1, -1)  # (n, 3, H, W) in [0, 1]
    _, _, H, W = x.shape
    cols = min(columns, shown)
    rows = math.ceil(shown / cols)
    band = max(16, H // 3)  # white strip above each face for its two-line label
    cell_h, cell_w = band + H + 2, W + 2  # 1 px margin on each side
    mosaic = torch.ones(rows * cell_h, cols * cell_w, 3)  # (rows*cell_h, cols*cell_w, 3) white
    for k in range(shown):
        top, left = (k // cols) * cell_h + band + 1, (k % cols) * cell_w + 1
        mosaic[top : top + H, left : left + W] = x[k].permute(1, 2, 0)  # (H, W, 3)
    cell_inches = 1.4
    fig = _figure(cols * cell_inches, rows * cell_inches * cell_h / cell_w + 0.4)
    ax = fig.add_axes((0, 0, 1, 0.94 if rows > 1 else 0.85))
    ax.imshow(mosaic.numpy(), interpolation="nearest")
    ax.axis("off")
    for k in range(shown):
        x_mid, y_band = (k % cols + 0.5) * cell_w, (k // cols) * cell_h + band / 2
        label = f"{_short(true_names[k], 14)}\n-> {_short(pred_names[k], 14)}"
        ax.text(x_mid, y_band, label, ha="center", va="center", fontsize=6)
    what = f"first {shown} of {N}" if shown < N else f"{N}"
    fig.suptitle(f"{what} misclassified faces (true -> predicted)", fontsize=9)
    return fig


def per_person_accuracy_csv(true: Tensor, pred: Tensor, names: Sequence[str]) -> str:
    """CSV text, worst person first: person, images, correct, accuracy, most_confused_with.

    true, pred: (M,) labels in [0, P) with P = len(names). A person without test images
    gets an empty accuracy.
    """
    P = len(names)
    matrix = confusion_matrix(true, pred, P)  # (P, P)
    images = matrix.sum(dim=1)  # (P,)
    correct = matrix.diagonal()  # (P,)
    wrong = matrix - torch.diag(correct)  # (P, P) off-diagonal only
    rows = []
    for p in range(P):
        n = int(images[p])
        accuracy = int(correct[p]) / n if n else math.nan
        confused = ""
        if int(wrong[p].max()) > 0:
            confused = names[int(wrong[p].argmax())]
        rows.append((accuracy, names[p], n, int(correct[p]), confused))
    rows.sort(key=lambda r: (math.inf if math.isnan(r[0]) else r[0], r[1]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["person", "images", "correct", "accuracy", "most_confused_with"])
    for accuracy, name, n, ok, confused in rows:
        writer.writerow([name, n, ok, "" if math.isnan(accuracy) else f"{accuracy:.4f}", confused])
    return out.getvalue()


def roc_figure(
    fpr: Tensor,
    tpr: Tensor,
    *,
    operating_point: tuple[float, float, float] | None = None,
    title: str = "Verification ROC",
) -> Figure:
    """The ROC curve with its AUC; ``operating_point`` = (fpr, tpr, threshold) is marked.

    The false-positive axis is logarithmic in a second panel, where a face tagger works
    (a stranger tagged as a friend is the costly mistake).
    """
    fig = _figure(11, 4.5)
    auc = roc_auc(fpr, tpr)
    for i, log_scale in enumerate((False, True)):
        ax = fig.add_subplot(1, 2, i + 1)
        x, y = fpr.numpy(), tpr.numpy()
        if log_scale:
            keep = x > 0  # log axis: drop the (0, 0) start
            x, y = x[keep], y[keep]
            ax.set_xscale("log")
        ax.plot(x, y, label=f"AUC {auc:.4f}")
        if not log_scale:
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        if operating_point is not None:
            f, t, threshold = operating_point
            if f > 0 or not log_scale:
                ax.plot([f], [t], "o", color="red", label=f"threshold {threshold:.3f}")
        ax.set_xlabel("false positive rate (different people accepted)")
        ax.set_ylabel("true positive rate (same person accepted)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself: savefig renders with Agg, no GUI backend
    return fig


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
