"""torchvision's NMS and RoIAlign kernels, without importing torchvision.ops.

``import torchvision.ops`` runs torchvision/__init__, which imports torchvision.models and
through them torch._dynamo: about 1 s and 170 MB of resident memory (experiments/LOG.md)
for a detection or tagging run that needs two C++ kernels. Those kernels live in
torchvision's extension library, which registers them as torch.ops.torchvision.* when it
is loaded; loading that library alone gives the same functions (torchvision.ops.nms and
roi_align call exactly these ops). Where the library is not found or does not load
(another torchvision layout or platform), torchvision.ops is imported as before.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import threading
from pathlib import Path

import torch
from torch import Tensor

_lock = threading.Lock()
_loaded = False


def _extension_library() -> Path | None:
    """torchvision's compiled extension (_C*.so / .pyd), found without importing it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    for suffix in [*importlib.machinery.EXTENSION_SUFFIXES, ".so"]:
        for lib in sorted(folder.glob(f"_C*{suffix}")):
            return lib
    return None


def _ensure_ops() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        lib = _extension_library()
        try:
            if lib is None:
                raise OSError("no torchvision extension library")
            torch.ops.load_library(str(lib))
            torch.ops.torchvision.nms  # noqa: B018 - raises if the library lacks the op
        except (OSError, RuntimeError, AttributeError):
            import torchvision.ops  # noqa: F401 - registers the same ops

        _loaded = True


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """torchvision.ops.nms: boxes (K, 4) x1 y1 x2 y2, scores (K,) -> kept indices, by score."""
    _ensure_ops()
    keep: Tensor = torch.ops.torchvision.nms(boxes, scores, iou_threshold)
    return keep


def roi_align(
    image: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """torchvision.ops.roi_align with rois (K, 5) = (batch index, x1, y1, x2, y2):
    image (N, C, H, W) -> (K, C, output_size, output_size)."""
    _ensure_ops()
    out: Tensor = torch.ops.torchvision.roi_align(
        image, rois, spatial_scale, output_size, output_size, sampling_ratio, aligned
    )
    return out
