"""What enrolment and tagging share: photos decoded in worker processes, and face crops
batched across photos for the embedder.

    photo paths --(workers processes: hash + decode, a bounded queue)--> Photo | Skipped | Failed
    Photo -> detector -> crops (K, C, H, W) -> FaceBatcher: crops of several photos wait
      until batch_size are there, then one embedding pass (N, D), split back per photo

Memory stays flat: at most ``workers * 2`` decoded photos wait in the queue, and a
waiting photo keeps only its crops (and what the caller attached to it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from facetag.data.images import Photo, decode_photo, file_sha256, photo_key
from facetag.errors import DataError
from facetag.inference.align import embed_crops

T = TypeVar("T")


@dataclass
class Skipped:
    """A photo whose bytes match a finished record: not decoded."""

    path: Path
    sha256: str


@dataclass
class Failed:
    path: Path
    error: str


class _PhotoSource(Dataset[Any]):
    """Hash (and unless already done, decode) photo i; runs in the DataLoader's workers."""

    def __init__(self, paths: Sequence[Path], max_side: int, done: dict[str, str]) -> None:
        self.paths, self.max_side, self.done = list(paths), max_side, done

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Photo | Skipped | Failed:
        path = self.paths[i]
        try:
            sha = file_sha256(path)
            if self.done.get(photo_key(path)) == sha:
                return Skipped(path, sha)
            return decode_photo(path, self.max_side, sha256=sha)
        except DataError as e:
            return Failed(path, str(e))


def cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_count(asked: int) -> tuple[int, str | None]:
    """(decoding processes to start, the line saying so when ``asked`` was cut down).

    More processes than cores only add memory (each holds a decoded photo, up to ~0.5 GB
    for a 100-megapixel one) and start-up time: 1000 took 9.6 GB and 111 s for 2 photos.
    """
    n = cores()
    if asked <= n:
        return max(0, asked), None
    return n, (
        f"--workers {asked}: expected at most {n} (the cores this process may use), got "
        f"{asked}; using {n}"
    )


def _keep(item: Any) -> Any:
    return item


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is Pillow's work; leave the cores to the models


def iter_photos(
    paths: Sequence[Path], max_side: int, workers: int = 0, done: dict[str, str] | None = None
) -> Iterator[Photo | Skipped | Failed]:
    """Photos in order, hashed and decoded by ``workers`` processes (0: this one).

    ``done`` maps photo_keys (absolute paths) to the sha256 of a finished record: those
    photos come back as Skipped without being decoded. At most 2 photos per worker are
    decoded ahead. ``workers`` is capped at the cores (see worker_count).
    """
    source = _PhotoSource(paths, max_side, done or {})
    workers = worker_count(workers)[0]
    if workers <= 0:
        for i in range(len(source)):
            yield source[i]
        return
    loader = DataLoader(
        source,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_keep,
        prefetch_factor=2,
        worker_init_fn=_worker_init,
    )
    yield from loader


class FaceBatcher(Generic[T]):
    """Face crops of several photos, embedded together once ``batch_size`` wait.

    ``add(item, crops)`` queues one photo's crops (K, C, H, W) uint8 (K may be 0) and
    returns the photos finished by it, each as (item, embeddings (K, D)), in the order
    they were added; ``flush()`` finishes the rest. A batch is embedded when it holds
    ``batch_size`` crops or ``max_photos`` photos (photos without faces still wait their
    turn, so results come back in order).
    """

    def __init__(
        self, net: torch.nn.Module, D: int, device: str, batch_size: int, max_photos: int
    ) -> None:
        self.net, self.D, self.device = net, D, device
        self.batch_size, self.max_photos = batch_size, max_photos
        self.items: list[tuple[T, int]] = []
        self.crops: list[Tensor] = []
        self.waiting = 0

    def add(self, item: T, crops: Tensor) -> list[tuple[T, Tensor]]:
        self.items.append((item, crops.shape[0]))
        self.crops.append(crops)
        self.waiting += crops.shape[0]
        if self.waiting >= self.batch_size or len(self.items) >= self.max_photos:
            return self.flush()
        return []

    def flush(self) -> list[tuple[T, Tensor]]:
        if not self.items:
            return []
        if self.waiting:
            crops = torch.cat(self.crops)  # (N, C, H, W)
            vectors = embed_crops(self.net, crops, self.batch_size, self.device)  # (N, D)
        else:
            vectors = torch.zeros((0, self.D))
        out, start = [], 0
        for item, k in self.items:
            out.append((item, vectors[start : start + k]))
            start += k
        self.items, self.crops, self.waiting = [], [], 0
        return out


def face_row(
    box: Sequence[float], landmarks: Sequence[Sequence[float]] | None, scale: float
) -> list[float]:
    """A stored face (box and landmarks in displayed pixels) as a detector row in the
    loaded pixels of a photo decoded at ``scale``: what photo_crops cuts."""
    row = [float(v) * scale for v in box[:4]] + [1.0]
    if landmarks is None:
        return row + [math.nan] * 10
    return row + [float(v) * scale for point in landmarks for v in point]


def stored_face_crops(
    faces: Sequence[tuple[Path, Sequence[float], Sequence[Sequence[float]] | None]],
    models: Any,
) -> Iterator[tuple[int, Tensor]]:
    """(index, crop (1, C, H, W)) of each stored face (photo, box, landmarks in displayed
    pixels) cut again from its photo as models.embedder wants it; unreadable photos are
    left out. One photo decoded at a time."""
    from facetag.inference.align import photo_crops

    for k, (path, box, marks) in enumerate(faces):
        try:
            photo = decode_photo(Path(path), models.detector.settings.max_side)
        except DataError:
            continue
        yield (
            k,
            photo_crops(
                models.detector, photo, [face_row(box, marks, photo.scale)], models.embedder
            ),
        )


def embed_stored_faces(
    faces: Sequence[tuple[Path, Sequence[float], Sequence[Sequence[float]] | None]],
    models: Any,
    batch_size: int = 64,
) -> Tensor:
    """Re-embed faces already known (photo, box, landmarks in displayed pixels) with
    ``models`` (a new or tuned embedder): (N, D), NaN rows for photos that cannot be read.
    The faces are cut again from the photos, not detected again."""
    emb = models.embedder
    D = emb.net.embedding_dim
    out = torch.full((len(faces), D), math.nan)
    batcher: FaceBatcher[int] = FaceBatcher(emb.net, D, models.device, batch_size, batch_size)

    def finished(done: list[tuple[int, Tensor]]) -> None:
        for k, v in done:
            out[k] = v[0]

    for k, crops in stored_face_crops(faces, models):
        finished(batcher.add(k, crops))
    finished(batcher.flush())
    return out
