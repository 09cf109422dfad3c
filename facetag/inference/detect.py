"""Find faces in photos of any size with the detector cascade (facetag.models.detector).

    image (3, H, W) pixels
      -> pyramid: scales 12/min_face * 0.709^k down to a 12-px image, each run through PNet
         (fully convolutional: one 12x12 window every 2 px) -> windows with face prob > t0,
         NMS 0.5 per scale, NMS 0.7 over all scales, box regression, made square
      -> RNet on the 24x24 crops of those windows -> prob > t1, NMS 0.7, regression, square
      -> ONet (when the model has one) on 48x48 crops -> prob >= threshold, regression
      -> NMS over the final boxes; boxes in the pixels of the photo as displayed

Large photos are loaded at most ``max_side`` (1600) px on their longer side (JPEGs are
decoded at that size directly) and the boxes scaled back, so a 100-megapixel photo costs
what a 1600-px one does (and the smallest face found grows with the shrink). Photos are
handled one at a time and nothing is kept between them, so memory stays flat over a folder
of any length. NMS and the crops use torchvision.ops (inference and patch cutting only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from facetag.checkpoint import load_checkpoint
from facetag.data.images import find_images, image_size, load_image
from facetag.data.patches import crop_windows, halvings
from facetag.errors import DataError, FacetagError, ModelError
from facetag.models.detector import PNET_STRIDE, Cascade, StageNet, normalize_patches

DETECTOR_FORMAT = "facetag-detector/1"
SHIPPED = "facetag/weights/detector.pt"  # shown as the model name for the shipped weights
MAX_CANDIDATES = 2000  # windows kept per pyramid level and per stage (by score)
REFINE_CHUNK = 256  # crops per forward pass of RNet / ONet: bounds the activations' memory


@dataclass(frozen=True)
class DetectSettings:
    """How the cascade is run; the model file stores the defaults it was tuned with."""

    min_face: float = 20.0  # smallest face searched for, px high (in the loaded image)
    scale_factor: float = 0.709  # pyramid step: each level is 0.709x the previous one
    stage_thresholds: tuple[float, ...] = (0.6, 0.7)  # PNet, RNet probs (all but the last)
    threshold: float = 0.8  # the last stage's prob: the reported score
    nms_per_scale: float = 0.5  # PNet NMS inside one pyramid level
    nms_stage: float = 0.7  # NMS after each stage
    nms_final: float = 0.4  # NMS on the final boxes: a face is reported once
    nested_final: float = 0.7  # ... and a box this much inside a better one is dropped
    # Larger photos are shrunk to this before detection: a 100-megapixel photo then peaks
    # at ~165 MB above the loaded model (2048 px: ~265 MB, the process going over 0.9 GB).
    max_side: int = 1600


@dataclass
class Detector:
    """A loaded, fused cascade and its settings; ``name`` identifies it in outputs."""

    cascade: Cascade
    settings: DetectSettings
    name: str
    device: str = "cpu"
    state: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def detect(
        self, image: Tensor, *, min_face: float | None = None, threshold: float | None = None
    ) -> Tensor:
        """Faces in one image (3, H, W) of 0..255 float pixels -> (K, 5) x1 y1 x2 y2 score.

        Boxes are in the image's pixels, clipped to it, sorted by decreasing score.
        """
        s = self.settings
        windows, scores = self.propose(
            image, stages=len(self.cascade.kinds), min_face=min_face, threshold=threshold
        )
        if windows.numel() == 0:
            return image.new_zeros(0, 5)
        keep = nms(windows, scores, s.nms_final)
        keep = keep[drop_nested(windows[keep], s.nested_final)]
        boxes, scores = windows[keep], scores[keep]
        H, W = image.shape[1:]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        return torch.cat([boxes, scores[:, None]], dim=1).cpu()  # (K, 5)

    @torch.no_grad()
    def propose(
        self,
        image: Tensor,
        stages: int,
        *,
        min_face: float | None = None,
        threshold: float | None = None,
        thresholds: tuple[float, ...] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the first ``stages`` stages: (boxes (K, 4) regressed, not squared; probs (K,)).

        Training uses this to mine the windows a partly trained cascade gets wrong.
        ``thresholds`` overrides the prob thresholds of the stages run (all of them).
        """
        s = self.settings
        image = image.to(self.device, torch.float32)
        kinds = self.cascade.kinds[:stages]
        if thresholds is None:
            n = len(self.cascade.kinds)
            last = s.threshold if threshold is None else threshold
            thresholds = (*s.stage_thresholds[: n - 1], last)[:stages]
        boxes, scores = self._pnet(image, min_face or s.min_face, thresholds[0])
        levels = halvings(image) if len(kinds) > 1 else [image]
        for kind, t in zip(kinds[1:], thresholds[1:], strict=True):
            if boxes.numel() == 0:
                break
            boxes, scores = self._refine(levels, self.cascade.stage(kind), square(boxes), t)
        return boxes, scores

    def _pnet(self, image: Tensor, min_face: float, t: float) -> tuple[Tensor, Tensor]:
        pnet = self.cascade.stage("pnet")
        H, W = image.shape[1:]
        s = self.settings
        found_w, found_s, found_r = [], [], []
        scale = 12.0 / min_face  # a min_face-high face becomes PNet's 12-px window
        previous = image[None]  # (1, 3, H, W)
        while min(H, W) * scale >= 12:
            h, w = max(12, math.ceil(H * scale)), max(12, math.ceil(W * scale))
            # Each level is resized from the one before (0.709x), not from the photo: the
            # pyramid then costs about twice its first level rather than once per level.
            x = F.interpolate(
                previous,
                size=(h, w),
                mode="bilinear",
                align_corners=False,
                antialias=h < previous.shape[2],
            )  # (1, 3, h, w)
            previous = x
            logit, offsets = pnet(_channels_last(normalize_patches(x)))  # (1, 1|4, h', w')
            prob = torch.sigmoid(logit[0, 0])  # (h', w')
            ys, xs = torch.nonzero(prob > t, as_tuple=True)
            if ys.numel():
                score = prob[ys, xs]
                if score.numel() > MAX_CANDIDATES:
                    top = score.topk(MAX_CANDIDATES).indices
                    ys, xs, score = ys[top], xs[top], score[top]
                sx, sy = w / W, h / H
                win = torch.stack(
                    [
                        xs * PNET_STRIDE / sx,
                        ys * PNET_STRIDE / sy,
                        (xs * PNET_STRIDE + 12) / sx,
                        (ys * PNET_STRIDE + 12) / sy,
                    ],
                    dim=1,
                ).float()  # (K, 4) in image pixels
                reg = offsets[0, :, ys, xs].T  # (K, 4)
                keep = nms(win, score, s.nms_per_scale)
                found_w.append(win[keep])
                found_s.append(score[keep])
                found_r.append(reg[keep])
            scale *= s.scale_factor
        if not found_w:
            return image.new_zeros(0, 4), image.new_zeros(0)
        win, score, reg = torch.cat(found_w), torch.cat(found_s), torch.cat(found_r)
        keep = nms(win, score, s.nms_stage)[:MAX_CANDIDATES]
        return regress(win[keep], reg[keep]), score[keep]

    def _refine(
        self, levels: list[Tensor], net: StageNet, windows: Tensor, t: float
    ) -> tuple[Tensor, Tensor]:
        probs, regs = [], []
        # In chunks: 2000 RNet crops at once would hold ~100 MB of activations.
        for chunk in windows.split(REFINE_CHUNK):
            crops = crop_windows(levels, chunk, net.size)  # (k, 3, S, S)
            logit, offsets = net(_channels_last(normalize_patches(crops)))  # (k, 1|4, 1, 1)
            probs.append(torch.sigmoid(logit[:, 0, 0, 0]))  # (k,)
            regs.append(offsets[:, :, 0, 0])  # (k, 4)
        prob, reg = torch.cat(probs), torch.cat(regs)
        keep = prob >= t
        windows, prob, reg = windows[keep], prob[keep], reg[keep]
        keep = nms(windows, prob, self.settings.nms_stage)[:MAX_CANDIDATES]
        return regress(windows[keep], reg[keep]), prob[keep]


def drop_nested(boxes: Tensor, limit: float) -> Tensor:
    """Indices of ``boxes`` (K, 4), sorted by decreasing score, to keep: a box is dropped when
    its intersection with a kept box covers more than ``limit`` of the smaller of the two.

    IoU-based NMS keeps a box that lies inside a larger one (an eyes-to-mouth box inside
    the face's box has IoU ~0.4 with it); MTCNN's last NMS uses this "min" overlap too.
    """
    K = boxes.shape[0]
    if K < 2:
        return torch.arange(K)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)  # (K,)
    iw = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None])).clamp(min=0)
    ih = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None])).clamp(min=0)
    cover = iw * ih / torch.minimum(area[:, None], area[None]).clamp(min=1e-6)  # (K, K)
    kept: list[int] = []
    for i in range(K):
        if not kept or float(cover[i, kept].max()) <= limit:
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long)


def _channels_last(x: Tensor) -> Tensor:
    # NOTE: on the CPU, max-pooling (and oneDNN's convolutions) run about 3x faster on
    # (N, H, W, C) memory than on (N, C, H, W): measured 7 vs 22 ms for PNet's first pool.
    return x.contiguous(memory_format=torch.channels_last)


def regress(windows: Tensor, offsets: Tensor) -> Tensor:
    """Apply box offsets (K, 4), in units of each window's side, to windows (K, 4)."""
    side = (windows[:, 2] - windows[:, 0])[:, None]  # (K, 1)
    return windows + offsets * side


def square(boxes: Tensor) -> Tensor:
    """Boxes (K, 4) -> squares (K, 4) of side max(w, h) with the same centres."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)


def shipped_weights() -> Path:
    """The detector weights inside the package (trained with experiments/configs/detector.toml)."""
    return Path(str(resources.files("facetag") / "weights" / "detector.pt"))


def detector_from_state(state: dict[str, Any], name: str, device: str = "cpu") -> Detector:
    """Rebuild a fused, eval-mode Detector from a detector model file's contents."""
    if state.get("format") != DETECTOR_FORMAT:
        raise ModelError(
            f"{name}: expected a facetag detector model (format {DETECTOR_FORMAT}), got "
            f"{state.get('format', 'a checkpoint without a model format')!r}; pass the "
            "detector.pt that facetag train-detector wrote, or a runs:/ or models:/ URI"
        )
    widths = {k: tuple(int(v) for v in w) for k, w in state["widths"].items()}
    cascade = Cascade(widths, list(state["stages"]))
    cascade.load_state_dict(state["weights"])
    for kind in cascade.kinds:
        cascade.stage(kind).fuse()
    cascade.to(device).eval()
    raw = state.get("settings", {})
    settings = DetectSettings(
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in raw.items()
            if k in DetectSettings.__dataclass_fields__
        }
    )
    return Detector(cascade, settings, name, device, state)


def load_detector(spec: str | Path | None = None, device: str = "cpu") -> Detector:
    """The detector ``spec`` names: None = the shipped weights, a checkpoint path,
    ``runs:/<run_id>/<path>`` or ``models:/facetag-detector@champion``."""
    if spec is None:
        path = shipped_weights()
        if not path.is_file():
            raise ModelError(
                f"{path}: expected the shipped detector weights, got no such file; "
                "reinstall facetag or pass --model"
            )
        state = load_checkpoint(path)
        return detector_from_state(state, f"shipped:{state.get('model_id', 'detector')}", device)
    text = str(spec)
    if text.startswith(("runs:/", "models:/")) or Path(text).is_dir():
        from facetag.training.tracking import resolve_model_uri

        path = resolve_model_uri(text)
    else:
        path = Path(text)
    return detector_from_state(load_checkpoint(path), text, device)


def load_photo(path: Path, max_side: int) -> tuple[Tensor, int, int, float]:
    """(image (3, h, w) float 0..255, displayed W, displayed H, loaded/displayed scale)."""
    W, H = image_size(path)
    img = load_image(path, "RGB", max_side=max_side)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x, W, H, img.size[0] / W


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
    x, W, H, scale = load_photo(path, detector.settings.max_side)
    found = detector.detect(x, min_face=min_face, threshold=threshold)  # (K, 5)
    boxes = (found[:, :4] / scale).tolist()
    faces = [
        {"box": [round(v, 1) for v in box], "score": round(float(score), 4)}
        for box, score in zip(boxes, found[:, 4].tolist(), strict=True)
    ]
    return {"path": str(path), "width": W, "height": H, "faces": faces}


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
            yield PhotoResult(
                path, detect_photo(detector, path, min_face=min_face, threshold=threshold)
            )
        except DataError as e:
            yield PhotoResult(path, error=str(e))


def detect_for_scoring(
    detector: Detector,
    images: dict[str, Path],
    *,
    min_face: float | None = None,
    threshold: float = 0.05,
    on_error: Callable[[str, str], None] | None = None,
) -> dict[str, list[tuple[float, float, float, float, float]]]:
    """{image name: [(x1, y1, x2, y2, score)]} with a low threshold, for the AP scorer."""
    out: dict[str, list[tuple[float, float, float, float, float]]] = {}
    for name, path in images.items():
        try:
            r = detect_photo(detector, path, min_face=min_face, threshold=threshold)
        except FacetagError as e:
            if on_error is None:
                raise
            on_error(name, str(e))
            continue
        out[name] = [(*f["box"], f["score"]) for f in r["faces"]]
    return out


def with_settings(detector: Detector, **changes: Any) -> Detector:
    """A copy of ``detector`` sharing its nets, with some settings changed."""
    return replace(detector, settings=replace(detector.settings, **changes))


def detect_paths(
    paths: Iterable[Path],
    *,
    recursive: bool = False,
    min_face: float | None = None,
    threshold: float | None = None,
    device: str = "auto",
    model: str | None = None,
    on_error: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], int]:
    """``facetag detect``: (the JSON document, number of photos or folders that failed).

    Each failure is also passed to on_error (one line) as it happens; the others go on.
    """
    from facetag.device import resolve_device

    dev = resolve_device(device)
    detector = load_detector(model, dev)
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


def evaluate_boxes(
    boxes_file: Path,
    images_root: Path,
    *,
    device: str = "auto",
    model: str | None = None,
    min_face: float | None = None,
    on_error: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``facetag evaluate-detector``: AP50, AP50 (>= 32 px) and recall at 1 FP/image.

    Photos of the box file that cannot be read are reported through on_error and left out.
    """
    from facetag.data.boxes import read_boxes, resolve_image
    from facetag.device import resolve_device
    from facetag.inference.ap import score_detector

    dev = resolve_device(device)
    detector = load_detector(model, dev)
    truth = read_boxes(boxes_file)
    paths = {name: resolve_image(images_root, name) for name in truth}
    failed: list[str] = []

    def problem(name: str, message: str) -> None:
        failed.append(name)
        if on_error is not None:
            on_error(message)

    found = detect_for_scoring(detector, paths, min_face=min_face, on_error=problem)
    if not found:
        raise DataError(
            f"{images_root}: expected the photos named in {boxes_file}, could read none; "
            "check --images"
        )
    scores = score_detector(found, {k: v for k, v in truth.items() if k in found})
    return {
        "device": dev,
        "model": {"detector": detector.name},
        "boxes": str(boxes_file),
        "failed_images": len(failed),
        **scores.as_dict(),
    }


def bench_detect(
    folder: Path,
    *,
    device: str = "auto",
    model: str | None = None,
    repeats: int = 3,
    min_face: float | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """``facetag bench detect``: photos/s over the photos of ``folder`` (decoding included).

    One warm-up photo, then ``repeats`` passes, on ``threads`` CPU threads (None: torch's
    default, one per core). Peak memory is the process's peak resident
    size (ru_maxrss: Python, torch and the detector included) after the first pass and at
    the end: equal values mean memory does not grow with the number of photos.
    """
    import platform
    import resource

    from facetag.device import resolve_device

    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    detector = load_detector(model, dev)
    paths = find_images([folder])
    detect_photo(detector, paths[0], min_face=min_face)

    def rss_mb() -> float:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / (1024 * 1024) if platform.system() == "Darwin" else kb / 1024

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
            peak_first = rss_mb()
    seconds = time.perf_counter() - t0
    sizes = sorted({image_size(p) for p in paths})
    return {
        "device": dev,
        "device_name": torch.cuda.get_device_name()
        if dev == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "model": detector.name,
        "photos": n,
        "distinct_photos": len(paths),
        "sizes": [list(s) for s in sizes[:5]],
        "seconds": round(seconds, 3),
        "photos_per_s": round(n / seconds, 3),
        "faces_per_photo": round(faces / max(n, 1), 2),
        "peak_rss_mb_first_pass": round(peak_first, 1),
        "peak_rss_mb": round(rss_mb(), 1),
    }
