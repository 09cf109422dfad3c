"""``facetag tune``: the embedder trains on the faces its user confirmed.

The one module that joins inference (the gallery, cutting faces) and training (the loop,
MLflow); the CLI calls it as it calls any library function.

    gallery: every confirmed face (enrolled, learnt, named clusters) -> cut again from its
    photo as tagging cuts it -> a person-folder dataset in a temporary folder
      -> facetag train: the current embedder as [train] init, a margin loss on the user's
         people plus distillation towards the frozen starting network on the same chips
         (people not in the gallery stay where they were), logged to MLflow, registered
      -> the gallery re-embedded with the tuned model, which it records (model_file):
         tag, learn and cluster use it from then on
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from facetag.errors import DataError
from facetag.inference.gallery import load_gallery, save_gallery
from facetag.inference.models import Models, load_models
from facetag.inference.pipeline import embed_stored_faces, stored_face_crops
from facetag.models.io import ModelRef
from facetag.progress import ProgressFn

MessageFn = Callable[[str], None]


@dataclass(frozen=True)
class TuneSettings:
    epochs: int = 8
    lr: float = 5e-5  # a trained network: small steps
    batch_size: int = 16
    distill_weight: float = 10.0  # pulls every embedding towards the starting network's
    arcface_margin: float = 0.3
    seed: int = 0


def _faces(gallery: Any) -> list[tuple[str, Path, list[float], list[list[float]] | None]]:
    """(person, photo, box, landmarks) of every confirmed face; enrolled paths are relative
    to the gallery's PEOPLE_DIR."""
    root = Path(gallery.root) if gallery.root else Path()
    out = []
    for person, entries in gallery.people.items():
        for e in entries:
            photo = Path(e.path) if e.source != "enroll" else root / e.path
            out.append((person, photo, e.box, e.landmarks))
    return out


def tune(
    gallery_path: Path,
    models: Models,
    settings: TuneSettings | None = None,
    *,
    track: bool = True,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Fine-tune ``models.embedder`` on the gallery's confirmed faces (module doc); returns
    what ``--json`` prints. The gallery is rewritten once, atomically, at the end."""
    from facetag.training.runner import run_training

    s = settings or TuneSettings()
    gallery = load_gallery(gallery_path, expect_model=models.embedder.version)
    faces = _faces(gallery)
    people = {p for p, *_ in faces}
    if len(people) < 2:
        raise DataError(
            f"{gallery_path}: expected confirmed faces of at least 2 people to tune on, got "
            f"{len(people)}; enrol or name more people first"
        )
    out_dir = gallery_path.parent / f"{gallery_path.stem}.tuned"
    with tempfile.TemporaryDirectory(prefix="facetag-tune-") as tmp:
        data = Path(tmp) / "chips"
        written = _write_chips(faces, models, data, on_message)
        overrides: dict[str, object] = {
            "data": str(data),
            "data.name": "facetag-tune",
            "data.split": "all",
            "data.image_size": list(models.embedder.image_size),
            "data.channels": 3,
            "data.affine_degrees": 5.0,
            "data.translate": 0.03,
            "model.head": "arcface",
            "model.arcface_margin": s.arcface_margin,
            "train.epochs": s.epochs,
            "train.lr": s.lr,
            "train.batch_size": s.batch_size,
            "train.weight_decay": 0.0,
            "train.label_smoothing": 0.0,
            "train.distill_weight": s.distill_weight,
            "train.seed": s.seed,
            "train.warmup_fraction": 0.1,
            "init": str(models.embedder.path),
        }
        if models.embedder.aligned:
            overrides["model.architecture"] = "dlib-resnet"
        else:
            overrides["model.architecture"] = "embedding-net"
            m = models.embedder.state["config"]["model"]
            for key in ("widths", "embedding_dim", "activation", "pool", "flip_average"):
                overrides[f"model.{key}"] = m[key]
            overrides["data.channels"] = models.embedder.in_channels
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"tuned-{time.strftime('%Y%m%d-%H%M%S')}.pt"
        trained = run_training(None, overrides, progress=progress, track=track, out_path=target)
    tuned = load_models(ModelRef(target, str(target)), None, models.device)
    tuned.detector = models.detector  # the same faces, only the embedder changed
    _reembed(gallery, tuned, on_message)
    gallery.history.append(
        {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "action": "tune",
            "model": tuned.embedder.version,
            "from": models.embedder.version,
        }
    )
    save_gallery(gallery_path, gallery)
    return {
        "gallery": str(gallery_path),
        "model_file": str(target),
        "model": tuned.embedder.version,
        "started_from": models.embedder.version,
        "people": len(people),
        "faces": written,
        "run_id": trained.get("run_id"),
        "registered_version": trained.get("version"),
    }


def _write_chips(
    faces: list[tuple[str, Path, list[float], list[list[float]] | None]],
    models: Models,
    data: Path,
    say: MessageFn | None,
) -> int:
    """The faces as a person-folder dataset of the crops tagging embeds; returns how many."""
    n = 0
    stored = [(photo, box, marks) for _, photo, box, marks in faces]
    got = dict(stored_face_crops(stored, models))
    for k, (person, photo, _, _) in enumerate(faces):
        if k not in got:
            if say is not None:
                say(
                    f"{photo}: expected the photo of a confirmed face of {person}, could not "
                    "read it; left out of tuning"
                )
            continue
        chip = got[k][0].permute(1, 2, 0).numpy()  # (H, W, C) uint8
        (data / person).mkdir(parents=True, exist_ok=True)
        Image.fromarray(chip.squeeze() if chip.shape[2] == 1 else chip).save(
            data / person / f"{k:05d}.png"
        )
        n += 1
    return n


def _reembed(gallery: Any, tuned: Models, say: MessageFn | None) -> None:
    """Every embedding of the gallery again with the tuned embedder (a face whose photo is
    gone is dropped, never kept from the old model); the gallery becomes the tuned model's."""
    root = Path(gallery.root) if gallery.root else Path()
    people = [(p, e) for p, es in gallery.people.items() for e in es]
    clustered = [(c, f) for c, fs in gallery.clusters.items() for f in fs]
    stored = [
        (Path(e.path) if e.source != "enroll" else root / e.path, e.box, e.landmarks)
        for _, e in people
    ]
    stored += [(Path(r.path), r.box, None) for r in gallery.rejections]
    stored += [(Path(f.path), f.box, f.landmarks) for _, f in clustered]
    vectors = iter(embed_stored_faces(stored, tuned))
    kept: dict[str, list[Any]] = {}
    for person, e in people:
        v = next(vectors)
        if v.isnan().any():
            if say is not None:
                say(
                    f"{e.path}: expected the photo of {person}'s face, could not read it; "
                    "dropped from the gallery"
                )
            continue
        e.embedding = v.clone()
        kept.setdefault(person, []).append(e)
    gallery.people = kept
    rejections = []
    for r in gallery.rejections:
        v = next(vectors)
        if not v.isnan().any():
            r.embedding = v.clone()
            rejections.append(r)
    gallery.rejections = rejections
    clusters: dict[str, list[Any]] = {}
    for c, f in clustered:
        v = next(vectors)
        if not v.isnan().any():
            f.embedding = v.clone()
            clusters.setdefault(c, []).append(f)
    gallery.clusters = clusters
    gallery.model = tuned.embedder.version
    gallery.model_file = str(tuned.embedder.path.resolve())
