"""Embedding throughput: our DlibResNet against dlib's compute_face_descriptor, one run.

Both networks embed the same aligned 150x150 chips in the same process, one after the
other, with the threads each uses by default (torch: ``torch.get_num_threads()``; dlib's
CPU build: one). Ours runs batched in inference mode, affines folded into the convs and
in channels_last (load_embedder's form); dlib is timed both on the list of chips (its
Python API batches 16 at a time) and chip by chip, and its faster figure is the one
compared. Every figure is the best of ``repeats`` passes, so a busy machine costs less.

    facetag bench embed                      # astronaut chips, repeated to 64
    facetag bench embed --chips DIR --model dlib16.pt

dlib (dlib-bin) and face_recognition_models must be installed: this measures against them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facetag.errors import ModelError
from facetag.models.dlib_import import packaged_dlib_model
from facetag.models.resnet import CHIP_SIZE, DlibResNet


def _models_dir() -> Path:
    return packaged_dlib_model().parent


def _dlib() -> Any:
    if importlib.util.find_spec("dlib") is None:
        raise ModelError("bench_embed: expected dlib, got none installed; pip install dlib-bin")
    import dlib

    return dlib


def dlib_chips(image: np.ndarray) -> list[np.ndarray]:
    """The 150x150 RGB uint8 chips of every face in ``image`` (H, W, 3) uint8, cut by dlib:
    HOG detector, shape_predictor_5_face_landmarks, get_face_chip(size=150, padding=0.25)."""
    dlib = _dlib()
    predictor = dlib.shape_predictor(str(_models_dir() / "shape_predictor_5_face_landmarks.dat"))
    detector = dlib.get_frontal_face_detector()
    return [
        dlib.get_face_chip(image, predictor(image, box), size=CHIP_SIZE, padding=0.25)
        for box in detector(image, 1)
    ]


def dlib_largest_descriptors(
    paths: Sequence[Path], progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """face_recognition's pipeline on each photo, as its ``face_encodings`` runs it: HOG
    detector upsampled once, the largest face, dlib's 5-point shape predictor, then
    ``compute_face_descriptor`` (raw 128-d descriptors, compared by Euclidean distance).
    (N, 128) float64, NaN rows where dlib finds no face."""
    from PIL import Image

    dlib = _dlib()
    d = _models_dir()
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(d / "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(str(d / "dlib_face_recognition_resnet_model_v1.dat"))
    out = torch.full((len(paths), 128), float("nan"), dtype=torch.float64)
    for k, path in enumerate(paths):
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        boxes = list(detector(image, 1))
        if boxes:
            box = max(boxes, key=lambda b: b.width() * b.height())
            shape = predictor(image, box)
            out[k] = torch.tensor(list(net.compute_face_descriptor(image, shape)))
        if progress is not None:
            progress(k + 1, len(paths))
    return out


def _best_rate(run: Callable[[], object], count: int, repeats: int) -> float:
    """Items per second of the fastest of ``repeats`` calls of ``run`` (``count`` items each)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return count / best


def _our_net(model: Path | None, dat: Path) -> DlibResNet:
    if model is not None:
        from facetag.models.io import load_embedder

        net = load_embedder(model).net
        if not isinstance(net, DlibResNet):
            raise ModelError(f"{model}: expected a dlib-resnet model file, got an EmbeddingNet")
        return net
    from facetag.models.dlib_import import load_dlib

    _, state, _ = load_dlib(dat)
    net = DlibResNet()
    net.load_state_dict(state)
    return net.folded(channels_last=True)


def bench_embed(
    chips: Sequence[np.ndarray] | np.ndarray,
    *,
    model: Path | None = None,
    batch_sizes: Sequence[int] = (32, 64),
    repeats: int = 3,
    dlib_repeats: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Chips per second of our network and of dlib's on the same chips, and their ratio.

    ``chips``: N aligned RGB chips, each (150, 150, 3) uint8 as dlib.get_face_chip cuts
    them. ``model``: a facetag model file of the dlib-resnet architecture (default: the
    .dat in face_recognition_models, imported in memory, float32). Returns a dict with
    ``ours`` (chips/s per batch size), ``dlib`` (chips/s for the list call and chip by
    chip), the best of each, ``ratio`` (ours / dlib), ``max_abs_diff`` between the
    descriptors, and the thread counts and machine the figures come from. ``threads``
    sets torch's thread count for the run (default: leave torch's default, one per core).
    """
    arrays = [np.ascontiguousarray(c, dtype=np.uint8) for c in chips]
    if not arrays or any(c.shape != (CHIP_SIZE, CHIP_SIZE, 3) for c in arrays):
        shapes = sorted({c.shape for c in arrays})
        raise ValueError(
            f"bench_embed: expected chips of shape ({CHIP_SIZE}, {CHIP_SIZE}, 3), got "
            f"{shapes or 'none'}; cut them with dlib_chips()"
        )
    if repeats < 1 or dlib_repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(
            f"bench_embed: expected repeats, dlib_repeats and batch sizes >= 1, got "
            f"repeats={repeats}, dlib_repeats={dlib_repeats}, batch_sizes={list(batch_sizes)}"
        )
    N = len(arrays)
    dat = _models_dir() / "dlib_face_recognition_resnet_model_v1.dat"
    dlib = _dlib()
    theirs = dlib.face_recognition_model_v1(str(dat))
    net = _our_net(model, dat)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, 150, 150) uint8

    def ours(B: int) -> torch.Tensor:
        return torch.cat([net(x[i : i + B]) for i in range(0, N, B)])  # (N, 128)

    def dlib_list() -> list[Any]:
        return list(theirs.compute_face_descriptor(arrays, 0))

    def dlib_each() -> list[Any]:
        return [theirs.compute_face_descriptor(c, 0) for c in arrays]

    default_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        with torch.inference_mode():
            reference = np.array([np.array(d) for d in dlib_list()])  # also dlib's warm-up
            rates = {}
            for B in batch_sizes:
                got = ours(B)  # warm-up (oneDNN picks its kernels on the first call)
                rates[B] = _best_rate(functools.partial(ours, B), N, repeats)
    finally:
        torch.set_num_threads(default_threads)
    dlib_rates = {
        "list": _best_rate(dlib_list, N, dlib_repeats),
        "one_by_one": _best_rate(dlib_each, N, dlib_repeats),
    }
    ours_best = max(rates.values())
    dlib_best = max(dlib_rates.values())
    return {
        "chips": N,
        "ours": {"chips_per_s": {str(B): r for B, r in rates.items()}, "best": ours_best},
        "dlib": {"chips_per_s": dlib_rates, "best": dlib_best},
        "ratio": ours_best / dlib_best,
        "max_abs_diff": float(np.abs(got.double().numpy() - reference).max()),
        "torch_threads": used_threads,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "dlib_version": dlib.__version__,
        "model": str(model) if model is not None else str(dat),
    }


def load_chips(folder: Path | None, n: int) -> list[np.ndarray]:
    """``n`` 150x150 RGB chips: the images of ``folder`` (*.jpg, *.png), or without one the
    faces of scikit-image's astronaut photo cut by dlib, repeated to make ``n``."""
    if folder is not None:
        from PIL import Image

        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
        chips = [
            np.asarray(Image.open(f).convert("RGB").resize((CHIP_SIZE, CHIP_SIZE))) for f in files
        ]
    else:
        from skimage import data

        chips = dlib_chips(data.astronaut())  # type: ignore[no-untyped-call]
    if not chips:
        raise ModelError(f"{folder}: expected face chips (*.jpg, *.png), got none")
    return [chips[i % len(chips)] for i in range(n)]
