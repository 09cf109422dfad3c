"""``facetag learn``: the names users fix in their photo manager (or facetag's CSV) flow
back into the gallery.

    photos + their sidecars (--from-xmp: MWG regions, ours or another tool's) or the CSV
    (--from-csv: facetag tag's columns, names edited)
      -> what facetag said of each photo (the tag run's manifest record)
      -> the faces found in the photo now (detector, embedder)
      -> each named region matched to a face (IoU): that face IS that person (confirmed,
         a new person when the name is new); a face facetag named whose region is gone,
         or now carries another name: that face is NOT the person facetag said
         (a rejection: tagging never gives that person to this face again)
    -> the gallery, with who confirmed what, from which file and when; written atomically
       once at the end, so a kill at any moment loses nothing

A line per problem (a name unsafe as a file name, two regions with the same name on one
photo, a region that matches no face, a CSV row for a photo not in the library); the rest
of the corrections are applied.
"""

from __future__ import annotations

import csv
import getpass
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facetag.data.boxes import iou_matrix
from facetag.data.images import Photo, decode_photo, file_sha256, find_images, image_size
from facetag.errors import DataError
from facetag.inference.align import (
    DEFAULT_MARGIN,
    displayed_box,
    displayed_landmarks,
    find_faces,
    photo_crops,
)
from facetag.inference.gallery import Gallery, GalleryEntry, Rejection, load_gallery, save_gallery
from facetag.inference.manifest import Manifest
from facetag.inference.models import Models
from facetag.inference.outputs import manifest_path, manifests_of
from facetag.inference.xmp import photo_regions, sidecar_candidates
from facetag.progress import Meter, ProgressFn

MessageFn = Callable[[str], None]
MATCH_IOU = 0.3  # a region and a detected face overlap this much: the same face
SAME_FACE_IOU = 0.5  # a region over the face facetag named overlaps it this much
UNSAFE = set('/\\\0:*?"<>|')  # characters a person's name may not have (file names)


@dataclass(frozen=True)
class Region:
    """A face as the user's tool now has it: a name (None: none) and a box, displayed px."""

    name: str | None
    box: tuple[float, float, float, float]


@dataclass
class LearnReport:
    gallery: Path
    photos: int = 0  # photos with corrections read
    confirmed: int = 0  # faces added to (or kept in) a person
    moved: int = 0  # faces that changed person
    rejected: int = 0  # "not this person"
    new_people: list[str] = field(default_factory=list)
    problems: int = 0


def xmp_regions(photo: Path) -> tuple[list[Region], Path] | None:
    """(The face regions of a photo's sidecars, photo.jpg.xmp and photo.xmp, ours and other
    tools', boxes in the displayed image; the first sidecar), or None without one."""
    found = [s for s in sidecar_candidates(photo) if s.is_file()]
    if not found:
        return None
    regions = [
        Region(r.name, r.box)
        for r in photo_regions(photo, image_size(photo))
        if r.kind in (None, "Face")
    ]
    return regions, found[0]


def csv_regions(path: Path, say: MessageFn) -> dict[str, list[Region]]:
    """facetag's CSV (path, x1, y1, x2, y2, score, name, ...) with names edited ->
    {absolute photo path: [Region]}; an emptied name is a face that is nobody enrolled."""
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path}: expected facetag's CSV, got "
            f"{getattr(e, 'strerror', None) or type(e).__name__}; check the path"
        ) from None
    out: dict[str, list[Region]] = {}
    for n, row in enumerate(rows, start=2):
        try:
            box = tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2"))
            photo = str(Path(row["path"]).resolve())
        except (KeyError, TypeError, ValueError):
            say(f"{path}:{n}: expected path, x1, y1, x2, y2 and name, got {row!r}; skipped")
            continue
        name = (row.get("name") or "").strip() or None
        out.setdefault(photo, []).append(Region(name, box))  # type: ignore[arg-type]
    return out


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def learn(
    paths: Sequence[Path],
    gallery_path: Path,
    models: Models,
    *,
    from_xmp: bool = False,
    from_csv: Path | None = None,
    manifest: Path | None = None,
    recursive: bool = False,
    margin: float = DEFAULT_MARGIN,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
) -> LearnReport:
    """Apply the corrections of the module doc to the gallery; see LearnReport."""
    if not from_xmp and from_csv is None:
        raise DataError("learn: expected --from-xmp or --from-csv FILE, got neither")
    report = LearnReport(gallery_path)

    def say(message: str) -> None:
        report.problems += 1
        (on_message or (lambda _: None))(message)

    gallery = load_gallery(gallery_path, expect_model=models.embedder.version)
    photos = find_images(paths, recursive, on_problem=lambda p, m: say(m))
    by_abs = {str(p.resolve()): p for p in photos}
    said = _what_facetag_said(photos, gallery_path, manifest, from_csv)
    wanted: dict[str, tuple[list[Region], str]] = {}
    if from_csv is not None:
        for a, regions in csv_regions(from_csv, say).items():
            if a not in by_abs:
                say(f"{from_csv}: a row for {a}, which is not in the library given; skipped")
                continue
            wanted[a] = (regions, str(from_csv))
    if from_xmp:
        for a, p in by_abs.items():
            found = xmp_regions(p)
            if found is not None:
                wanted[a] = (found[0], str(found[1]))
    meter = Meter("photos", len(wanted), progress, "photos/s")
    stamp = {"who": _who(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for a, (regions, source) in sorted(wanted.items()):
        meter.step()
        try:
            photo = decode_photo(
                by_abs[a], models.detector.settings.max_side, sha256=file_sha256(by_abs[a])
            )
        except DataError as e:
            say(str(e))
            continue
        report.photos += 1
        _learn_photo(
            gallery,
            models,
            photo,
            a,
            regions,
            said.get(a, []),
            {**stamp, "from": source},
            report,
            say,
            margin,
        )
    save_gallery(gallery_path, gallery)
    return report


def _what_facetag_said(
    photos: list[Path], gallery: Path, manifest: Path | None, csv_file: Path | None
) -> dict[str, list[dict[str, Any]]]:
    """{absolute path: the faces facetag's last tag run gave it} from that run's manifest."""
    if not photos:
        return {}
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in photos]))
    candidates = [manifest_path(manifest, csv_file, None, root, gallery)]
    if manifest is None:
        candidates += manifests_of(gallery)  # every tag run on this gallery said where
    out: dict[str, list[dict[str, Any]]] = {}
    for where in dict.fromkeys(candidates):
        if not where.is_file():
            continue
        m = Manifest.open(where)
        try:
            for a, rec in m.records.items():
                out.setdefault(a, rec["result"]["faces"])
        finally:
            m.close()
    return out


def _learn_photo(
    gallery: Gallery,
    models: Models,
    photo: Photo,
    abs_path: str,
    regions: list[Region],
    said: list[dict[str, Any]],
    stamp: dict[str, str],
    report: LearnReport,
    say: MessageFn,
    margin: float,
) -> None:
    faces = find_faces(models.detector, photo)
    boxes = np.array([displayed_box(f, photo.scale) for f in faces]).reshape(-1, 4)
    vectors = _embed(models, photo, faces, margin)
    names = [r.name for r in regions if r.name]
    for r in regions:
        if r.name is None:
            continue
        if set(r.name) & UNSAFE or r.name.strip() != r.name or not r.name:
            say(
                f"{abs_path}: the name {r.name!r} has characters unsafe in a file name; "
                "skipped (rename it in your photo manager)"
            )
            continue
        if names.count(r.name) > 1:
            say(
                f"{abs_path}: {names.count(r.name)} regions are named {r.name!r}; skipped "
                "(one person is one face of a photo)"
            )
            continue
        k = _match(boxes, r.box, MATCH_IOU)
        if k is None:
            say(f"{abs_path}: the region {r.name!r} matches no face found in the photo; skipped")
            continue
        entry = GalleryEntry(
            abs_path,
            photo.sha256,
            boxes[k].tolist(),
            round(faces[k][4], 4),
            len(faces),
            vectors[k].clone(),
            "learn",
            displayed_landmarks(faces[k], photo.scale),
            dict(stamp),
        )
        _confirm(gallery, r.name, entry, stamp, report)
    for f in said:
        if not f.get("name"):
            continue
        now = [r for r in regions if _iou(r.box, f["box"]) >= SAME_FACE_IOU]
        if any(r.name == f["name"] for r in now):
            continue  # the user kept facetag's name
        k = _match(boxes, tuple(f["box"]), MATCH_IOU)
        if k is None:
            continue
        gallery.rejections.append(
            Rejection(f["name"], vectors[k].clone(), abs_path, boxes[k].tolist(), dict(stamp))
        )
        gallery.history.append(
            {**stamp, "action": "reject", "person": f["name"], "photo": abs_path}
        )
        report.rejected += 1


def _confirm(
    gallery: Gallery, name: str, entry: GalleryEntry, stamp: dict[str, str], report: LearnReport
) -> None:
    """Put ``entry`` under ``name``: the same face under another person moves."""
    key = entry.key()
    for person, entries in gallery.people.items():
        for e in list(entries):
            if e.key() == key and person != name:
                entries.remove(e)
                report.moved += 1
                gallery.history.append(
                    {
                        **stamp,
                        "action": "move",
                        "person": name,
                        "from_person": person,
                        "photo": entry.path,
                    }
                )
    if name not in gallery.people or not gallery.people[name]:
        report.new_people.append(name)
    people = gallery.people.setdefault(name, [])
    people[:] = [e for e in people if e.key() != key] + [entry]
    gallery.history.append({**stamp, "action": "confirm", "person": name, "photo": entry.path})
    report.confirmed += 1


def _embed(models: Models, photo: Photo, faces: list[list[float]], margin: float) -> torch.Tensor:
    from facetag.inference.align import embed_crops

    if not faces:
        return torch.zeros((0, models.embedder.net.embedding_dim))
    crops = photo_crops(models.detector, photo, faces, models.embedder, margin)
    return embed_crops(models.embedder.net, crops, 64, models.device)


def _match(boxes: np.ndarray, box: Sequence[float], limit: float) -> int | None:
    if boxes.shape[0] == 0:
        return None
    iou = iou_matrix(np.array([box], np.float64), boxes)[0]
    k = int(iou.argmax())
    return k if iou[k] >= limit else None


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    return float(iou_matrix(np.array([a], np.float64), np.array([b], np.float64))[0, 0])
