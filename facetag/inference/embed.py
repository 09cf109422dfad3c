"""``facetag embed``: every face's box, landmarks and L2-normalised embedding, per photo
(face_recognition's ``face_encodings``, and what a user's own scoring reads).

    photos -> decode (workers) -> detector -> align / crop -> embed (batched across photos)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from facetag.data.images import Photo, find_images
from facetag.inference.align import DEFAULT_MARGIN, face_json, find_faces, photo_crops
from facetag.inference.models import Models
from facetag.inference.pipeline import FaceBatcher, Failed, iter_photos, worker_count
from facetag.progress import Meter, ProgressFn

MessageFn = Callable[[str], None]


@dataclass
class _Waiting:
    photo: Photo
    faces: list[list[float]]


def embed_photos(
    paths: Sequence[Path],
    models: Models,
    *,
    recursive: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    margin: float = DEFAULT_MARGIN,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], int]:
    """(the JSON document, photos or folders that failed); failures also go to on_message."""
    say = on_message or (lambda _: None)
    errors: list[dict[str, str]] = []

    def problem(path: Path, message: str) -> None:
        errors.append({"path": str(path), "error": message})
        say(message)

    photos = find_images(paths, recursive, on_problem=problem)
    emb, det = models.embedder, models.detector
    D = emb.net.embedding_dim
    batcher: FaceBatcher[_Waiting] = FaceBatcher(emb.net, D, models.device, batch_size, batch_size)
    meter = Meter("photos", len(photos), progress, "photos/s")
    images: list[dict[str, Any]] = []

    def finished(done: list[tuple[_Waiting, Tensor]]) -> None:
        for w, vectors in done:
            faces = []
            for f, v in zip(w.faces, vectors.tolist(), strict=True):
                face = face_json(f, w.photo.scale)
                face["embedding"] = [round(x, 6) for x in v]
                faces.append(face)
            images.append(
                {
                    "path": str(w.photo.path),
                    "sha256": w.photo.sha256,
                    "width": w.photo.width,
                    "height": w.photo.height,
                    "faces": faces,
                }
            )
            meter.step()

    workers, capped = worker_count(workers)
    if capped:
        say(capped)
    for item in iter_photos(photos, det.settings.max_side, workers, {}):
        if isinstance(item, Failed):
            problem(item.path, item.error)
            meter.step()
            continue
        assert isinstance(item, Photo)
        faces = find_faces(det, item)
        crops = photo_crops(det, item, faces, emb, margin)
        item.pixels = torch.zeros(0, dtype=torch.uint8)  # only the crops are kept
        finished(batcher.add(_Waiting(item, faces), crops))
    finished(batcher.flush())
    doc: dict[str, Any] = {
        "device": models.device,
        "model": models.info(),
        "embedding_dim": D,
        "images": images,
    }
    if errors:
        doc["errors"] = errors
    return doc, len(errors)
