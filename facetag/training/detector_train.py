"""``facetag train-detector``: train the cascade stage by stage, tracked like ``facetag train``.

For each stage (PNet, then RNet, then ONet):

1. patches: windows around the training faces (positives, part faces), random and
   near-face windows (negatives), negatives from face-free photos, positives from
   person-folder crops, and, from the second stage on, the windows the stages trained so
   far propose on the training photos, labelled by IoU (their false positives are the
   hard negatives); balanced and capped (facetag.data.patches);
2. ``epochs`` epochs of AdamW with a one-cycle schedule on
   BCE(face logit) + box_weight * smooth L1(box offsets), with flips and colour jitter.

The run has epochs * stages epochs in all. After each: the losses, the validation AP50 of
the cascade so far on ``val_ap_images`` held-out photos, per-layer gradient norms, and an
atomic checkpoint (``--resume RUN_ID`` continues, reusing the cached patches). At the end
the whole validation split is scored, and the model file (format facetag-detector/1) is
written, logged to MLflow and registered as ``facetag-detector`` (``champion`` alias when
it beats the champion on the same validation split).

Validation photos are chosen by photo with the seed (facetag.data.boxes.split_images);
nothing is read from dlib_faces.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from facetag import __version__
from facetag.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from facetag.data.boxes import BoxFile, FaceBox, read_boxes, resolve_image, split_images
from facetag.data.images import decode_photo, is_image_file
from facetag.data.patches import (
    NEG,
    PART,
    POS,
    POS_NO_BOX,
    PatchSet,
    balance,
    crop_positives,
    label_windows,
    patches_from_windows,
    random_windows,
)
from facetag.detector_config import (
    DETECTOR,
    DetectorConfig,
)
from facetag.device import keep_freed_memory, resolve_device
from facetag.errors import ConfigError, DataError, TrainingError
from facetag.metrics.ap import DetectionScores, score_detector
from facetag.models.detector import (
    DETECTOR_FORMAT,
    STAGE_SIZES,
    Cascade,
    Detector,
    DetectSettings,
    StageNet,
    detector_from_state,
    normalize_patches,
    square,
)
from facetag.progress import Progress, ProgressFn
from facetag.training.core import (
    StepContext,
    TrackedRun,
    check_loss,
    end_epoch,
    optimizer_step,
    param_groups,
    resolve_config,
    runs_dir,
)
from facetag.training.detector_losses import (
    augment,
    detector_losses,
    landmark_error,
    patch_loss,
)
from facetag.training.health import GradientHealth
from facetag.training.teachers import LANDMARKS_FORMAT, landmark_provenance

REGISTERED_DETECTOR = "facetag-detector"
MINE_THRESHOLDS = {"pnet": 0.5, "rnet": 0.5}  # stage probs kept when mining for the next stage
# Share of each label in a stage's patches (MTCNN uses about 3:1:1 negatives:pos:part).
LABEL_SHARE = {NEG: 0.5, POS: 0.2, PART: 0.2, POS_NO_BOX: 0.1}
SCORE_THRESHOLD = 0.05  # the last stage's prob kept when scoring AP: the whole curve
MAX_SIDE = 1536  # training photos are used at most this large (WIDER's are 1024 wide)


@dataclass
class EpochRecord:
    epoch: int
    stage: str
    train_loss: float
    face_loss: float
    box_loss: float
    face_accuracy: float
    val_loss: float
    val_ap50: float
    lr: float
    patches_per_s: float
    seconds: float
    landmark_loss: float = math.nan  # ONet only
    val_landmark_error: float = math.nan  # ONet only: mean error / eye distance, val patches

    def summary(self) -> dict[str, Any]:
        """The epoch in train-detector --json (None where not measured)."""
        keys = ("epoch", "stage", "train_loss", "landmark_loss", "val_ap50", "val_landmark_error")
        values = {k: getattr(self, k) for k in keys}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}

    def metrics(self) -> dict[str, float]:
        """The epoch's MLflow metrics."""
        return {
            "train_loss": self.train_loss,
            "face_loss": self.face_loss,
            "box_loss": self.box_loss,
            "face_accuracy": self.face_accuracy,
            **({"landmark_loss": self.landmark_loss} if not math.isnan(self.landmark_loss) else {}),
            **(
                {"val_landmark_error": self.val_landmark_error}
                if not math.isnan(self.val_landmark_error)
                else {}
            ),
            "val_loss": self.val_loss,
            "val_ap50": self.val_ap50,
            "lr": self.lr,
            "patches_per_s": self.patches_per_s,
            "epoch_seconds": self.seconds,
        }


@dataclass
class DetectorData:
    """The box file split by photo, and the other folders, resolved from the config."""

    root: Path
    boxes: BoxFile
    image_dir: Path
    train: list[str]
    val: list[str]
    nonface: list[Path]
    crop_sets: list[tuple[str, Path]]
    data_hash: str  # box file content + validation photos: "the same validation data"
    # Teacher labels of person-folder photos (facetag data landmarks): photo -> (box, marks)
    teacher: dict[Path, tuple[list[float], list[float]]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return resolve_image(self.image_dir, name)


def prepare_data(config: DetectorConfig) -> DetectorData:
    """Read the box file, split photos into train/val with the seed, find the extra sets."""
    d = config.data
    if not d.path:
        raise DataError(
            "train-detector: no data root given; pass --data PATH (the folder holding "
            f"{d.boxes}) or set [data] path"
        )
    root = Path(d.path)
    if not root.is_dir():
        raise DataError(f"{root}: expected the data folder, got no such folder; check --data")
    box_file = root / d.boxes
    boxes = read_boxes(box_file)
    image_dir = root / d.images
    if "dlib_faces" in box_file.parts or "dlib_faces" in image_dir.parts:
        raise ConfigError(
            f"[data] boxes: expected training boxes, got {box_file}; dlib_faces is a test "
            "set, use it with facetag evaluate-detector only"
        )
    names = [n for n in boxes if resolve_image(image_dir, n).is_file()]
    if not names:
        raise DataError(
            f"{image_dir}: expected the photos named in {box_file}, found none; check [data] images"
        )
    train, val = split_images(names, d.val_fraction, config.train.seed)
    if d.max_train_images:
        rng = np.random.default_rng(config.train.seed)
        pick = sorted(rng.choice(len(train), min(d.max_train_images, len(train)), replace=False))
        train = [train[i] for i in pick]
    nonface: list[Path] = []
    if d.nonface and (root / d.nonface).is_dir():
        nonface = sorted(p for p in (root / d.nonface).iterdir() if is_image_file(p))
    crop_sets = [(s, root / s) for s in d.crop_sets if d.crops_per_set and (root / s).is_dir()]
    digest = hashlib.sha256(box_file.read_bytes())
    digest.update("\n".join(val).encode())
    teacher: dict[Path, tuple[list[float], list[float]]] = {}
    if d.landmarks:
        boxes, teacher = attach_landmarks(Path(d.landmarks), root, image_dir, boxes)
    return DetectorData(
        root, boxes, image_dir, train, val, nonface, crop_sets, digest.hexdigest(), teacher
    )


def attach_landmarks(
    path: Path, root: Path, image_dir: Path, boxes: BoxFile
) -> tuple[BoxFile, dict[Path, tuple[list[float], list[float]]]]:
    """Read a ``facetag data landmarks`` file: the box file's faces with their teacher
    landmarks attached, and the person-folder photos' (teacher box, landmarks)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: expected a landmarks file from facetag data landmarks, got "
            f"{getattr(e, 'strerror', None) or type(e).__name__}; run facetag data landmarks"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != LANDMARKS_FORMAT:
        raise DataError(f"{path}: expected format {LANDMARKS_FORMAT}; run facetag data landmarks")
    by_image = {str(resolve_image(image_dir, n).relative_to(root)): n for n in boxes}
    out = {n: list(f) for n, f in boxes.items()}
    teacher: dict[Path, tuple[list[float], list[float]]] = {}
    for key, faces in doc["images"].items():
        name = by_image.get(key)
        for face in faces:
            flat = [float(v) for point in face["landmarks"] for v in point]
            if name is not None and "index" in face:
                out[name][face["index"]] = replace(out[name][face["index"]], landmarks=tuple(flat))
            elif name is None:
                teacher[root / key] = (face["box"], flat)
    return out, teacher


def load_rgb(path: Path) -> Tensor:
    """A photo as (3, H, W) float 0..255, shrunk to at most MAX_SIDE px."""
    return decode_photo(path, MAX_SIDE).chw()


def _scaled_faces(faces: list[FaceBox], scale: float) -> list[FaceBox]:
    if scale == 1.0:
        return faces
    return [
        FaceBox(
            f.x * scale,
            f.y * scale,
            f.w * scale,
            f.h * scale,
            f.invalid,
            None if f.landmarks is None else tuple(v * scale for v in f.landmarks),
        )
        for f in faces
    ]


def _photo(data: DetectorData, name: str) -> tuple[Tensor, list[FaceBox]]:
    """A box-file photo (3, H, W) and its faces, scaled when the photo was shrunk."""
    photo = decode_photo(data.path(name), MAX_SIDE)
    return photo.chw(), _scaled_faces(data.boxes[name], photo.scale)


def build_patches(
    config: DetectorConfig,
    data: DetectorData,
    names: list[str],
    kind: str,
    previous: Detector | None,
    seed: int,
    progress: ProgressFn | None = None,
    *,
    phase: str = "patches",
    extras: bool = True,
) -> PatchSet:
    """All patches of stage ``kind`` from photos ``names`` (mined with ``previous``)."""
    t = config.train
    size = STAGE_SIZES[kind]
    rng = np.random.default_rng(seed)
    parts: list[PatchSet] = []
    photos: list[tuple[str | Path, list[FaceBox]]] = [(n, data.boxes[n]) for n in names]
    if extras:
        photos += [(p, []) for p in data.nonface]
    for i, (item, faces) in enumerate(photos, start=1):
        if isinstance(item, Path):
            img = load_rgb(item)
        else:
            img, faces = _photo(data, item)
        H, W = img.shape[1:]
        windows = random_windows(
            faces,
            W,
            H,
            rng,
            min_face=config.data.min_face,
            jitter_per_face=t.jitter_per_face,
            # Later stages learn mostly from mined negatives: fewer random ones.
            negatives=t.negatives_per_image * (1 if faces else 4) // (4 if previous else 1),
            near_negatives_per_face=t.near_negatives_per_face,
            min_side=12,
        )
        if previous is not None:
            windows = np.concatenate([windows, _mined(previous, img, faces, t, rng)])
        parts.append(patches_from_windows(img, windows, faces, size))
        if progress is not None:
            progress(Progress(f"{kind} {phase}", i, len(photos)))
    if extras and data.crop_sets:
        parts.append(
            crop_positives(
                data.crop_sets,
                size,
                rng,
                load_rgb,
                config.data.crops_per_set,
                jitter=2,
                teacher=data.teacher,
            )
        )
    patches = PatchSet.cat(parts)
    limits = {k: int(t.max_patches * share) for k, share in LABEL_SHARE.items()}
    # Crop positives and part faces fill what the others leave free.
    return balance(patches, rng, limits)


def _mined(
    previous: Detector, img: Tensor, faces: list[FaceBox], t: Any, rng: np.random.Generator
) -> np.ndarray:
    """Square windows the cascade so far proposes (K, 4): every one near a face, and at most
    ``hard_negatives_per_image`` of its false positives (the hard negatives)."""
    stages = len(previous.cascade.kinds)
    thresholds = tuple(MINE_THRESHOLDS[k] for k in previous.cascade.kinds)
    boxes, _, _ = previous.propose(img, stages, thresholds=thresholds)
    if boxes.numel() == 0:
        return np.zeros((0, 4))
    windows = square(boxes).numpy().astype(np.float64)
    labels, _ = label_windows(windows, faces)
    negatives = np.nonzero(labels == NEG)[0]
    if len(negatives) > t.hard_negatives_per_image:
        drop = rng.choice(negatives, len(negatives) - t.hard_negatives_per_image, replace=False)
        windows = np.delete(windows, drop, axis=0)
    return windows


def make_detector(cascade: Cascade, kinds: list[str], device: str) -> Detector:
    """A fused copy of the first stages of ``cascade`` for mining and scoring."""
    state = {
        "format": DETECTOR_FORMAT,
        "stages": kinds,
        "widths": {k: list(cascade.stage(k).widths) for k in kinds},
        "weights": {k: v for k, v in cascade.state_dict().items() if k.split(".")[1] in kinds},
    }
    return detector_from_state(state, "training", device)


def score_photos(
    detector: Detector,
    data: DetectorData,
    names: list[str],
    progress: ProgressFn | None = None,
    stage: str = "",
) -> DetectionScores:
    """AP50, AP50 (>= 32 px) and recall at 1 FP/photo of ``detector`` on photos ``names``."""
    found: dict[str, list[tuple[float, float, float, float, float]]] = {}
    truth: dict[str, list[FaceBox]] = {}
    for i, name in enumerate(names, start=1):
        img, faces = _photo(data, name)
        dets = detector.detect(img, threshold=SCORE_THRESHOLD)  # (K, 5)
        found[name] = [(r[0], r[1], r[2], r[3], r[4]) for r in dets.tolist()]  # boxes only
        truth[name] = faces
        if progress is not None:
            progress(Progress(f"{stage} validate", i, len(names)))
    return score_detector(found, truth)


class _MapsForLogging(nn.Module):
    """PNet as a plain Tensor -> Tensor model for MLflow: (N, 3, H, W) normalised ->
    (N, 5, h, w) face probability and box offsets (the pyfunc flavour's view)."""

    def __init__(self, pnet: StageNet) -> None:
        super().__init__()
        self.pnet = pnet

    def forward(self, x: Tensor) -> Tensor:
        logit, box = self.pnet(x)
        return torch.cat([torch.sigmoid(logit), box], dim=1)


@dataclass
class DetectorResult:
    run_id: str | None
    model_path: Path
    scores: DetectionScores
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    registered: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model_path": str(self.model_path),
            "val_ap50": self.scores.ap50,
            "val_ap50_32": self.scores.ap50_32,
            "val_recall_at_1fp": self.scores.recall_at_1fp,
            "val_faces": self.scores.faces,
            "val_images": self.scores.images,
            "epochs": len(self.history),
            "history": [h.summary() for h in self.history],
            "seconds": round(self.seconds, 1),
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            **self.registered,
        }


def model_state(
    cascade: Cascade, config: DetectorConfig, scores: DetectionScores, run_id: str | None
) -> dict[str, Any]:
    """The detector model file: weights (unfused), config, stages, settings and scores."""
    weights = {k: v.detach().cpu() for k, v in cascade.state_dict().items()}
    digest = hashlib.sha256()
    for name, t in weights.items():
        digest.update(name.encode())
        digest.update(t.contiguous().numpy().tobytes())
    settings = dataclasses.asdict(DetectSettings())
    return {
        "format": DETECTOR_FORMAT,
        "model_id": f"detector-{digest.hexdigest()[:16]}",
        "facetag_version": __version__,
        "config": DETECTOR.to_dict(config),
        "stages": cascade.kinds,
        "widths": {k: list(cascade.stage(k).widths) for k in cascade.kinds},
        "weights": weights,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "validation": scores.as_dict(),
        "run_id": run_id or "",
        **(
            {"provenance": landmark_provenance(Path(config.data.landmarks))}
            if config.data.landmarks
            else {}
        ),
    }


def resolve_detector_config(
    config_path: Path | None, overrides: Mapping[str, object], resume: str | None
) -> DetectorConfig:
    """defaults < TOML < flags; a resumed run keeps the config stored in its checkpoint
    (--device moves it, --data points at the same data elsewhere)."""
    return resolve_config(
        DETECTOR,
        config_path,
        overrides,
        resume,
        allowed=("device", "data"),
        command="train-detector",
    )


@dataclass
class _Run:
    """One train-detector run: what each stage and epoch needs."""

    config: DetectorConfig
    data: DetectorData
    cascade: Cascade
    device: str
    hooks: TrackedRun | None
    run_id: str | None
    run_dir: Path
    history: list[EpochRecord]
    start_epoch: int  # the first epoch still to train (> 1 when resumed)
    opt_state: dict[str, Any] | None  # the optimiser and schedule of a stage resumed midway
    progress: ProgressFn | None

    @property
    def kinds(self) -> list[str]:
        return list(self.config.model.stages)

    @property
    def epochs(self) -> int:
        """All epochs of the run: each stage's, then the landmark phase's."""
        t = self.config.train
        phase = t.landmark_epochs if "onet" in self.kinds else 0
        return t.epochs * len(self.kinds) + phase


def _start(
    config: DetectorConfig, resume: str | None, track: bool, progress: ProgressFn | None
) -> _Run:
    """Build the cascade; a new tracked run, or the state of the run being resumed."""
    device = resolve_device(config.train.device)
    if device == "cpu":
        keep_freed_memory()  # each step reuses the last one's memory (no fresh pages)
    data = prepare_data(config)
    kinds = list(config.model.stages)
    m = config.model
    widths = {"pnet": m.pnet_widths, "rnet": m.rnet_widths, "onet": m.onet_widths}
    torch.manual_seed(config.train.seed)
    cascade = Cascade(widths, kinds).to(device)
    E = config.train.epochs
    hooks = TrackedRun("facetag train-detector", DETECTOR.to_toml(config)) if track else None
    history: list[EpochRecord] = []
    start_epoch, opt_state, run_id = 1, None, resume
    if resume is not None:
        state = load_checkpoint(runs_dir() / resume / "checkpoint.pt")
        cascade.load_state_dict(state["cascade"])
        history = [EpochRecord(**h) for h in state["history"]]
        start_epoch = int(state["epoch"]) + 1
        stages_end = E * len(kinds)  # then the landmark phase's epochs
        midway = (
            (start_epoch - 1) % E if start_epoch <= stages_end else start_epoch - 1 > stages_end
        )
        opt_state = state if midway else None
        if hooks is not None:
            hooks.resume(resume, config.data.name)
    elif hooks is not None:
        params = {
            **DETECTOR.flatten(config),
            "data.resolved_path": str(data.root.resolve()),
            "data.content_hash": data.data_hash,
            "data.train_images": len(data.train),
            "data.val_images": len(data.val),
            "data.nonface_images": len(data.nonface),
            "device_used": device,
            "facetag_version": __version__,
            "torch_version": torch.__version__,
            "parameters": sum(p.numel() for p in cascade.parameters()),
        }
        run_id = hooks.start(config.data.name, params)
    run_dir = runs_dir() / (run_id or "local")
    return _Run(
        config,
        data,
        cascade,
        device,
        hooks,
        run_id,
        run_dir,
        history,
        start_epoch,
        opt_state,
        progress,
    )


def _stage_patches(run: _Run, s_index: int, kind: str) -> tuple[PatchSet, PatchSet]:
    """(training, validation) patches of one stage, mined with the stages before it;
    cached in the run folder so a resumed run does not build them again."""
    config, data = run.config, run.data
    previous = make_detector(run.cascade, run.kinds[:s_index], run.device) if s_index else None
    seed = config.train.seed * 1000 + s_index
    val_subset = data.val[: config.data.val_ap_images]
    build = functools.partial(build_patches, config, data, progress=run.progress)
    marks = kind == "onet" and bool(config.data.landmarks)
    train_set = _cached_patches(
        run.run_dir / f"patches_{kind}.pt",
        functools.partial(build, data.train, kind, previous, seed),
        marks,
    )
    val_set = _cached_patches(
        run.run_dir / f"val_patches_{kind}.pt",
        functools.partial(
            build, val_subset, kind, previous, seed + 500, phase="val patches", extras=False
        ),
        marks,
    )
    return train_set, val_set


def _train_stage(run: _Run, s_index: int, kind: str) -> None:
    """The epochs of one stage that are still to train."""
    config, E = run.config, run.config.train.epochs
    first, last = s_index * E + 1, (s_index + 1) * E
    if last < run.start_epoch:
        return
    net = run.cascade.stage(kind)
    train_set, val_set = _stage_patches(run, s_index, kind)
    opt = torch.optim.AdamW(param_groups(net, config.train.weight_decay), lr=config.train.lr)
    steps = len(train_set) // config.train.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.train.lr, total_steps=max(steps * E, 1), pct_start=0.2
    )
    if run.opt_state is not None and first < run.start_epoch:
        opt.load_state_dict(run.opt_state["optimizer"])
        sched.load_state_dict(run.opt_state["scheduler"])
        run.opt_state = None
    health = GradientHealth(net, config.train.health_every, f"{kind}.")
    ctx = StepContext(opt, sched, health, "", "lower --lr")
    for epoch in range(max(first, run.start_epoch), last + 1):
        record = _train_epoch(run, ctx, net, train_set, epoch, kind, config.train.landmark_weight)
        _finish_epoch(run, ctx, record, val_set, s_index, kind, steps)


def _finish_epoch(
    run: _Run,
    ctx: StepContext,
    record: EpochRecord,
    val_set: PatchSet,
    s_index: int,
    kind: str,
    steps: int,
) -> None:
    """Validate an epoch (loss, landmark error, AP50), report, log and checkpoint it."""
    config, t, epoch = run.config, run.config.train, record.epoch
    net = run.cascade.stage(run.kinds[s_index])
    record.val_loss = patch_loss(net, val_set, t.box_weight, t.landmark_weight, run.device)
    if net.landmarks is not None:
        record.val_landmark_error = landmark_error(net, val_set, run.device)
    scorer = make_detector(run.cascade, run.kinds[: s_index + 1], run.device)
    val_subset = run.data.val[: config.data.val_ap_images]
    record.val_ap50 = score_photos(scorer, run.data, val_subset, run.progress, kind).ap50
    run.history.append(record)
    if run.progress is not None:
        figures = {"loss": record.train_loss, "acc": record.face_accuracy}
        figures["patches/s"] = record.patches_per_s
        summary = f"{kind} epoch {epoch}: val AP50 {record.val_ap50:.4f}"
        if not math.isnan(record.val_landmark_error):
            summary += f", landmark error {record.val_landmark_error:.4f}"
        task = _epoch_task(kind, epoch, run.epochs)
        run.progress(Progress(task, steps, steps, figures, summary, epoch))
    end_epoch(
        run.hooks,
        record.metrics(),
        run.run_dir,
        weights={"cascade": run.cascade.state_dict()},
        ctx=ctx,
        epoch=epoch,
        history=run.history,
        config=DETECTOR.to_dict(config),
        run_id=run.run_id,
    )


def _train_landmarks(run: _Run) -> None:
    """The landmark phase: ``landmark_epochs`` more ONet epochs on each patch with teacher
    landmarks plus as many others (a new draw each epoch, so the face score keeps seeing
    negatives), AdamW at ``landmark_lr`` one-cycle, the landmark loss at
    ``landmark_phase_weight`` with beta ``landmark_beta``. Measured: dlib_faces landmark
    error 0.185 -> 0.084 in 8 such epochs over 250 photos' patches (experiments/LOG.md)."""
    t, L = run.config.train, run.config.train.landmark_epochs
    if L == 0 or "onet" not in run.kinds:
        return
    first = t.epochs * len(run.kinds) + 1
    if first + L - 1 < run.start_epoch:
        return
    s_index = run.kinds.index("onet")
    net = run.cascade.stage("onet")
    train_set, val_set = _stage_patches(run, s_index, "onet")
    if train_set.marks is None or bool(torch.isnan(train_set.marks).any(dim=1).all()):
        return  # no teacher landmarks (data.landmarks unset): nothing to learn
    has = ~torch.isnan(train_set.marks).any(dim=1)
    marked, others = has.nonzero()[:, 0], (~has).nonzero()[:, 0]
    steps = max((len(marked) + min(len(marked), len(others))) // t.batch_size, 1)
    opt = torch.optim.AdamW(param_groups(net, t.weight_decay), lr=t.landmark_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=t.landmark_lr, total_steps=steps * L, pct_start=0.1
    )
    if run.opt_state is not None and first < run.start_epoch:
        opt.load_state_dict(run.opt_state["optimizer"])
        sched.load_state_dict(run.opt_state["scheduler"])
        run.opt_state = None
    # its own names: the phase's schedule counts steps from 0 again
    health = GradientHealth(net, t.health_every, "onet_landmarks.")
    ctx = StepContext(opt, sched, health, "", "lower --landmark-lr")
    for epoch in range(max(first, run.start_epoch), first + L):
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + 7919 * epoch)
        n = min(len(marked), len(others))
        chosen = torch.cat([marked, others[torch.randperm(len(others), generator=g)[:n]]])
        record = _train_epoch(
            run,
            ctx,
            net,
            train_set.subset(chosen),
            epoch,
            "onet-landmarks",
            t.landmark_phase_weight,
            t.landmark_beta,
        )
        _finish_epoch(run, ctx, record, val_set, s_index, "onet-landmarks", steps)


def train_detector(
    config_path: Path | None,
    overrides: Mapping[str, object],
    *,
    resume: str | None = None,
    progress: ProgressFn | None = None,
    track: bool = True,
    out: Path | None = None,
) -> DetectorResult:
    """Train (or resume) the cascade; returns the result, the model file written.

    ``out``, when given, also receives a copy of the model file (``make weights`` writes
    facetag/weights/detector.pt this way).
    """
    config = resolve_detector_config(config_path, overrides, resume)
    run = _start(config, resume, track, progress)
    t_start = time.perf_counter()
    try:
        for s_index, kind in enumerate(run.kinds):
            _train_stage(run, s_index, kind)
        _train_landmarks(run)
        final = make_detector(run.cascade, run.kinds, run.device)
        scores = score_photos(final, run.data, run.data.val, progress, "cascade")
    except TrainingError as e:
        if run.hooks is not None:
            run.hooks.failed(str(e))
        raise
    except KeyboardInterrupt:
        if run.hooks is not None:
            message = f"interrupted; continue with --resume {run.run_id}"
            run.hooks.failed(message, interrupted=True)
        raise
    model_path = save_checkpoint(
        run.run_dir / "detector.pt", model_state(run.cascade.cpu(), config, scores, run.run_id)
    )
    if out is not None:
        copy_checkpoint(model_path, out)
    seconds = time.perf_counter() - t_start
    result = DetectorResult(run.run_id, model_path, scores, run.history, seconds, run.device)
    if run.hooks is not None:
        result.registered = _register(run, scores, model_path)
    return result


def _register(run: _Run, scores: DetectionScores, model_path: Path) -> dict[str, Any]:
    assert run.hooks is not None
    step = run.epochs
    run.hooks.tracker.log_metrics(
        {f"final_val_{k}": float(v) for k, v in scores.as_dict().items()}, step=step
    )
    pnet = make_detector(run.cascade, run.kinds, "cpu").cascade.stage("pnet")
    return run.hooks.register(
        _MapsForLogging(pnet),
        name="detector",
        input_example=torch.zeros(1, 3, 24, 24),
        registered_name=REGISTERED_DETECTOR,
        metric_name="val_ap50",
        metric_value=scores.ap50,
        data_hash=run.data.data_hash,
        checkpoint=model_path,
    )


def _cached_patches(
    path: Path, build: Callable[[], PatchSet], need_marks: bool = False
) -> PatchSet:
    """Patches from ``path`` when an earlier attempt of this run saved them (with their
    landmarks, when ``need_marks``: caches of older facetags lack them), else built."""
    if path.is_file():
        s = load_checkpoint(path)
        if not need_marks or s.get("landmarks") is not None:
            return PatchSet(s["images"], s["labels"], s["offsets"], s.get("landmarks"))
    patches = build()
    save_checkpoint(
        path,
        {
            "images": patches.images,
            "labels": patches.labels,
            "offsets": patches.offsets,
            "landmarks": patches.marks,
        },
    )
    return patches


def _train_epoch(
    run: _Run,
    ctx: StepContext,
    net: StageNet,
    patches: PatchSet,
    epoch: int,
    kind: str,
    landmark_weight: float,
    landmark_beta: float = 1.0,
) -> EpochRecord:
    t = run.config.train
    epochs = run.epochs
    ctx.where = f"epoch {epoch} ({kind})"
    g = torch.Generator().manual_seed(t.seed * 1_000_003 + epoch)
    order = torch.randperm(len(patches), generator=g)
    B = t.batch_size
    batches = len(patches) // B  # the last partial batch is dropped: batch norm needs N >= 2
    net.train()
    ctx.health.reset()
    t0 = time.perf_counter()
    face_sum = box_sum = marks_sum = 0.0
    n_face = n_box = n_marks = correct = seen = 0
    lr = ctx.opt.param_groups[0]["lr"]
    device = run.device
    for i in range(1, batches + 1):
        idx = order[(i - 1) * B : i * B]
        x, offsets, aug_marks = augment(
            patches.images[idx].float(), patches.offsets[idx], g, patches.marks[idx]
        )
        x, offsets = normalize_patches(x).to(device), offsets.to(device)
        labels = patches.labels[idx].to(device)
        ctx.opt.zero_grad(set_to_none=True)
        marks = aug_marks.to(device) if aug_marks is not None else None
        loss = detector_losses(net, x, labels, offsets, marks, t.ohem, landmark_beta)
        check_loss(ctx, i, loss.face, loss.box, *([loss.marks] if loss.marks is not None else []))
        # Each root with its weight as the incoming gradient: no sum node needed.
        torch.autograd.backward(*loss.roots(t.box_weight, landmark_weight))
        lr = optimizer_step(ctx, i)
        has_label = labels != PART
        k = int(has_label.sum())
        face_sum += float(loss.face.detach()) * k
        n_face += k
        box_sum += float(loss.box.detach())
        n_box += loss.n_box
        if loss.marks is not None:
            marks_sum += float(loss.marks.detach())
            n_marks += loss.n_marks
        logits = loss.logits
        is_face = (labels == POS) | (labels == POS_NO_BOX)
        correct += int((((logits > 0) == is_face) & has_label).sum())
        seen += B
        if run.progress is not None:
            figures = {
                "loss": face_sum / max(n_face, 1) + t.box_weight * box_sum / max(n_box, 1),
                "acc": correct / max(n_face, 1),
                "patches/s": seen / max(time.perf_counter() - t0, 1e-9),
            }
            task = _epoch_task(kind, epoch, epochs)
            run.progress(Progress(task, i, batches, figures, epoch=epoch))
    seconds = time.perf_counter() - t0
    face_loss, box_loss = face_sum / max(n_face, 1), box_sum / max(n_box, 1)
    marks_loss = marks_sum / max(n_marks, 1)
    return EpochRecord(
        epoch=epoch,
        stage=kind,
        train_loss=face_loss + t.box_weight * box_loss + landmark_weight * marks_loss,
        face_loss=face_loss,
        box_loss=box_loss,
        landmark_loss=marks_loss if n_marks else math.nan,
        face_accuracy=correct / max(n_face, 1),
        val_loss=math.nan,
        val_ap50=math.nan,
        lr=lr,
        patches_per_s=seen / max(seconds, 1e-9),
        seconds=seconds,
    )


def _epoch_task(kind: str, epoch: int, epochs: int) -> str:
    return f"{kind} epoch {epoch:>3}/{epochs}"
