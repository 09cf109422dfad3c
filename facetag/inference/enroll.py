"""``facetag enroll``: the gallery of the people a user knows, from PEOPLE_DIR/<person>/.

    PEOPLE_DIR/<person>/**/<photo> -> decode (workers) -> detector -> the largest face
      -> crop -> embed (batched across photos) -> gallery entry (box, score, embedding)
    -> the gallery file, written atomically

Enrolling again re-embeds only photos whose bytes changed (or all of them when the
model, detector or margin did).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from facetag.data.images import Photo, Scan, file_kind, photo_key, scan_photos
from facetag.errors import DataError
from facetag.inference.align import (
    DEFAULT_MARGIN,
    displayed_box,
    displayed_landmarks,
    find_faces,
    photo_crops,
)
from facetag.inference.gallery import Gallery, GalleryEntry, load_gallery, save_gallery
from facetag.inference.models import Models
from facetag.inference.pipeline import (
    FaceBatcher,
    Failed,
    Skipped,
    embed_stored_faces,
    iter_photos,
    worker_count,
)
from facetag.progress import Meter, ProgressFn

MessageFn = Callable[[str], None]


@dataclass
class EnrollReport:
    gallery: Path
    model: str
    device: str
    people: int  # enrolled, with at least one photo
    photos: int  # in the gallery
    embedded: int  # newly embedded this time
    kept: int  # unchanged since the last enrolment
    removed: int  # gone from PEOPLE_DIR since the last enrolment
    skipped: int  # photos without a usable face (or unreadable)
    rebuilt: bool  # the old gallery was made with another model, detector or margin
    not_read: str = ""  # files left out on purpose (other kinds, hidden): Scan.summary()


def require_folder(people_dir: Path) -> None:
    """DataError (one line) unless PEOPLE_DIR is a folder: checked before models load."""
    kind, _ = file_kind(people_dir)
    if kind != "folder":
        got = "no such folder" if kind == "missing" else ("a file" if kind == "file" else kind)
        raise DataError(
            f"{people_dir}: expected a folder of person folders (PEOPLE_DIR/<person>/*.jpg), "
            f"got {got}; check the path"
        )


def scan_people(people_dir: Path, on_message: MessageFn) -> tuple[dict[str, list[Path]], Scan]:
    """PEOPLE_DIR/<person>/**/<photo> -> ({person: photos}, the scan's counts); stray files
    and every entry that is not a photo (see data.images.scan_photos) are reported."""
    require_folder(people_dir)
    top = scan_photos([people_dir])  # the person folders' own entries are read below
    for path, message in top.problems:
        if path != people_dir:
            on_message(message)
    for photo in top.photos:
        on_message(
            f"{photo}: expected photos inside person folders (PEOPLE_DIR/<person>/), got "
            "one at the top; move it into its person's folder"
        )
    total = Scan(unread=top.unread, hidden=top.hidden)
    people: dict[str, list[Path]] = {}
    for child in sorted(people_dir.iterdir(), key=lambda p: os.fsencode(p.name)):
        if child.name.startswith(".") or file_kind(child)[0] != "folder" or child.is_symlink():
            continue
        scan = scan_photos([child], recursive=True)
        for path, message in scan.problems:
            if path != child:
                on_message(message)
        total.unread.update(scan.unread)
        total.hidden += scan.hidden
        if scan.photos:
            people[child.name] = scan.photos
        else:
            on_message(f"{child}: expected photos of {child.name}, got none; skipped")
    if not people:
        raise DataError(
            f"{people_dir}: expected person folders with photos (PEOPLE_DIR/<person>/*.jpg), "
            "got none; make one folder per person"
        )
    return people, total


@dataclass
class _Plan:
    """What an enrolment starts from: the photos, and what the old gallery lets it keep."""

    people: dict[str, list[Path]]
    new: Gallery  # being built
    reuse: Gallery  # the old gallery when it was made with the same models, else empty
    old_entries: dict[str, GalleryEntry]  # relative path -> reusable entry
    rel_of: dict[Path, tuple[str, str]]  # photo -> (person, relative path)
    done: dict[str, str]  # photo_key -> sha256 of a reusable result
    rebuilt: bool
    scan: Scan  # what PEOPLE_DIR held besides photos (counted in the report)


def _plan(
    people_dir: Path, gallery_path: Path, models: Models, margin: float, say: MessageFn
) -> _Plan:
    people, scan = scan_people(people_dir, say)
    emb, det = models.embedder, models.detector
    old = load_gallery(gallery_path) if gallery_path.exists() else None
    rebuilt = old is not None and (old.model, old.detector, old.margin) != (
        emb.version,
        det.name,
        margin,
    )
    if old is not None and rebuilt:
        say(
            f"{gallery_path}: made with model {old.model}, detector {old.detector!r}, margin "
            f"{old.margin}; re-embedding every photo with {emb.version}"
        )
    reuse = old if old is not None and not rebuilt else Gallery(model=emb.version)
    old_entries = {e.path: e for es in reuse.people.values() for e in es if e.source == "enroll"}
    new = Gallery(
        model=emb.version, detector=det.name, margin=margin, root=str(people_dir.resolve())
    )
    if old is not None:
        _carry_over(old, new, models, rebuilt)
    rel_of: dict[Path, tuple[str, str]] = {}
    done: dict[str, str] = {}
    for person, photos in people.items():
        for p in photos:
            rel = p.relative_to(people_dir).as_posix()
            rel_of[p] = (person, rel)
            if rel in old_entries:
                done[photo_key(p)] = old_entries[rel].sha256
            elif rel in reuse.skipped:
                done[photo_key(p)] = reuse.skipped[rel]["sha256"]
    return _Plan(people, new, reuse, old_entries, rel_of, done, rebuilt, scan)


def _carry_over(old: Gallery, new: Gallery, models: Models, rebuilt: bool) -> None:
    """What users taught the gallery survives enrolling again: faces learnt from their
    corrections, rejections, clusters, history (re-embedded when the model changed)."""
    learnt = [(p, e) for p, es in old.people.items() for e in es if e.source != "enroll"]
    new.history, new.model_file = list(old.history), old.model_file
    if not rebuilt:
        for person, e in learnt:
            new.people.setdefault(person, []).append(e)
        new.rejections, new.clusters = list(old.rejections), dict(old.clusters)
        return
    faces: list[tuple[Path, list[float], list[list[float]] | None]] = [
        (Path(e.path), e.box, e.landmarks) for _, e in learnt
    ]
    faces += [(Path(r.path), r.box, None) for r in old.rejections]
    vectors = embed_stored_faces(faces, models)
    for k, (person, e) in enumerate(learnt):
        if not torch.isnan(vectors[k]).any():
            e.embedding = vectors[k].clone()
            new.people.setdefault(person, []).append(e)
    for k, r in enumerate(old.rejections, start=len(learnt)):
        if not torch.isnan(vectors[k]).any():
            r.embedding = vectors[k].clone()
            new.rejections.append(r)
    # Clusters are re-made by the next facetag cluster run (old ids are kept by face).
    new.clusters = {}


def _enrol_face(
    plan: _Plan,
    models: Models,
    photo: Photo,
    person: str,
    rel: str,
    margin: float,
    say: MessageFn,
) -> tuple[GalleryEntry, Tensor] | None:
    """The gallery entry (embedding still empty) and crop of a photo's largest face."""
    det, emb = models.detector, models.embedder
    faces = find_faces(det, photo)
    if not faces:
        reason = "expected a face, got none"
        plan.new.skipped[rel] = {"sha256": photo.sha256, "reason": reason}
        say(f"{photo.path}: {reason}; skipped (use a photo where the face is clear)")
        return None
    face = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
    if len(faces) > 1:
        say(f"{photo.path}: {len(faces)} faces found; enrolling the largest as {person}")
    crops = photo_crops(det, photo, [face], emb, margin)
    box = displayed_box(face, photo.scale)
    entry = GalleryEntry(
        rel,
        photo.sha256,
        box,
        round(face[4], 4),
        len(faces),
        torch.zeros(0),
        landmarks=displayed_landmarks(face, photo.scale),
    )
    return entry, crops


def _save(gallery_path: Path, people_dir: Path, plan: _Plan, say: MessageFn) -> None:
    for person in plan.people:
        if not plan.new.people.get(person):
            say(f"{people_dir / person}: no photo with a usable face; {person} is not enrolled")
    if not plan.new.photos():
        raise DataError(
            f"{people_dir}: expected at least one photo with a face, got none; "
            f"{gallery_path} was not written"
        )
    try:
        gallery_path.parent.mkdir(parents=True, exist_ok=True)
        save_gallery(gallery_path, plan.new)
    except OSError as e:
        raise DataError(
            f"{gallery_path}: expected a writable place for the gallery, got "
            f"{e.strerror or type(e).__name__}; check the folder's permissions"
        ) from None


def enroll(
    people_dir: Path,
    gallery_path: Path,
    models: Models,
    *,
    margin: float = DEFAULT_MARGIN,
    batch_size: int = 64,
    workers: int = 0,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
) -> EnrollReport:
    """Detect, crop and embed each person's photos into the gallery file (atomically).

    Photos unchanged since the last enrolment (same bytes, same model, detector and
    margin) keep their embeddings; photos no longer in PEOPLE_DIR are dropped. A photo
    without a face is reported and skipped; with several faces the largest is used and
    reported. A corrupt gallery is refused (DataError) and left as it is.
    """
    say = on_message or (lambda _: None)
    plan = _plan(people_dir, gallery_path, models, margin, say)
    emb = models.embedder
    meter = Meter("photos", len(plan.rel_of), progress, "photos/s")
    batcher: FaceBatcher[tuple[str, GalleryEntry]] = FaceBatcher(
        emb.net, emb.net.embedding_dim, models.device, batch_size, batch_size
    )
    counts = {"embedded": 0, "kept": 0, "skipped": 0}

    def finished(done: list[tuple[tuple[str, GalleryEntry], Tensor]]) -> None:
        for (person, entry), vectors in done:
            entry.embedding = vectors[0].clone()
            plan.new.people.setdefault(person, []).append(entry)
            counts["embedded"] += 1

    workers, capped = worker_count(workers)
    if capped:
        say(capped)
    for item in iter_photos(
        list(plan.rel_of), models.detector.settings.max_side, workers, plan.done
    ):
        person, rel = plan.rel_of[item.path]
        meter.step(worked=not isinstance(item, Skipped))
        if isinstance(item, Failed):
            say(item.error)
            counts["skipped"] += 1
        elif isinstance(item, Skipped):
            if rel in plan.old_entries:
                plan.new.people.setdefault(person, []).append(plan.old_entries[rel])
                counts["kept"] += 1
            else:
                plan.new.skipped[rel] = plan.reuse.skipped[rel]
                say(f"{item.path}: {plan.reuse.skipped[rel]['reason']} (unchanged); skipped")
                counts["skipped"] += 1
        elif (face := _enrol_face(plan, models, item, person, rel, margin, say)) is None:
            counts["skipped"] += 1
        else:
            finished(batcher.add((person, face[0]), face[1]))
    finished(batcher.flush())
    _save(gallery_path, people_dir, plan, say)
    present = {rel for _, rel in plan.rel_of.values()}
    removed = sum(1 for rel in plan.old_entries if rel not in present)
    new = plan.new
    return EnrollReport(
        gallery_path,
        emb.version,
        models.device,
        len(new.names()),
        new.photos(),
        counts["embedded"],
        counts["kept"],
        removed,
        counts["skipped"],
        plan.rebuilt,
        plan.scan.summary(),
    )
