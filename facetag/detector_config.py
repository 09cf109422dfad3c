"""Detector training configuration: frozen dataclasses and TOML presets, as facetag.config.

Sections [data], [model], [train] (different fields from the embedder's); precedence
defaults < TOML < overrides (CLI flags); unknown keys, wrong types and bad values raise
ConfigError naming the key and the fix. The type checks and TOML reading are
facetag.config's own helpers.

    cfg = DETECTOR.load(Path("experiments/configs/detector.toml"), {"epochs": 2})
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from facetag.config import FLAG_KEYS as EMBEDDER_FLAGS
from facetag.config import Schema, check_limits

Stage = Literal["pnet", "rnet", "onet"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class DetectorDataConfig:
    """Where boxes, photos and extra faces and non-faces come from (relative to ``path``)."""

    path: str = ""  # data root holding the folders below; usually given with --data
    name: str = "facetag-detector"  # MLflow experiment
    boxes: str = "wider_train/wider_face_train_bbx_gt.txt"  # WIDER-format or CSV box file
    images: str = "wider_train/images"  # the box file's image paths are relative to this
    val_fraction: float = 0.15  # share of the photos (not faces) kept aside for validation
    max_train_images: int = 0  # use at most this many training photos; 0 = all
    val_ap_images: int = 40  # validation photos scored after every epoch (all at the end)
    min_face: float = 12.0  # faces smaller than this (px high) are no positives
    nonface: str = "nonface"  # photos without faces: negatives only; "" = none
    crop_sets: tuple[str, ...] = ("lfw", "glint_celebs", "johns")  # face-crop sets
    crops_per_set: int = 600  # images taken from each crop set
    # Teacher landmarks (facetag data landmarks); "" = none, and the ONet learns no
    # landmarks. A path relative to the working directory, or absolute.
    landmarks: str = ""


@dataclass(frozen=True)
class DetectorModelConfig:
    """The cascade (facetag.models.detector): which stages and their conv widths."""

    stages: tuple[str, ...] = ("pnet", "rnet", "onet")
    pnet_widths: tuple[int, ...] = (10, 16, 32)
    rnet_widths: tuple[int, ...] = (28, 48, 64, 128)
    onet_widths: tuple[int, ...] = (16, 32, 32, 64, 128)


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Patch sampling and the optimisation of each stage."""

    epochs: int = 6  # epochs per stage; the run has epochs * len(stages) epochs
    batch_size: int = 256  # patches per step
    lr: float = 3e-3  # AdamW peak learning rate (one-cycle)
    weight_decay: float = 1e-4
    box_weight: float = 0.5  # loss = BCE(face) + box_weight * smooth L1(box offsets)
    landmark_weight: float = 1.0  # ... + landmark_weight * smooth L1(landmarks), ONet (MTCNN: 1)
    ohem: float = 0.7  # share of each batch's labelled patches whose face loss counts (1 = all)
    # The landmark phase, after the ONet's epochs: the ONet again, on its patches with
    # landmarks and as many without, the landmark loss near L1 (beta) and weighted up, so
    # that the 10 coordinates get gradients as large as the face score's (0 = no phase).
    landmark_epochs: int = 0
    landmark_lr: float = 1e-3  # a fine-tune: a third of lr
    landmark_beta: float = 0.02  # smooth L1's beta on landmarks in the phase (stages: 1)
    landmark_phase_weight: float = 5.0  # landmark_weight in the phase
    jitter_per_face: int = 20  # windows sampled around each face (pos / part / none)
    negatives_per_image: int = 60  # random windows anywhere in a photo
    near_negatives_per_face: int = 4  # windows next to each face
    hard_negatives_per_image: int = 40  # at most this many mined windows per photo
    max_patches: int = 250000  # per stage, after balancing
    seed: int = 0  # split, sampling, init and order
    device: Device = "auto"
    health_every: int = 10  # per-layer gradient health of every N-th step, to MLflow


@dataclass(frozen=True)
class DetectorConfig:
    data: DetectorDataConfig = dataclasses.field(default_factory=DetectorDataConfig)
    model: DetectorModelConfig = dataclasses.field(default_factory=DetectorModelConfig)
    train: DetectorTrainConfig = dataclasses.field(default_factory=DetectorTrainConfig)


SECTIONS: dict[str, type[Any]] = {
    "data": DetectorDataConfig,
    "model": DetectorModelConfig,
    "train": DetectorTrainConfig,
}
FLAG_KEYS = {k: v for k, v in EMBEDDER_FLAGS.items() if k != "init"}  # as facetag train
_STAGES = ("pnet", "rnet", "onet")
LIMITS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.val_fraction": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "data.max_train_images": (lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "data.val_ap_images": (lambda v: v >= 1, "an integer >= 1"),
    "data.min_face": (lambda v: v >= 4, "a size >= 4 px"),
    "data.crops_per_set": (lambda v: v >= 0, "an integer >= 0"),
    "data.crop_sets": (
        lambda v: all(s in ("lfw", "glint_celebs", "johns", "celeba") for s in v),
        "names from lfw, glint_celebs, johns, celeba (celeba needs landmarks)",
    ),
    "model.stages": (
        lambda v: len(v) >= 1 and tuple(v) == _STAGES[: len(v)],
        '["pnet"], ["pnet", "rnet"] or ["pnet", "rnet", "onet"]',
    ),
    "model.pnet_widths": (lambda v: len(v) == 3 and min(v) >= 1, "3 widths >= 1"),
    "model.rnet_widths": (lambda v: len(v) == 4 and min(v) >= 1, "4 widths >= 1"),
    "model.onet_widths": (lambda v: len(v) == 5 and min(v) >= 1, "5 widths >= 1"),
    "train.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "train.batch_size": (lambda v: v >= 2, "an integer >= 2 (batch norm needs 2)"),
    "train.lr": (lambda v: v > 0, "a value > 0"),
    "train.weight_decay": (lambda v: v >= 0, "a value >= 0"),
    "train.box_weight": (lambda v: v >= 0, "a value >= 0"),
    "train.landmark_weight": (lambda v: v >= 0, "a value >= 0"),
    "train.ohem": (lambda v: 0 < v <= 1, "a share in (0, 1]"),
    "train.landmark_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "train.health_every": (lambda v: v >= 1, "an integer >= 1"),
    "train.landmark_lr": (lambda v: v > 0, "a value > 0"),
    "train.landmark_beta": (lambda v: v > 0, "a value > 0"),
    "train.landmark_phase_weight": (lambda v: v >= 0, "a value >= 0"),
    "train.jitter_per_face": (lambda v: v >= 1, "an integer >= 1"),
    "train.negatives_per_image": (lambda v: v >= 0, "an integer >= 0"),
    "train.near_negatives_per_face": (lambda v: v >= 0, "an integer >= 0"),
    "train.hard_negatives_per_image": (lambda v: v >= 0, "an integer >= 0"),
    "train.max_patches": (lambda v: v >= 100, "an integer >= 100"),
    "train.seed": (lambda v: v >= 0, "an integer >= 0"),
}


def _build(values: dict[str, dict[str, Any]], origin: dict[str, str]) -> DetectorConfig:
    config = DetectorConfig(**{s: SECTIONS[s](**values[s]) for s in SECTIONS})
    check_limits(config, origin, LIMITS)
    return config


DETECTOR: Schema[DetectorConfig] = Schema("detector config", SECTIONS, FLAG_KEYS, _build)
