"""The models of an enrol or tag run: embedder, detector, device and threshold.

The CLI resolves what the user named (a path, runs:/, models:/, nothing for the shipped
files) into ``ModelRef``s (facetag.training.tracking.resolve_model); this module only
loads local files, so inference never reaches into the tracking store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facetag.device import resolve_device
from facetag.inference.align import FaceDetector, WholePhotoDetector
from facetag.models.detector import load_detector
from facetag.models.io import (
    LoadedEmbedder,
    ModelRef,
    check_threshold,
    load_embedder,
    shipped_embedder,
)

DEFAULT_THRESHOLD = 0.5  # cosine distance used when neither --threshold nor the model has one


@dataclass
class Models:
    """The embedder and detector of a run, on ``device``, and the threshold used."""

    embedder: LoadedEmbedder
    detector: FaceDetector
    device: str
    threshold: float
    threshold_source: str  # "--threshold", "calibrated", "model file" or "default"
    embedder_source: str = ""  # the --model spec, or "shipped"

    def info(self) -> dict[str, Any]:
        """The ``model`` block of the tag JSON (versions, MLflow run ids, threshold)."""
        det_state = getattr(self.detector, "state", None) or {}
        return {
            "detector": self.detector.name,
            "embedder": self.embedder.version,
            "embedder_source": self.embedder_source,
            "run_ids": {
                "detector": det_state.get("run_id") or None,
                "embedder": self.embedder.state.get("run_id") or None,
            },
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            # where imported weights come from (source file, sha256, licence), when they do
            **(
                {"embedder_provenance": prov}
                if (prov := self.embedder.state.get("provenance"))
                else {}
            ),
            # the detector's landmark teachers (packages, weight files' sha256, licences)
            **({"detector_provenance": d} if (d := det_state.get("provenance")) else {}),
        }


def open_detector(ref: ModelRef, device: str) -> FaceDetector:
    """``none`` -> WholePhotoDetector (every photo is a face crop); else the cascade."""
    if ref.spec == "none":
        return WholePhotoDetector()
    return load_detector(ref.path, device, None if ref.path is None else ref.spec)


def resolve_threshold(
    override: float | None, ref: ModelRef, embedder: LoadedEmbedder
) -> tuple[float, str]:
    """--threshold, else the calibrated one (facetag evaluate), else the model file's,
    else DEFAULT_THRESHOLD; with where it came from."""
    if override is not None:
        return float(override), "--threshold"
    if ref.calibrated_threshold is not None:
        where = ref.path or Path(ref.spec)
        t = check_threshold(where, ref.calibrated_threshold, "the calibrated threshold")
        assert t is not None
        return t, "calibrated"
    if embedder.threshold is not None:
        return float(embedder.threshold), "model file"
    return DEFAULT_THRESHOLD, "default"


def load_models(
    embedder: ModelRef | None = None,
    detector: ModelRef | None = None,
    device: str = "auto",
    threshold: float | None = None,
) -> Models:
    """Resolve the device (DeviceError for cuda without a GPU), then load both models
    (None: the shipped files)."""
    embedder = embedder or ModelRef()
    dev = resolve_device(device)
    emb = load_embedder(embedder.path or shipped_embedder(), dev)
    det = open_detector(detector or ModelRef(), dev)
    t, source = resolve_threshold(threshold, embedder, emb)
    return Models(emb, det, dev, t, source, embedder.spec)
