"""Scoring a face detector: average precision at IoU 0.5 and recall at 1 false positive/image.

Matching, per image, detections in order of decreasing score (PASCAL VOC / WIDER FACE):

- a detection whose best IoU with a not-yet-matched scored face is >= ``iou`` is a true
  positive and takes that face;
- otherwise, when it overlaps an ignored face (a box marked invalid, or with ``min_height``
  a face smaller than that) by IoU >= ``iou``, it is ignored: it counts neither way;
- with ``min_height``, an unmatched detection smaller than ``min_height`` is ignored too
  (as COCO does for its size ranges: a detector is not blamed for the faces it finds
  below the size being scored);
- anything else is a false positive (duplicates of a matched face included).

At a ``threshold`` (the detector's default face score), the same matching of the
detections scoring at least that gives the false positives and the recall a user of
``facetag detect`` sees.

AP is the area under the precision-recall curve with VOC's all-point interpolation
(precision made monotone from the right). Recall at 1 FP/image is the recall reached
before the number of false positives exceeds the number of images.

    scores = score_detector(detections, truth)      # {image: [(x1, y1, x2, y2, score)]}
    scores.ap50, scores.ap50_32, scores.recall_at_1fp
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from facetag.data.boxes import FaceBox, iou_matrix

Scored = tuple[float, float, float, float, float]  # x1, y1, x2, y2, score


@dataclass(frozen=True)
class DetectionScores:
    """What ``facetag evaluate-detector`` reports."""

    ap50: float  # AP at IoU 0.5 over all valid faces
    ap50_32: float  # AP at IoU 0.5 counting only faces >= 32 px high
    recall_at_1fp: float  # recall (all valid faces) at 1 false positive per image
    faces: int  # valid faces scored
    faces_32: int  # valid faces >= 32 px high
    images: int
    detections: int
    threshold: float = float("nan")  # the operating point below (nan: not asked for)
    false_positives_at_threshold: int = 0  # over all images, detections >= threshold
    recall_at_threshold: float = float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def match_image(
    detections: Sequence[Scored], faces: Sequence[FaceBox], iou: float = 0.5, min_height: float = 0
) -> tuple[list[tuple[float, bool]], int]:
    """Match one image: ([(score, is_true_positive) for counted detections], faces counted)."""
    dets = sorted(detections, key=lambda d: -d[4])
    d = np.array([x[:4] for x in dets], dtype=np.float64).reshape(-1, 4)  # (D, 4)
    g = np.array([f.xyxy for f in faces], dtype=np.float64).reshape(-1, 4)  # (G, 4)
    ignored = np.array([f.invalid or f.h < min_height for f in faces], dtype=bool)  # (G,)
    overlaps = iou_matrix(d, g)  # (D, G)
    taken = np.zeros(len(faces), dtype=bool)
    out: list[tuple[float, bool]] = []
    for i, det in enumerate(dets):
        row = overlaps[i] if len(faces) else np.zeros(0)
        free = ~ignored & ~taken
        if free.any():
            j = int(np.argmax(np.where(free, row, -1.0)))
            if row[j] >= iou:
                taken[j] = True
                out.append((det[4], True))
                continue
        if ignored.any() and float(row[ignored].max()) >= iou:
            continue
        if min_height > 0 and det[3] - det[1] < min_height:
            continue
        out.append((det[4], False))
    return out, int((~ignored).sum())


def average_precision(matches: Sequence[tuple[float, bool]], positives: int) -> float:
    """VOC all-point AP from (score, is_tp) pairs over all images and the face count."""
    if positives == 0:
        return float("nan")
    if not matches:
        return 0.0
    order = np.argsort([-s for s, _ in matches], kind="stable")
    tp = np.array([matches[i][1] for i in order], dtype=np.float64)
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / positives
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    r = np.concatenate([[0.0], recall, [recall[-1]]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the best precision at any higher recall
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def recall_at_fp(
    matches: Sequence[tuple[float, bool]], positives: int, max_false_positives: float
) -> float:
    """Recall reached while the false positives stay <= max_false_positives."""
    if positives == 0:
        return float("nan")
    order = np.argsort([-s for s, _ in matches], kind="stable")
    tp = np.array([matches[i][1] for i in order], dtype=bool)
    cfp = np.cumsum(~tp)
    ok = cfp <= max_false_positives
    return float(tp[ok].sum() / positives)


def score_detector(
    detections: Mapping[str, Sequence[Scored]],
    truth: Mapping[str, Sequence[FaceBox]],
    iou: float = 0.5,
    threshold: float | None = None,
) -> DetectionScores:
    """AP50, AP50 for faces >= 32 px high and recall at 1 FP/image over ``truth``'s images;
    with ``threshold``, the false positives and recall of the detections scoring >= it.

    detections maps the same image names as truth to (x1, y1, x2, y2, score) tuples; an
    image missing from detections has no detections.
    """
    all_m: list[tuple[float, bool]] = []
    big_m: list[tuple[float, bool]] = []
    faces = faces_32 = count = 0
    for image, gts in truth.items():
        dets = detections.get(image, [])
        count += len(dets)
        m, n = match_image(dets, gts, iou)
        all_m += m
        faces += n
        m32, n32 = match_image(dets, gts, iou, min_height=32)
        big_m += m32
        faces_32 += n32
    at: dict[str, float | int] = {}
    if threshold is not None:
        kept = [(sc, tp) for sc, tp in all_m if sc >= threshold]
        at = {
            "threshold": threshold,
            "false_positives_at_threshold": sum(not tp for _, tp in kept),
            "recall_at_threshold": sum(tp for _, tp in kept) / faces if faces else float("nan"),
        }
    return DetectionScores(
        ap50=average_precision(all_m, faces),
        ap50_32=average_precision(big_m, faces_32),
        recall_at_1fp=recall_at_fp(all_m, faces, len(truth)),
        faces=faces,
        faces_32=faces_32,
        images=len(truth),
        detections=count,
        **at,  # type: ignore[arg-type]
    )


def five_from_68(points: np.ndarray) -> np.ndarray:
    """The five target points (5, 2) of a 68-point annotation (iBUG 300-W indices): eye
    centres as the means of 36-41 and 42-47, nose tip 30, mouth corners 48 and 54."""
    return np.stack(
        [
            points[36:42].mean(axis=0),
            points[42:48].mean(axis=0),
            points[30],
            points[48],
            points[54],
        ]
    )


def landmark_errors(
    found: Mapping[str, Sequence[Sequence[float]]],
    truth: Mapping[str, Sequence[tuple[FaceBox, np.ndarray]]],
    min_iou: float = 0.3,
) -> dict[str, float | int | list[float]]:
    """Five-point landmark error of a detector against 68-point annotations.

    found: {image: detections [x1, y1, x2, y2, score, x0, y0, ..., x4, y4]} (landmarks NaN
    when the detector has none); truth: read_landmarks_xml's. Each annotated face takes the
    detection overlapping its box most (IoU >= min_iou); its error is the mean distance of
    the five points to the targets (five_from_68) over the outer-eye-corner distance
    (points 36 and 45). Returns the mean over matched faces, per point, and the counts.
    """
    errors, per_point, missed = [], [], 0
    for name, faces in truth.items():
        dets = (
            np.asarray(found.get(name, []), np.float64).reshape(-1, 15)
            if found.get(name)
            else np.zeros((0, 15))
        )
        for box, pts in faces:
            if dets.shape[0] == 0:
                missed += 1
                continue
            overlap = iou_matrix(np.array([box.xyxy]), dets[:, :4])[0]
            k = int(overlap.argmax())
            if overlap[k] < min_iou or np.isnan(dets[k, 5:]).any():
                missed += 1
                continue
            pred = dets[k, 5:].reshape(5, 2)
            norm = float(np.linalg.norm(pts[45] - pts[36]))
            d = np.linalg.norm(pred - five_from_68(pts), axis=1) / norm  # (5,)
            errors.append(float(d.mean()))
            per_point.append(d)
    mean = float(np.mean(errors)) if errors else float("nan")
    points = np.mean(per_point, axis=0).tolist() if per_point else []
    return {
        "landmark_error": mean,
        "landmark_error_per_point": points,
        "landmark_faces": len(errors),
        "landmark_missed": missed,
    }
