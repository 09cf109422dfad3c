"""Naming the faces of one photo: distances to the enrolled people, then a joint assignment.

Distances are cosine distances 1 - <a, b> between L2-normalised embeddings, in [0, 2]; a
person's distance to a face is the mean over that person's k nearest gallery photos, with
k = n - 1 for a person of n photos, at least 1 and at most NEAREST_K: a face must look like
all of a person's photos but one (an old or odd photo may differ), up to three of them.
With the single nearest photo, every photo a user adds is one more chance for a stranger
to fall under the threshold: on LFW, people enrolled with 5 photos each and strangers
mixed in, naming precision was 0.53 (A-M) and 0.75 (N-Z) with the nearest photo and 0.79
and 0.93 with this rule at the same recall (experiments/LOG.md; chosen on A-M). One or
two photos a person: the nearest one, as before.

Confidence, in [0, 1], says how far the distance is from the threshold t, in units of t:
a named face has (t - d) / t (1 for d = 0, 0 at the threshold); an unknown face has
min(1, (d - t) / t) with d its nearest person's distance (1 from d = 2t on), and 0 when
that person was under the threshold but went to a closer face of the same photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

_BIG = 1e6  # cost of an assignment that is not allowed (a person over the threshold)
NEAREST_K = 3  # at most this many of a person's photos are averaged over
GATHER_LIMIT = 1 << 24  # distances gathered at once in person_distances (64 MiB of float32)


@dataclass(frozen=True)
class Match:
    person: int | None  # index into the gallery's names(), None = unknown
    distance: float  # to the person given, or to the nearest person for an unknown face
    confidence: float  # in [0, 1], see the module docstring


def person_distances(
    embeddings: Tensor, gallery: Tensor, labels: Tensor, P: int, nearest: int = NEAREST_K
) -> Tensor:
    """Faces (K, D), gallery (M, D) with labels (M,) in [0, P) -> distances (K, P).

    d[k, p] = mean of the k_p smallest 1 - <e_k, g_m> (cosine distances) over person p's
    n_p gallery rows m, k_p = max(1, min(nearest, n_p - 1)) (module doc); inf for a
    person without rows.
    """
    K, M = embeddings.shape[0], gallery.shape[0]
    dist = (1.0 - embeddings @ gallery.T).clamp_(0.0, 2.0)  # (K, M)
    if M == 0 or P == 0:
        return torch.full((K, P), float("inf"))
    # Each person's rows side by side, padded with inf: (P, n_max) column indices.
    order = torch.argsort(labels, stable=True)  # rows grouped by person
    counts = torch.bincount(labels, minlength=P)  # (P,)
    starts = torch.cumsum(counts, 0) - counts  # (P,)
    n_max = int(counts.max())
    slot = torch.arange(n_max)  # (n_max,)
    valid = slot[None, :] < counts[:, None]  # (P, n_max)
    cols = order[(starts[:, None] + slot[None, :]).clamp(max=M - 1)]  # (P, n_max)
    k = max(1, min(nearest, n_max - 1))
    used = (counts - 1).clamp(min=1, max=k)  # (P,) k_p
    take = torch.arange(k)[None, :] < used[:, None]  # (P, k): each person's k_p nearest
    total = dist.new_empty(K, P)
    rows = max(1, GATHER_LIMIT // (P * n_max))  # faces at a time: (rows, P, n_max) bounded
    for i in range(0, K, rows):
        padded = dist[i : i + rows, cols].masked_fill_(~valid, float("inf"))  # (r, P, n_max)
        near = padded.topk(k, dim=2, largest=False).values  # (r, P, k), ascending
        total[i : i + rows] = near.masked_fill_(~take, 0.0).sum(dim=2)  # (r, P)
    return torch.where(counts > 0, total / used.to(dist.dtype), float("inf"))  # (K, P)


def assign(distances: Tensor, threshold: float) -> list[Match]:
    """Jointly name the K faces of one photo from distances (K, P).

    Minimum-cost assignment (Hungarian, scipy) over a (K, P + K) cost matrix: face k to
    person p costs d[k, p] - t when d[k, p] < t (forbidden otherwise) and to its own
    "unknown" column 0. So every face gets at most one person, a person at most one
    face, a face is only named under the threshold, and when two faces are nearest to the
    same person the assignment with the smaller total distance wins: the closer face
    gets the person unless the other face has no better option at all.
    """
    if threshold <= 0:
        raise ValueError(f"assign: expected threshold > 0, got {threshold}")
    K, P = distances.shape
    if K == 0:
        return []
    d = distances.double().numpy()
    cost = np.zeros((K, P + K))
    cost[:, :P] = np.where(d < threshold, d - threshold, _BIG)
    rows, cols = linear_sum_assignment(cost)
    nearest = d.min(axis=1) if P else np.full(K, np.inf)
    out: list[Match] = []
    for k, c in sorted(zip(rows.tolist(), cols.tolist(), strict=True)):
        if c < P and d[k, c] < threshold:
            dist = float(d[k, c])
            out.append(Match(int(c), dist, (threshold - dist) / threshold))
        else:
            near = float(nearest[k])
            conf = 0.0 if near < threshold else min(1.0, (near - threshold) / threshold)
            out.append(Match(None, near, conf))
    return out


def exclude_rejected(
    distances: Tensor, embeddings: Tensor, rejected: Tensor, persons: Tensor, radius: float
) -> Tensor:
    """Distances (K, P) with person p ruled out (inf) for every face within ``radius``
    (cosine distance) of a face a user said is not p: faces (K, D), rejected (R, D) with
    their persons (R,) (-1: not enrolled any more). The same mistake is not made twice."""
    if rejected.numel() == 0 or distances.numel() == 0:
        return distances
    near = (1.0 - embeddings @ rejected.T) < radius  # (K, R)
    out = distances.clone()
    for r in range(rejected.shape[0]):
        p = int(persons[r])
        if p >= 0:
            out[near[:, r], p] = float("inf")
    return out
