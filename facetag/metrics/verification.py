"""Verification metrics: how well an embedding tells same-person pairs from different ones.

Pure functions of pair scores (cosine similarities) and same-person flags: the ROC, AUC,
EER, TAR at a false accept rate, the best-accuracy threshold, and the 10-fold accuracy of
the LFW protocol (a threshold chosen on nine folds, measured on the tenth). Training
(facetag evaluate) and inference (facetag evaluate --pairs) both read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from facetag.errors import DataError

FARS = {"1e-2": 1e-2, "1e-3": 1e-3}  # false accept rates reported, by the name results use
DEFAULT_FAR = "1e-3"  # the stored threshold's FAR when measurable (see the module doc)


@dataclass(frozen=True)
class OperatingPoint:
    """One point of the ROC and the distance threshold that gives it."""

    far: float  # share of different-person pairs accepted (FPR)
    tar: float  # share of same-person pairs accepted (TPR)
    threshold: float  # cosine distance: accept a pair when 1 - cos < threshold


@dataclass(frozen=True)
class Verification:
    """Open-set verification over M face pairs: the ROC and what is read off it."""

    fpr: Tensor  # (T + 1,) float64, ROC point i accepts similarity >= similarity[i]
    tpr: Tensor  # (T + 1,)
    similarity: Tensor  # (T + 1,) cosine similarity at each point, +inf at point 0
    distance: Tensor  # (T + 1,) the distance threshold giving each point (see distance_cuts)
    genuine: int  # same-person pairs
    impostor: int  # different-person pairs
    auc: float
    eer: float  # where FAR == FRR (1 - TAR), linearly interpolated between ROC points
    at_far: dict[str, OperatingPoint | None]  # by FARS name; None when not measurable
    best: OperatingPoint  # the point with the highest pair accuracy
    best_accuracy: float

    @property
    def pairs(self) -> int:
        return self.genuine + self.impostor


def roc_curve(scores: Tensor, same: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ROC of a verification score: (fpr, tpr, thresholds), each (T + 1,), float64.

    scores: (M,) similarity of M face pairs, higher = more alike; same: (M,) bool, True
    for pairs of the same person. Point i accepts pairs with score >= thresholds[i];
    point 0 is (0, 0) at threshold +inf. Tied scores form one point (as sklearn's
    roc_curve with drop_intermediate=False).
    """
    if scores.ndim != 1 or same.shape != scores.shape:
        raise ValueError(
            f"roc_curve: expected scores and same of one shape (M,), got "
            f"{tuple(scores.shape)} and {tuple(same.shape)}"
        )
    positives = int(same.sum())
    negatives = same.numel() - positives
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"roc_curve: expected both same-person and different-person pairs, got "
            f"{positives} and {negatives}"
        )
    order = torch.argsort(scores, descending=True, stable=True)
    s = scores[order].double()  # (M,) high to low
    y = same[order].double()  # (M,)
    tp = torch.cumsum(y, 0)  # (M,) accepted same-person pairs at each cut
    fp = torch.cumsum(1 - y, 0)
    # A threshold accepts all pairs with a tied score at once: keep the last of each run.
    last = torch.cat([torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([s.numel() - 1])])
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fp[last] / negatives])  # (T + 1,)
    tpr = torch.cat([zero, tp[last] / positives])
    thresholds = torch.cat([torch.full((1,), math.inf, dtype=torch.float64), s[last]])
    return fpr, tpr, thresholds


def roc_auc(fpr: Tensor, tpr: Tensor) -> float:
    """Area under the ROC curve (trapezoids)."""
    return float(torch.trapezoid(tpr, fpr))


def pair_scores(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine similarity and same-person flag of every pair i < j: (M,) float64, (M,) bool.

    embeddings (N, D) L2-normalised, labels (N,); M = N (N - 1) / 2, pairs in row order
    (0, 1), (0, 2), ..., (1, 2), ...
    """
    N = embeddings.shape[0]
    if embeddings.ndim != 2 or labels.shape != (N,):
        raise ValueError(
            f"pair_scores: expected embeddings (N, D) and labels (N,), got "
            f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    e = embeddings.double()
    # NOTE: the (N, N) matrix, then the upper triangle: gathering row pairs first would
    # hold (M, D) tensors, D times more memory (~1 GB each for 1,500 test images).
    sim = e @ e.T  # (N, N)
    i, j = torch.triu_indices(N, N, offset=1)  # (M,) each
    return sim[i, j], labels[i] == labels[j]  # (M,), (M,)


def distance_cuts(similarity: Tensor) -> Tensor:
    """The distance threshold of each ROC point: (T + 1,) float64 from roc_curve's thresholds.

    Point i (i >= 1) accepts the pairs with similarity >= similarity[i], i.e. with distance
    d <= d_i = 1 - similarity[i]. Its cut is halfway between d_i and the next observed
    distance d_{i+1}, so ``d < cut`` and ``d <= cut`` accept the same pairs. Point 0
    (accept nothing) cuts below the smallest distance; the last point (accept all) above
    the largest and at least at 2, the largest distance two unit vectors can have.
    """
    d = 1.0 - similarity[1:].double()  # (T,) ascending
    low = torch.cat([d[:1].clamp(max=0.0) - 1e-6, d])  # (T + 1,) accepted up to here
    high = torch.cat([d, d[-1:].clamp(min=2.0) + 1e-6])  # (T + 1,) rejected from here
    return (low + high) / 2


def equal_error_rate(fpr: Tensor, tpr: Tensor) -> float:
    """The rate where FAR (fpr) equals FRR (1 - tpr), interpolated between ROC points.

    fpr, tpr: (T + 1,) from roc_curve, starting at (0, 0) and ending at (1, 1). Between
    two points both rates move linearly, so the crossing of FAR - FRR with 0 is exact.
    """
    diff = fpr - (1.0 - tpr)  # (T + 1,) from -1 (accept nothing) up to +1 (accept all)
    i = int(torch.nonzero(diff >= 0)[0])  # the first point where FAR >= FRR
    if i == 0:  # only when the curve does not start at (0, 0)
        return float(fpr[0])
    t = float(-diff[i - 1] / (diff[i] - diff[i - 1]))
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def impostors_needed(far: float) -> int:
    """Different-person pairs needed to measure FAR ``far``: one false accept is 1/n."""
    return math.ceil(1.0 / far - 1e-9)


def verify(scores: Tensor, same: Tensor) -> Verification:
    """ROC, AUC, EER, TAR at each FAR of FARS and the best-accuracy threshold.

    scores (M,) cosine similarities, same (M,) bool. TAR at FAR f is the highest TAR of
    a point with FAR <= f (at the strictest threshold reaching it), or None with fewer
    than 1/f different-person pairs (the FAR could not be told from 0). Raises DataError
    without both kinds of pair.
    """
    genuine = int(same.sum())
    impostor = same.numel() - genuine
    if genuine == 0 or impostor == 0:
        raise DataError(
            f"verification: expected same-person and different-person pairs, got {genuine} "
            f"and {impostor}; use test images of at least 2 people, 2 or more each"
        )
    fpr, tpr, similarity = roc_curve(scores, same)  # each (T + 1,)
    cuts = distance_cuts(similarity)

    def point(i: int) -> OperatingPoint:
        return OperatingPoint(float(fpr[i]), float(tpr[i]), float(cuts[i]))

    at_far: dict[str, OperatingPoint | None] = {}
    for name, far in FARS.items():
        if impostor < impostors_needed(far):
            at_far[name] = None
            continue
        # The highest TAR within the FAR, at its strictest threshold: as long as TAR stays
        # the same, a looser threshold only adds false accepts. Point 0 (FAR 0) is always in.
        tar = torch.where(fpr <= far + 1e-12, tpr, -1.0)  # (T + 1,)
        at_far[name] = point(int(torch.argmax(tar)))  # argmax: the first of equal maxima
    accuracy = (tpr * genuine + (1.0 - fpr) * impostor) / (genuine + impostor)  # (T + 1,)
    best = int(torch.argmax(accuracy))  # the first maximum: the strictest threshold
    return Verification(
        fpr=fpr,
        tpr=tpr,
        similarity=similarity,
        distance=cuts,
        genuine=genuine,
        impostor=impostor,
        auc=roc_auc(fpr, tpr),
        eer=equal_error_rate(fpr, tpr),
        at_far=at_far,
        best=point(best),
        best_accuracy=float(accuracy[best]),
    )


def choose_threshold(v: Verification, far: str = DEFAULT_FAR) -> tuple[str, OperatingPoint]:
    """(rule, point) tagging should use: the FAR ``far`` (a FARS name) when measurable,
    else best accuracy."""
    if far not in FARS:
        raise ValueError(f"choose_threshold: expected far in {sorted(FARS)}, got {far!r}")
    at = v.at_far.get(far)
    if at is not None:
        return f"far{far}", at
    return "best_accuracy", v.best


def protocol_pairs(labels: Tensor, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs of the verification protocol over N faces with person labels (N,): every
    same-person pair, and as many different-person pairs drawn without repeats with
    ``seed``. Returns (i (M,), j (M,), same (M,) bool), i < j, same pairs first."""
    N = labels.shape[0]
    i, j = torch.triu_indices(N, N, offset=1)  # every pair once
    same = labels[i] == labels[j]
    g = torch.Generator().manual_seed(seed)
    different = torch.nonzero(~same).flatten()
    n = min(int(same.sum()), different.numel())
    pick = different[torch.randperm(different.numel(), generator=g)[:n]]
    keep = torch.cat([torch.nonzero(same).flatten(), pick.sort().values])
    return i[keep], j[keep], same[keep]


@dataclass(frozen=True)
class FoldAccuracy:
    mean: float  # mean accuracy over the folds
    std: float
    thresholds: list[float]  # the similarity threshold each fold was measured at


def ten_fold_accuracy(scores: Tensor, same: Tensor, folds: int = 10, seed: int = 0) -> FoldAccuracy:
    """LFW's verification accuracy: the pairs in ``folds`` random folds (seed); for each,
    the similarity threshold with the best accuracy on the other folds is applied to it.

    scores (M,) similarities (higher: more alike; -inf for a pair that could not be
    scored), same (M,) bool. A threshold t accepts score >= t; candidates are the scores
    themselves and +inf (accept none).
    """
    if scores.shape != same.shape or scores.ndim != 1 or scores.numel() < folds:
        raise ValueError(
            f"ten_fold_accuracy: expected scores and same of one shape (M,), M >= {folds}, "
            f"got {tuple(scores.shape)} and {tuple(same.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    fold = torch.randperm(scores.numel(), generator=g) % folds  # (M,) the fold of each pair
    s, y = scores.double(), same
    accs, ts = [], []
    for k in range(folds):
        train, test = fold != k, fold == k
        t = _best_threshold(s[train], y[train])
        accs.append(float(((s[test] >= t) == y[test]).double().mean()))
        ts.append(t)
    acc = torch.tensor(accs, dtype=torch.float64)
    return FoldAccuracy(float(acc.mean()), float(acc.std(unbiased=False)), ts)


def _best_threshold(s: Tensor, y: Tensor) -> float:
    """The score threshold with the highest accuracy on (s, y): sorted once, the accuracy
    of accepting the top k pairs for every k, the first best (the strictest)."""
    order = torch.argsort(s, descending=True, stable=True)
    ys = y[order].double()
    tp = torch.cumsum(ys, 0)  # same-person pairs accepted when the top k are
    tn = (1 - ys).sum() - torch.cumsum(1 - ys, 0)  # different pairs still rejected
    acc = torch.cat([(1 - ys).sum().view(1), tp + tn])  # k = 0 .. M
    k = int(torch.argmax(acc))
    if k == 0:
        return math.inf
    ss = s[order]
    # Between the k-th score and the next: accepts exactly the top k (ties stay together
    # only when they are equal, where the k-th and next coincide and both are accepted).
    return float(ss[k - 1]) if k == ss.numel() else float((ss[k - 1] + ss[k]) / 2)


def bcubed(truth: list[int], clusters: list[str]) -> tuple[float, float, float]:
    """BCubed precision, recall and F of a clustering: for each item, the share of its
    cluster that has its label (precision) and the share of its label in its cluster
    (recall), averaged over items; F = 2PR / (P + R) (Amigo et al. 2009)."""
    if len(truth) != len(clusters) or not truth:
        raise ValueError(
            f"bcubed: expected equal, non-empty lists, got {len(truth)}, {len(clusters)}"
        )
    from collections import Counter

    pair = Counter(zip(clusters, truth, strict=True))
    size = Counter(clusters)
    label = Counter(truth)
    P = sum(pair[(c, t)] / size[c] for c, t in zip(clusters, truth, strict=True)) / len(truth)
    R = sum(pair[(c, t)] / label[t] for c, t in zip(clusters, truth, strict=True)) / len(truth)
    return P, R, (2 * P * R / (P + R) if P + R else 0.0)
