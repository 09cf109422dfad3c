"""``facetag detect``: the faces in photos of any size, one photo at a time.

    photo -> data.images.decode_photo (at most ``max_side`` px: JPEGs are decoded at that
    size directly) -> models.detector.Detector.detect -> boxes scaled back to the photo
    as displayed

A 100-megapixel photo costs what a 1600-px one does (and the smallest face found grows
with the shrink). Nothing is kept between photos, so memory stays flat over a folder of
any length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from facetag.data.images import decode_photo, scan_photos, scan_problems
from facetag.device import resolve_device
from facetag.errors import DataError
from facetag.inference.align import face_json
from facetag.models.detector import Detector, load_detector
from facetag.models.io import ModelRef


def detect_photo(
    detector: Detector,
    path: Path,
    *,
    min_face: float | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """One photo -> {"path", "width", "height", "faces": [{"box": [x1, y1, x2, y2], "score"}]}.

    Raises DataError for a photo that cannot be used (see facetag.data.images).
    """
    photo = decode_photo(path, detector.settings.max_side)
    found = detector.detect(photo.chw(), min_face=min_face, threshold=threshold)  # (K, 15)
    faces = [face_json(row, photo.scale) for row in found.tolist()]
    return {"path": str(path), "width": photo.width, "height": photo.height, "faces": faces}


def detect_paths(
    paths: Iterable[Path],
    *,
    recursive: bool = False,
    min_face: float | None = None,
    threshold: float | None = None,
    device: str = "auto",
    model: ModelRef | None = None,
    on_error: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], int]:
    """``facetag detect``: (the JSON document, number of photos or folders that failed).

    Each failure is also passed to on_error (one line) as it happens; the others go on.
    """
    dev = resolve_device(device)
    paths = list(paths)
    scan = scan_photos(paths, recursive)  # a missing path fails before the model loads
    ref = model or ModelRef()
    detector = load_detector(ref.path, dev, None if ref.path is None else ref.spec)
    failed = 0
    images: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []

    def problem(path: Path, message: str) -> None:
        nonlocal failed
        failed += 1
        errors.append({"path": str(path), "error": message})
        if on_error is not None:
            on_error(message)

    for path, message in scan.problems:
        problem(path, message)
    if not scan.photos and not failed:
        scan_problems(scan, paths, None)  # raises: no images at all
    for path in scan.photos:
        try:
            images.append(detect_photo(detector, path, min_face=min_face, threshold=threshold))
        except DataError as e:
            problem(path, str(e))
    doc: dict[str, Any] = {"device": dev, "model": {"detector": detector.name}, "images": images}
    if errors:
        doc["errors"] = errors
    if scan.unread or scan.hidden:
        doc["not_read"] = scan.counts()
    return doc, failed
