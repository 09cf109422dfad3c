"""``facetag tune``: the embedder trains on the faces its user confirmed.

The one module that joins inference (the gallery, cutting faces) and training (the loop,
MLflow); the CLI calls it as it calls any library function.

    gallery: every confirmed face (enrolled, learnt, named clusters) -> cut again from its
    photo as tagging cuts it -> a person-folder dataset in a temporary folder
      -> facetag train: the current embedder as [train] init, its embedding layer trained
         (the rest frozen: [train] trainable = "head") with a margin loss on the user's
         people plus distillation towards the frozen starting network on the same chips
         (people not in the gallery stay where they were), logged to MLflow, registered
      -> the check: one face in five of each person with two or more (at least one, seed)
         is held out of training; both models name those faces against the rest
         (open-set, unknown cluster faces as strangers), the tuned one at the starting
         threshold scaled as tuning moved the distances between different people
         (distance_scale). Only a tuned model with a higher F1 is kept:
      -> the gallery re-embedded with the tuned model, which it records (model_file):
         tag, learn and cluster use it from then on. Otherwise the gallery keeps its model
         and its history says why ("tune kept"), as LFW's learning curve asks
         (facetag evaluate --learning-curve): fine-tuning that hurts is never adopted.
    With no person of two faces there is nothing to check on: the old model is kept.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from facetag.errors import DataError
from facetag.inference.gallery import load_gallery, save_gallery
from facetag.inference.match import person_distances
from facetag.inference.models import Models, load_models
from facetag.inference.pipeline import embed_stored_faces, stored_face_crops
from facetag.models.io import ModelRef
from facetag.progress import ProgressFn

MessageFn = Callable[[str], None]


@dataclass(frozen=True)
class TuneSettings:
    epochs: int = 8
    # Only the embedding layer trains ("head"): tuning the whole ResNet (at lr 2e-6; AdamW
    # moves each weight ~lr a step, 5e-5 wrecked it) cost LFW S-Z verification 0.23-0.46
    # points, over the 0.2 allowed; the head alone at 3e-5 keeps it within 0.2 (LOG).
    lr: float = 3e-5
    batch_size: int = 16
    distill_weight: float = 10.0  # pulls every embedding towards the starting network's
    arcface_margin: float = 0.3
    seed: int = 0
    hold_out: bool = True  # keep faces back to check the tuned model (module doc)
    trainable: str = "head"  # [train] trainable: "head" (the embedding layer) or "all"


SCALE_FACES = 2000  # distance_scale's faces at most: 2M pairs, 16 MB per distance matrix

# A confirmed face: (person, photo, box, landmarks, its embedding by the gallery's model).
Face = tuple[str, Path, list[float], list[list[float]] | None, Any]


def _faces(gallery: Any) -> list[Face]:
    """Every confirmed face; enrolled paths are relative to the gallery's PEOPLE_DIR."""
    root = Path(gallery.root) if gallery.root else Path()
    out = []
    for person, entries in gallery.people.items():
        for e in entries:
            photo = Path(e.path) if e.source != "enroll" else root / e.path
            out.append((person, photo, e.box, e.landmarks, e.embedding))
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
    train, held = _hold_out(faces, s.seed) if s.hold_out else (faces, [])
    with tempfile.TemporaryDirectory(prefix="facetag-tune-") as tmp:
        data = Path(tmp) / "chips"
        written = _write_chips(train, models, data, on_message)
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
            "train.trainable": s.trainable,
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
    G_new = embed_stored_faces([(f[1], f[2], f[3]) for f in train], tuned)
    scale = distance_scale(train, G_new)
    tuned.threshold = models.threshold * scale
    tuned.threshold_source = f"scaled x{scale:.3f} from {models.embedder.version}"
    _store_threshold(target, models, tuned.threshold, scale)
    check = _check(train, held, gallery, models, tuned, G_new)
    kept = check is None or check["f1_after"] <= check["f1_before"]
    if not kept:
        _reembed(gallery, tuned, on_message)
    gallery.history.append(
        {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "action": "tune kept the old model" if kept else "tune",
            "model": (models if kept else tuned).embedder.version,
            "from": models.embedder.version,
            "tuned": tuned.embedder.version,
            "check": check_line(check),
        }
    )
    save_gallery(gallery_path, gallery)
    return {
        "gallery": str(gallery_path),
        "model_file": str(target),
        "model": tuned.embedder.version,
        "started_from": models.embedder.version,
        "adopted": not kept,
        "check": check,
        "people": len(people),
        "faces": written,
        "held_out": len(held),
        "run_id": trained.get("run_id"),
        "registered_version": trained.get("version"),
    }


def check_line(check: dict[str, Any] | None) -> str:
    if check is None:
        return "no person with two faces: nothing to check a tuned model on"
    return (
        f"open-set F1 {check['f1_before']:.3f} -> {check['f1_after']:.3f} on "
        f"{check['held_out']} held-out faces and {check['strangers']} strangers"
    )


def _hold_out(faces: list[Face], seed: int) -> tuple[list[Face], list[Face]]:
    """(train, held out): one face in five of each person with two or more, at least one."""
    import random

    rng = random.Random(seed)
    by_person: dict[str, list[int]] = {}
    for k, f in enumerate(faces):
        by_person.setdefault(f[0], []).append(k)
    held: set[int] = set()
    for rows in by_person.values():
        if len(rows) >= 2:
            held.update(rng.sample(rows, max(1, len(rows) // 5)))
    return [f for k, f in enumerate(faces) if k not in held], [faces[k] for k in sorted(held)]


def distance_scale(train: list[Face], tuned_vectors: Any) -> float:
    """How much tuning moved the distances between different people: the median cosine
    distance over the pairs of training faces of two different people, by the tuned
    network (tuned_vectors, (N, D)) over the same by the starting one (the gallery's
    embeddings). 1.0 with no such pair.

    Fine-tuning on a few faces per person pulls faces together (LOG: under the starting
    threshold the tuned ResNet named many more probes, strangers among them), so the
    threshold moves with the distances: the starting threshold times this ratio.
    """
    import torch

    old = torch.stack([f[4] for f in train]).float()  # (N, D)
    new = tuned_vectors.float()
    ok = ~new.isnan().any(dim=1)
    code = {name: k for k, name in enumerate(sorted({f[0] for f in train}))}
    person = torch.tensor([code[f[0]] for f in train])  # (N,)
    rows = ok.nonzero()[:, 0]
    if rows.numel() > SCALE_FACES:  # N^2 pairs: a seeded sample of faces is plenty
        g = torch.Generator().manual_seed(0)
        rows = rows[torch.randperm(rows.numel(), generator=g)[:SCALE_FACES]]
    old, new, person = old[rows], new[rows], person[rows]
    other = torch.triu(person[:, None] != person[None, :], diagonal=1)  # each pair once
    if not bool(other.any()):
        return 1.0
    d_old = (1.0 - old @ old.T)[other]  # (pairs,)
    d_new = (1.0 - new @ new.T)[other]
    median_old = float(d_old.median())
    return float(d_new.median()) / median_old if median_old > 0 else 1.0


def _store_threshold(target: Path, models: Models, threshold: float, scale: float) -> None:
    """The tuned file carries its threshold (the starting one, scaled with the distances:
    distance_scale), so tagging with it never falls back to the default threshold."""
    from facetag.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(target)
    state["threshold"] = float(threshold)
    state["calibration"] = {
        "threshold_rule": "scaled",
        "scale": scale,
        "from": models.embedder.version,
        "from_threshold": float(models.threshold),
        "source": models.threshold_source,
    }
    save_checkpoint(target, state)


def _check(
    train: list[Face],
    held: list[Face],
    gallery: Any,
    models: Models,
    tuned: Models,
    tuned_train: Any,
) -> dict[str, Any] | None:
    """Open-set F1 of naming the held-out faces against the training faces, by the
    starting model (the gallery's own embeddings) and by the tuned one (``tuned_train``:
    the training faces by it; the probes cut and embedded again), each at its own
    threshold; unknown cluster faces are strangers. None when nothing was held out."""
    import torch

    if not held:
        return None
    names = sorted({f[0] for f in train})
    label = {n: k for k, n in enumerate(names)}
    strangers = [f for fs in gallery.clusters.values() for f in fs]
    probe_labels = [label.get(f[0], -1) for f in held] + [-1] * len(strangers)
    old_probes = [f[4] for f in held] + [f.embedding for f in strangers]
    probes = [(f[1], f[2], f[3]) for f in held]
    probes += [(Path(f.path), f.box, f.landmarks) for f in strangers]
    runs = {
        "before": (torch.stack([f[4] for f in train]), torch.stack(old_probes), models),
        "after": (tuned_train, embed_stored_faces(probes, tuned), tuned),
    }
    out: dict[str, Any] = {"held_out": len(held), "strangers": len(strangers)}
    for when, (G, P, m) in runs.items():
        ok = ~G.isnan().any(dim=1)
        gl = torch.tensor([label[f[0]] for f in train])[ok]
        r = _open_set_f1(G[ok], gl, P, probe_labels, m.threshold)
        out.update({f"{k}_{when}": v for k, v in r.items()})
    return out


def _write_chips(
    faces: list[Face],
    models: Models,
    data: Path,
    say: MessageFn | None,
) -> int:
    """The faces as a person-folder dataset of the crops tagging embeds; returns how many."""
    n = 0
    stored = [(photo, box, marks) for _, photo, box, marks, _ in faces]
    got = dict(stored_face_crops(stored, models))
    for k, (person, photo, *_) in enumerate(faces):
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


def _open_set_f1(
    gallery_vectors: Any,
    gallery_labels: Any,
    probes: Any,
    probe_labels: list[int],
    threshold: float,
) -> dict[str, float]:
    """Open-set naming of probes (N, D) (NaN rows: no face found) by the nearest enrolled
    person under ``threshold``, as tagging names (facetag.inference.match.person_distances);
    probe label -1 is a stranger. Precision = correct names /
    names given, recall = correct names / probes of enrolled people, F1 of the two."""
    import torch

    P = int(gallery_labels.max()) + 1
    d = person_distances(probes.nan_to_num(), gallery_vectors, gallery_labels, P)  # (N, P)
    best, who = d.min(dim=1)
    named = (best < threshold) & ~probes.isnan().any(dim=1)
    truth = torch.tensor(probe_labels)
    correct = int((named & (who == truth)).sum())
    given = int(named.sum())
    known = int((truth >= 0).sum())
    precision = correct / given if given else 1.0
    recall = correct / known if known else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "named": given}


@dataclass
class _Shots:
    """One point of the learning curve: who is enrolled with which photos, and the probes."""

    enrolled: dict[int, list[int]]  # person label -> rows of the enrolled photos
    probes: list[int]  # rows
    probe_labels: list[int]  # person label, or -1 for a stranger (people S-Z)

    @classmethod
    def choose(cls, labels: list[int], known: set[int], k: int) -> _Shots:
        per_person: dict[int, list[int]] = {}
        for idx, lab in enumerate(labels):
            if lab in known:
                per_person.setdefault(lab, []).append(idx)
        enrolled = {lab: idx[:k] for lab, idx in per_person.items() if len(idx) > k}
        taken = {i for rows in enrolled.values() for i in rows}
        probes = [
            i
            for i, lab in enumerate(labels)
            if i not in taken and (lab in enrolled or lab not in known)
        ]
        return cls(enrolled, probes, [labels[i] if labels[i] in enrolled else -1 for i in probes])

    def f1(self, E: Any, threshold: float) -> dict[str, float]:
        import torch

        remap = {lab: n for n, lab in enumerate(sorted(self.enrolled))}
        rows = [i for lab in sorted(self.enrolled) for i in self.enrolled[lab]]
        gl = torch.tensor([remap[lab] for lab in sorted(self.enrolled) for _ in self.enrolled[lab]])
        pl = [remap.get(v, -1) for v in self.probe_labels]
        return _open_set_f1(torch.nan_to_num(E[rows]), gl, E[self.probes], pl, threshold)


def _strangers_accuracy(E: Any, labels: list[int], known: set[int]) -> float:
    """10-fold verification accuracy on the pairs of the strangers' photos (people S-Z)."""
    import torch

    from facetag.metrics.verification import protocol_pairs, ten_fold_accuracy

    rows = [k for k, lab in enumerate(labels) if lab not in known]
    i, j, same = protocol_pairs(torch.tensor([labels[k] for k in rows]), 0)
    V = torch.nan_to_num(E[rows])
    return ten_fold_accuracy((V[i] * V[j]).sum(dim=1).double(), same).mean


def _tuned_on(
    shots: _Shots,
    paths: list[Path],
    names: list[str],
    models: Models,
    settings: TuneSettings | None,
    say: MessageFn | None,
    progress: ProgressFn | None,
) -> tuple[Models, dict[str, Any], Path]:
    """Enrol the shots' photos in a throwaway gallery and tune on it: (the tuned models,
    tune's result, the folder holding the tuned model, to remove)."""
    import os

    from facetag.inference.enroll import enroll

    tmp = Path(tempfile.mkdtemp(prefix="facetag-curve-"))
    people_dir = tmp / "people"
    for lab, rows in shots.enrolled.items():
        (people_dir / names[lab]).mkdir(parents=True)
        for i in rows:
            os.symlink(paths[i].resolve(), people_dir / names[lab] / paths[i].name)
    gallery = tmp / "gallery.json"
    enroll(people_dir, gallery, models, on_message=say)
    # Every shot trains: the curve measures the tuned network itself, adopted or not.
    every = replace(settings or TuneSettings(), hold_out=False)
    r = tune(gallery, models, every, on_message=say, progress=progress)
    tuned = load_models(ModelRef(Path(r["model_file"]), r["model_file"]), None, models.device)
    tuned.detector = models.detector  # its threshold: the scaled one tune stored
    return tuned, r, tmp


def learning_curve(
    root: Path,
    models: Models,
    *,
    shots: tuple[int, ...] = (1, 2, 5),
    settings: TuneSettings | None = None,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """``facetag evaluate --learning-curve``: LFW people N-R enrolled with 1, 2 and 5
    confirmed photos each in throwaway galleries, their other photos and every photo of
    people S-Z (strangers) as probes; open-set name F1 before and after facetag tune, and
    the verification accuracy on S-Z pairs before and after (it must not drop by more
    than 0.2 points). Only N-R trains (the tuning); S-Z only measures."""
    import shutil

    from facetag.inference.verify import _photos, embed_largest_faces

    paths, labels, names = _photos(root, "N-Z")
    known = {k for k, n in enumerate(names) if n[:1].upper() <= "R"}
    t = models.threshold

    def embed_all(m: Models) -> Any:
        return embed_largest_faces(paths, m, progress=progress, on_message=on_message)

    E0 = embed_all(models)
    table = []
    for k in shots:
        point = _Shots.choose(labels, known, k)
        tuned, r, tmp = _tuned_on(point, paths, names, models, settings, on_message, progress)
        try:
            Ek = embed_all(tuned)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        before, after = point.f1(E0, t), point.f1(Ek, tuned.threshold)
        table.append(
            {
                "shots": k,
                "people": len(point.enrolled),
                "probes": len(point.probes),
                **{f"{key}_before": v for key, v in before.items()},
                **{f"{key}_after": v for key, v in after.items()},
                "strangers_pairs_accuracy_after": _strangers_accuracy(Ek, labels, known),
                "tuned_model": r["model"],
                "tuned_threshold": tuned.threshold,
                "run_id": r["run_id"],
            }
        )
    return {
        "root": str(root),
        "threshold": t,
        "strangers_pairs_accuracy_before": _strangers_accuracy(E0, labels, known),
        "curve": table,
        "model": models.info(),
    }


def log_curve(result: dict[str, Any]) -> str:
    """The learning curve as one MLflow run: F1 before/after per number of photos (as
    steps) and a figure; returns the run id."""
    from matplotlib.figure import Figure

    from facetag.training.tracking import Tracker

    curve = result["curve"]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    x = [row["shots"] for row in curve]
    ax.plot(x, [row["f1_before"] for row in curve], "o--", label="before facetag tune")
    ax.plot(x, [row["f1_after"] for row in curve], "o-", label="after facetag tune")
    ax.set_xlabel("confirmed photos per person (LFW N-R)")
    ax.set_ylabel("open-set name F1 (strangers: LFW S-Z)")
    ax.set_xticks(x)
    ax.legend()
    ax.grid(alpha=0.3)
    with Tracker.start(
        "facetag-learning",
        run_name="learning-curve",
        tags={"command": "facetag evaluate --learning-curve"},
    ) as tracker:
        for row in curve:
            tracker.log_metrics(
                {
                    "f1_before": row["f1_before"],
                    "f1_after": row["f1_after"],
                    "strangers_pairs_accuracy_after": row["strangers_pairs_accuracy_after"],
                },
                step=row["shots"],
            )
        tracker.log_metrics(
            {"strangers_pairs_accuracy_before": result["strangers_pairs_accuracy_before"]}, step=0
        )
        tracker.log_figure(fig, "learning_curve.png")
        return str(tracker.run_id)
