"""Whole-pipeline benchmarks on a folder of photos: ``facetag bench detect`` and ``bench tag``.

Each reports photos/s over repeated passes (decoding included) and the process's peak
resident memory after the first pass and at the end: equal values mean memory does not
grow with the number of photos.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from facetag.bench.memory import peak_rss_mb
from facetag.data.images import find_images, image_size
from facetag.device import resolve_device
from facetag.errors import ModelError
from facetag.inference.detect import detect_photo
from facetag.inference.gallery import Gallery, GalleryEntry, save_gallery
from facetag.inference.models import Models
from facetag.inference.tag import TagOptions, tag_photos
from facetag.models.detector import load_detector
from facetag.models.io import ModelRef


def _device_name(device: str) -> str:
    return (
        torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine()
    )


def bench_detect(
    folder: Path,
    *,
    device: str = "auto",
    model: ModelRef | None = None,
    repeats: int = 3,
    min_face: float | None = None,
    threads: int | None = None,
    against: str | None = None,
) -> dict[str, Any]:
    """``facetag bench detect``: photos/s over the photos of ``folder`` (decoding included).

    ``against="mtcnn"`` also times facenet-pytorch's MTCNN (its own weights, the same
    minimum face and pyramid step) on the same photos in the same run, after ours, and
    reports both rates and their ratio (ModelError with the pip command when it is not
    installed).

    One warm-up photo, then ``repeats`` passes, on ``threads`` CPU threads (None: torch's
    default, one per core). Peak memory is the process's peak resident
    size (ru_maxrss: Python, torch and the detector included) after the first pass and at
    the end: equal values mean memory does not grow with the number of photos.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    ref = model or ModelRef()
    detector = load_detector(ref.path, dev, None if ref.path is None else ref.spec)
    paths = find_images([folder])
    detect_photo(detector, paths[0], min_face=min_face)

    t0 = time.perf_counter()
    n = faces = 0
    peak_first = 0.0
    for k in range(repeats):
        for p in paths:
            faces += len(detect_photo(detector, p, min_face=min_face)["faces"])
            n += 1
        if dev == "cuda":
            torch.cuda.synchronize()
        if k == 0:
            peak_first = peak_rss_mb()
    seconds = time.perf_counter() - t0
    sizes = sorted({image_size(p) for p in paths})
    peer = _time_mtcnn(paths, repeats, min_face or 20.0) if against == "mtcnn" else {}
    if peer:
        peer["ratio"] = round(n / seconds / peer["photos_per_s"], 3)
    return {
        "device": dev,
        "device_name": _device_name(dev),
        "torch_threads": torch.get_num_threads(),
        "model": detector.name,
        "photos": n,
        "distinct_photos": len(paths),
        "sizes": [list(s) for s in sizes[:5]],
        "seconds": round(seconds, 3),
        "photos_per_s": round(n / seconds, 3),
        "faces_per_photo": round(faces / max(n, 1), 2),
        "peak_rss_mb_first_pass": round(peak_first, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **({"mtcnn": peer} if peer else {}),
    }


def _time_mtcnn(paths: list[Path], repeats: int, min_face: float) -> dict[str, Any]:
    """facenet-pytorch's MTCNN over ``paths``: photos/s (decoding with Pillow included)."""
    import importlib.util

    for module in ("facenet_pytorch", "tqdm"):
        if importlib.util.find_spec(module) is None:
            raise ModelError(
                f"--against mtcnn: expected {module} installed, got none; "
                "pip install --no-deps facenet-pytorch==2.6.0 tqdm"
            )
    from facenet_pytorch import MTCNN
    from PIL import Image

    mtcnn = MTCNN(keep_all=True, min_face_size=int(min_face), device="cpu")

    def one(p: Path) -> int:
        boxes, _ = mtcnn.detect(Image.open(p).convert("RGB"))
        return 0 if boxes is None else len(boxes)

    one(paths[0])
    t0 = time.perf_counter()
    faces = sum(one(p) for _ in range(repeats) for p in paths)
    seconds = time.perf_counter() - t0
    n = repeats * len(paths)
    return {
        "model": "facenet-pytorch 2.6.0 MTCNN",
        "photos": n,
        "seconds": round(seconds, 3),
        "photos_per_s": round(n / seconds, 3),
        "faces_per_photo": round(faces / max(n, 1), 2),
    }


def random_gallery(model: str, D: int, people: int = 8, per_person: int = 2) -> Gallery:
    """A gallery of random unit embeddings, for timing when no real one is given."""
    g = torch.Generator().manual_seed(0)
    gallery = Gallery(model=model)
    for p in range(people):
        entries = []
        for k in range(per_person):
            v = torch.randn(D, generator=g)
            entries.append(
                GalleryEntry(f"p{p}/{k}.jpg", "0" * 64, [0, 0, 1, 1], 1.0, 1, v / v.norm())
            )
        gallery.people[f"person{p}"] = entries
    return gallery


def bench_tag(
    folder: Path,
    models: Models,
    *,
    gallery_path: Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    repeats: int = 2,
    scratch: Path,
) -> dict[str, Any]:
    """``facetag bench tag``: photos/s end to end (decode, detect, crop, embed, match).

    One warm-up photo, then ``repeats`` passes over the photos of ``folder``, no outputs
    and no manifest. ``scratch`` holds the random gallery when none is given.
    """
    if gallery_path is None:
        gallery_path = save_gallery(
            scratch / "bench-gallery.json",
            random_gallery(models.embedder.version, models.embedder.net.embedding_dim),
        )
    photos = find_images([folder])
    opts = TagOptions(batch_size=batch_size, workers=workers, resume=False)
    tag_photos(photos[:1], gallery_path, models, TagOptions(resume=False))

    faces = n = 0
    peak_first = 0.0
    t0 = time.perf_counter()
    for k in range(repeats):
        run = tag_photos(photos, gallery_path, models, opts)
        faces += sum(len(im["faces"]) for im in run.doc["images"])
        n += len(photos)
        if models.device == "cuda":
            torch.cuda.synchronize()
        if k == 0:
            peak_first = peak_rss_mb()
    seconds = time.perf_counter() - t0
    return {
        "device": models.device,
        "device_name": _device_name(models.device),
        "torch_threads": torch.get_num_threads(),
        "workers": workers,
        "batch_size": batch_size,
        "detector": models.detector.name,
        "embedder": models.embedder.version,
        "photos": n,
        "distinct_photos": len(photos),
        "seconds": round(seconds, 3),
        "photos_per_s": round(n / seconds, 3),
        "faces_per_photo": round(faces / max(n, 1), 2),
        "peak_rss_mb_first_pass": round(peak_first, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
