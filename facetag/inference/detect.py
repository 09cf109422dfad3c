"""``facetag detect``: the faces in photos of any size, one photo at a time.

    photo -> data.images.decode_photo (at most ``max_side`` px: JPEGs are decoded at that
    size directly) -> models.detector.Detector.detect -> boxes scaled back to the photo
    as displayed

A 100-megapixel photo costs what a 1600-px one does (and the smallest face found grows
with the shrink). Nothing is kept between photos, so memory stays flat over a folder of
any length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facetag.data.images import decode_photo, find_images
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


@dataclass
class PhotoResult:
    """One photo's result, or the one-line reason it failed."""

    path: Path
    result: dict[str, Any] | None = None
    error: str | None = None


def iter_detections(
    detector: Detector,
    paths: Iterable[Path],
    *,
    recursive: bool = False,
    min_face: float | None = None,
    threshold: float | None = None,
    on_problem: Callable[[Path, str], None] | None = None,
) -> Iterator[PhotoResult]:
    """Detect in every photo of ``paths`` (files or folders), one at a time.

    A photo that fails yields a PhotoResult with ``error`` set and the next one is tried;
    folders without images are reported through on_problem. Raises DataError only when
    nothing at all can be found.
    """
    for path in find_images(paths, recursive, on_problem=on_problem):
        try:
            found = detect_photo(detector, path, min_face=min_face, threshold=threshold)
            yield PhotoResult(path, found)
        except DataError as e:
            yield PhotoResult(path, error=str(e))


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
    ref = model or ModelRef()
    detector = load_detector(ref.path, dev, None if ref.path is None else ref.spec)
    failed = 0

    def problem(path: Path, message: str) -> None:
        nonlocal failed
        failed += 1
        if on_error is not None:
            on_error(message)

    images: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    found = iter_detections(
        detector,
        paths,
        recursive=recursive,
        min_face=min_face,
        threshold=threshold,
        on_problem=problem,
    )
    try:
        for r in found:
            if r.error is not None:
                problem(r.path, r.error)
                errors.append({"path": str(r.path), "error": r.error})
            else:
                assert r.result is not None
                images.append(r.result)
    except DataError:
        if not failed:  # "no images at all": not yet said, unless each folder said it
            raise
    doc: dict[str, Any] = {"device": dev, "model": {"detector": detector.name}, "images": images}
    if errors:
        doc["errors"] = errors
    return doc, failed
