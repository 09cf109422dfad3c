"""``facetag evaluate-detector``: AP50, AP50 (>= 32 px) and recall at 1 FP/image of a
detector on a box file (facetag.metrics.ap), photos read with the one decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from facetag.data.boxes import read_boxes, read_landmarks_xml, resolve_image
from facetag.data.images import decode_photo
from facetag.device import resolve_device
from facetag.errors import DataError, FacetagError
from facetag.metrics.ap import Scored, landmark_errors, score_detector
from facetag.models.detector import Detector, load_detector
from facetag.models.io import ModelRef

SCORE_THRESHOLD = 0.05  # the last stage's prob kept when scoring AP: the whole curve


def detect_for_scoring(
    detector: Detector,
    images: dict[str, Path],
    *,
    min_face: float | None = None,
    threshold: float = SCORE_THRESHOLD,
    on_error: Callable[[str, str], None] | None = None,
    landmarks: dict[str, list[list[float]]] | None = None,
) -> dict[str, list[Scored]]:
    """{image name: [(x1, y1, x2, y2, score)]} in displayed pixels (0.1 px, 4 digits, as
    ``facetag detect`` prints them), with a low threshold, for the AP scorer. ``landmarks``,
    when given, receives each image's whole rows (box, score, 10 landmark coordinates)."""
    out: dict[str, list[Scored]] = {}
    for name, path in images.items():
        try:
            photo = decode_photo(path, detector.settings.max_side)
        except FacetagError as e:
            if on_error is None:
                raise
            on_error(name, str(e))
            continue
        found = detector.detect(photo.chw(), min_face=min_face, threshold=threshold)  # (K, 15)
        if landmarks is not None:
            rows = found.clone()
            rows[:, :4] /= photo.scale
            rows[:, 5:] /= photo.scale
            landmarks[name] = rows.tolist()
        boxes = (found[:, :4] / photo.scale).tolist()
        out[name] = [
            (round(box[0], 1), round(box[1], 1), round(box[2], 1), round(box[3], 1), round(s, 4))
            for box, s in zip(boxes, found[:, 4].tolist(), strict=True)
        ]
    return out


def evaluate_boxes(
    boxes_file: Path,
    images_root: Path,
    *,
    device: str = "auto",
    model: ModelRef | None = None,
    min_face: float | None = None,
    on_error: Callable[[str], None] | None = None,
    landmark_files: Sequence[Path] = (),
) -> dict[str, Any]:
    """``facetag evaluate-detector``: AP50, AP50 (>= 32 px), recall at 1 FP/image, the
    false positives and recall at the detector's default face score, and
    with ``landmark_files`` (dlib's XML with 68 points) the five-landmark error
    (metrics.ap.landmark_errors).

    Photos of the box file that cannot be read are reported through on_error and left out.
    """
    dev = resolve_device(device)
    ref = model or ModelRef()
    detector = load_detector(ref.path, dev, None if ref.path is None else ref.spec)
    truth = read_boxes(boxes_file)
    paths = {name: resolve_image(images_root, name) for name in truth}
    failed: list[str] = []

    def problem(name: str, message: str) -> None:
        failed.append(name)
        if on_error is not None:
            on_error(message)

    rows: dict[str, list[list[float]]] = {}
    found = detect_for_scoring(detector, paths, min_face=min_face, on_error=problem, landmarks=rows)
    if not found:
        raise DataError(
            f"{images_root}: expected the photos named in {boxes_file}, could read none; "
            "check --images"
        )
    scored = {k: v for k, v in truth.items() if k in found}
    scores = score_detector(found, scored, threshold=detector.settings.threshold)
    marks: dict[str, Any] = {}
    if landmark_files:
        annotated: dict[str, list[Any]] = {}
        for f in landmark_files:
            annotated.update(read_landmarks_xml(f))
        by_file = {Path(n).name: n for n in rows}
        named = {by_file[k]: v for k, v in annotated.items() if k in by_file}
        marks = landmark_errors(rows, named)
    return {
        "device": dev,
        "model": {"detector": detector.name},
        "boxes": str(boxes_file),
        "failed_images": len(failed),
        **scores.as_dict(),
        **marks,
    }
