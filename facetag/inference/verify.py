"""``facetag evaluate --pairs``: face verification through the whole pipeline, on people no
training saw (LFW N-Z).

    ROOT/<person>/*.jpg, people whose folder names start with a letter in ``people``
      -> detect (the largest face of each photo) -> align / crop -> embed
      -> every same-person pair and as many different-person pairs (fixed seed)
      -> 10-fold accuracy (threshold from nine folds, measured on the tenth), ROC AUC,
         TAR at FAR 1e-3 and 1e-2, and the best single threshold

A photo in which no face is found cannot be compared: its pairs count as "different"
(a same-person pair with it is an error), and the count is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from facetag.data.images import is_image_file
from facetag.errors import DataError
from facetag.inference.align import find_faces, photo_crops
from facetag.inference.models import Models
from facetag.inference.pipeline import FaceBatcher, Failed, Skipped, iter_photos
from facetag.metrics.verification import protocol_pairs, ten_fold_accuracy, verify
from facetag.progress import Meter, ProgressFn

MessageFn = Callable[[str], None]


def people_range(spec: str) -> tuple[str, str]:
    """'N-Z' -> ('N', 'Z'): the first letters of the person folders used."""
    a, sep, b = spec.upper().partition("-")
    if not (sep and len(a) == 1 and len(b) == 1 and a.isalpha() and b.isalpha() and a <= b):
        raise DataError(f"--people {spec}: expected a letter range such as N-Z")
    return a, b


def _photos(root: Path, people: str) -> tuple[list[Path], list[int], list[str]]:
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder of person folders, got no such folder")
    a, b = people_range(people)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and a <= p.name[:1].upper() <= b)
    paths, labels = [], []
    for k, name in enumerate(names):
        for f in sorted((root / name).iterdir()):
            if is_image_file(f):
                paths.append(f)
                labels.append(k)
    if len(set(labels)) < 2:
        raise DataError(
            f"{root}: expected photos of at least 2 people {people}, got {len(set(labels))}"
        )
    return paths, labels, names


@dataclass
class _Face:
    index: int


def embed_largest_faces(
    paths: list[Path],
    models: Models,
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: ProgressFn | None = None,
    on_message: MessageFn | None = None,
) -> Tensor:
    """The embedding (N, D) of the largest face of each photo; NaN rows where none is found."""
    emb, det = models.embedder, models.detector
    D = emb.net.embedding_dim
    out = torch.full((len(paths), D), math.nan)
    index = {p: k for k, p in enumerate(paths)}
    meter = Meter("photos", len(paths), progress, "photos/s")
    batcher: FaceBatcher[_Face] = FaceBatcher(emb.net, D, models.device, batch_size, batch_size)
    say = on_message or (lambda _: None)

    def finished(done: list[tuple[_Face, Tensor]]) -> None:
        for face, vectors in done:
            out[face.index] = vectors[0]

    for item in iter_photos(paths, det.settings.max_side, workers, {}):
        meter.step()
        if isinstance(item, (Failed, Skipped)):
            say(item.error if isinstance(item, Failed) else f"{item.path}: skipped")
            continue
        faces = find_faces(det, item)
        if not faces:
            say(f"{item.path}: no face found; its pairs count as different people")
            continue
        face = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
        crops = photo_crops(det, item, [face], emb)
        finished(batcher.add(_Face(index[item.path]), crops))
    finished(batcher.flush())
    return out


def evaluate_pairs(
    root: Path,
    models: Models,
    *,
    people: str = "N-Z",
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    progress: ProgressFn | None = None,
    on_message: MessageFn | None = None,
    peer: Callable[[list[Path]], Tensor] | None = None,
) -> dict[str, Any]:
    """The verification protocol of the module doc; the dict ``--json`` prints. ``peer``
    (photos -> raw descriptors, NaN rows for no face, compared by Euclidean distance)
    is scored on the same photos and pairs under "peer"."""
    paths, labels, names = _photos(root, people)
    vectors = embed_largest_faces(
        paths,
        models,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        on_message=on_message,
    )
    return {
        "root": str(root),
        "people": len(names),
        "people_range": people,
        "photos": len(paths),
        **score_pairs(vectors, labels, seed),
        "model": models.info(),
        "device": models.device,
        **({} if peer is None else {"peer": score_pairs(peer(paths), labels, seed, "euclidean")}),
    }


def score_pairs(
    vectors: Tensor, labels: list[int], seed: int = 0, metric: str = "cosine"
) -> dict[str, Any]:
    """The protocol's figures for one embedding (N, D) per photo (NaN rows: no face):
    ``metric`` "cosine" on L2-normalised rows (facetag's), or "euclidean" on raw ones (how
    face_recognition compares dlib's descriptors); thresholds are distances either way
    (1 - cos, or Euclidean)."""
    i, j, same = protocol_pairs(torch.tensor(labels), seed)
    missing = torch.isnan(vectors).any(dim=1)
    e = torch.nan_to_num(vectors).double()
    if metric == "cosine":
        scores = (e[i] * e[j]).sum(dim=1)  # (M,) cosine similarity
        floor = -1.0
    else:
        scores = 1.0 - (e[i] - e[j]).norm(dim=1)  # (M,) so that 1 - score is the distance
        floor = float(scores.min()) if len(scores) else 0.0
    scores[missing[i] | missing[j]] = -math.inf  # cannot be compared: "different"
    folds = ten_fold_accuracy(scores, same, seed=seed)
    v = verify(scores.clamp(min=floor), same)  # -inf: the least alike a pair can be
    return {
        "no_face": int(missing.sum()),
        "pairs": int(same.numel()),
        "same_pairs": int(same.sum()),
        "seed": seed,
        "accuracy_10fold": folds.mean,
        "accuracy_10fold_std": folds.std,
        "auc": v.auc,
        "tar_at_far": {k: None if p is None else p.tar for k, p in v.at_far.items()},
        "threshold_at_far": {k: None if p is None else p.threshold for k, p in v.at_far.items()},
        "best_threshold": v.best.threshold,
        "best_accuracy": v.best_accuracy,
    }


def format_pairs(r: dict[str, Any]) -> str:
    """The human-readable report of ``evaluate_pairs``."""
    far3 = r["tar_at_far"].get("1e-3")
    return (
        f"{r['root']} people {r['people_range']}: {r['people']} people, {r['photos']} photos "
        f"({r['no_face']} without a face found), {r['pairs']} pairs ({r['same_pairs']} same)\n"
        f"  10-fold accuracy {100 * r['accuracy_10fold']:.2f}% "
        f"(+- {100 * r['accuracy_10fold_std']:.2f}), AUC {r['auc']:.4f}, TAR at FAR 1e-3 "
        + ("n/a" if far3 is None else f"{100 * far3:.2f}%")
        + f", best threshold {r['best_threshold']:.4f} (accuracy {100 * r['best_accuracy']:.2f}%)"
        + (
            f"\n  {r['peer_name']} on the same pairs: 10-fold accuracy "
            f"{100 * r['peer']['accuracy_10fold']:.2f}% (+- "
            f"{100 * r['peer']['accuracy_10fold_std']:.2f}), AUC {r['peer']['auc']:.4f}, "
            f"{r['peer']['no_face']} photos without a face found"
            if "peer" in r
            else ""
        )
    )


def store_pair_threshold(model: Path, result: dict[str, Any], far: str) -> dict[str, Any]:
    """Write the threshold at false accept rate ``far`` of an evaluate_pairs result into the
    model file (atomically), with how it was found; returns what was stored."""
    from facetag.models.io import write_threshold

    t = result["threshold_at_far"].get(far)
    if t is None:
        raise DataError(
            f"{result['root']}: expected enough different-person pairs to measure FAR {far}, "
            f"got {result['pairs'] - result['same_pairs']}; use more people or --far 1e-2"
        )
    record = {
        "rule": f"far{far}",
        "data": result["root"],
        "people": result["people_range"],
        "pairs": result["pairs"],
        "tar": result["tar_at_far"][far],
        "protocol": "facetag evaluate --pairs (whole pipeline)",
        "detector": result["model"]["detector"],
    }
    write_threshold(model, float(t), record)
    return {"path": str(model), "threshold": float(t), **record}


def evaluate_clusters(
    root: Path,
    models: Models,
    *,
    people: str = "N-Z",
    distance: float | None = None,
    progress: ProgressFn | None = None,
    on_message: MessageFn | None = None,
) -> dict[str, Any]:
    """``facetag evaluate --clusters``: facetag cluster on the photos of ``people`` with an
    empty, throwaway gallery; BCubed of the clusters of each photo's largest face (the
    person the folder is named after) against the true people, the clusters that mix
    two people, and a second run on the same photos keeping every cluster id."""
    import tempfile

    from facetag.inference.cluster import CLUSTER_SCALE, cluster_photos
    from facetag.metrics.verification import bcubed

    paths, labels, names = _photos(root, people)
    with tempfile.TemporaryDirectory(prefix="facetag-clusters-") as tmp:
        gallery = Path(tmp) / "gallery.json"
        half = len(paths) // 2  # the library grows: first half, then all of it
        first = cluster_photos(
            paths[:half],
            gallery,
            models,
            distance=distance,
            progress=progress,
            on_message=on_message,
        )
        run = cluster_photos(
            paths, gallery, models, distance=distance, progress=progress, on_message=on_message
        )

    def subject(im: dict[str, Any]) -> str | None:
        faces = im["faces"]
        if not faces:
            return None
        f = max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))
        return None if f["cluster"] is None else str(f["cluster"])

    early = {im["path"]: subject(im) for im in first.doc["images"]}
    later = {im["path"]: subject(im) for im in run.doc["images"]}
    kept = sum(1 for p, c in early.items() if c is not None and later.get(p) == c)
    got = [(later.get(str(p)), lab) for p, lab in zip(paths, labels, strict=True)]
    missing = sum(1 for c, _ in got if c is None)
    clusters = [c if c is not None else f"none{k}" for k, (c, _) in enumerate(got)]
    P, R, F = bcubed([lab for _, lab in got], clusters)
    members: dict[str, set[int]] = {}
    for c, lab in zip(clusters, (lab for _, lab in got), strict=True):
        members.setdefault(c, set()).add(lab)
    mixed = sorted(c for c, labs in members.items() if len(labs) > 1)
    return {
        "root": str(root),
        "people_range": people,
        "people": len(names),
        "photos": len(paths),
        "no_face": missing,
        "distance": models.threshold * CLUSTER_SCALE if distance is None else distance,
        "clusters": run.clusters,
        "bcubed_precision": P,
        "bcubed_recall": R,
        "bcubed_f": F,
        "mixed_clusters": len(mixed),
        "ids_kept": kept,
        "ids_before": sum(1 for c in early.values() if c is not None),
        "model": models.info(),
    }
