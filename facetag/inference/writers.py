"""What ``facetag tag`` writes besides the sidecars: JSON, CSV and annotated copies.

Every file is written atomically (facetag.atomic.atomic_write): a kill at any moment leaves
the old file or the new one. The photo itself is never touched. XMP sidecars (face regions
and people keywords for the photo managers) are facetag.inference.xmp.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from facetag.atomic import atomic_write, write_problem
from facetag.errors import DataError
from facetag.fsnames import json_text

CSV_COLUMNS = ("path", "x1", "y1", "x2", "y2", "score", "name", "distance", "confidence")
ANNOTATED_MARK = b"facetag annotated copy"  # the JPEG comment of every annotated copy


def to_json(doc: dict[str, Any]) -> str:
    """The tag document as indented JSON text (non-UTF-8 names as \\udcXX escapes)."""
    return json_text(doc, indent=2)


def csv_text(images: Iterable[dict[str, Any]]) -> str:
    """One row per face: path, x1, y1, x2, y2, score, name ('' = unknown), distance,
    confidence. Photos without faces have no rows.

    Lines end in "\\r\\n" (RFC 4180): Python's csv quotes a field only for the characters
    of its line end, so with "\\n" alone a file name holding "\\r" went out bare and split
    its row in two for every other reader.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for image in images:
        for f in image["faces"]:
            w.writerow(
                [
                    image["path"],
                    *f["box"],
                    f["score"],
                    f["name"] or "",
                    f["distance"],
                    f["confidence"],
                ]
            )
    return buf.getvalue()


def write_csv(path: Path, images: Iterable[dict[str, Any]]) -> Path:
    """The CSV of csv_text, written atomically as UTF-8. A file name that is not UTF-8
    (bytes from an old Windows or Samba share) is written as its own bytes, so
    ``open(csv, errors="surrogateescape")`` reads back the path that opens the photo."""
    atomic_write(path, csv_text(images).encode("utf-8", "surrogateescape"))
    return path


def annotate(img: Image.Image, image: dict[str, Any], scale: float) -> Image.Image:
    """A copy of ``img`` (the loaded photo, ``scale`` = loaded / displayed) with each face's
    box and name (or '?' for unknown) drawn on it."""
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 400))
    font = ImageFont.load_default(size=max(12, round(max(out.size) / 60)))
    for f in image["faces"]:
        x1, y1, x2, y2 = (float(v) * scale for v in f["box"])
        colour = (40, 200, 60) if f["name"] else (230, 60, 40)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        label = f"{f['name']} {f['confidence']:.2f}" if f["name"] else "?"
        tx, ty = x1, max(0.0, y1 - float(getattr(font, "size", 12)) - 2 * width)
        bbox = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(bbox, fill=colour)
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
    return out


def annotated_path(folder: Path, rel: Path) -> Path:
    """Where the annotated copy of a photo goes: folder/rel, as JPEG (.jpg kept, any
    other extension gets .jpg appended so photo.png and photo.jpg do not collide)."""
    suffix = rel.suffix.lower()
    name = rel.name if suffix in (".jpg", ".jpeg") else rel.name + ".jpg"
    return folder / rel.parent / name


def is_annotated_copy(path: Path) -> bool:
    """True when ``path`` is a JPEG that write_annotated wrote (its comment says so)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\xff\xd8") and ANNOTATED_MARK in head


def write_annotated(path: Path, img: Image.Image) -> Path:
    """Save an annotated copy atomically as JPEG, creating its folders. Only a file that
    is itself an annotated copy is replaced: DataError (one line) for anything else there,
    which is left unchanged."""
    if os.path.lexists(path) and not is_annotated_copy(path):
        raise DataError(
            f"{path}: expected a new file or an annotated copy of facetag's, got another "
            "file; left unchanged: pass another --annotate folder"
        )
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, comment=ANNOTATED_MARK)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    except OSError as e:
        got = write_problem(e, path.parent, "check --annotate's permissions")
        raise DataError(
            f"{path}: expected a writable folder for the annotated copy, got {got}"
        ) from None
    return path


def format_tags(doc: dict[str, Any]) -> str:
    """The human-readable summary of a tag document: one line per photo."""
    lines = []
    for image in doc["images"]:
        faces = ", ".join(
            f"{f['name']} ({f['distance']:.2f})" if f["name"] else "unknown" for f in image["faces"]
        )
        lines.append(f"{image['path']}: {faces or 'no faces'}")
    m = doc["model"]
    lines.append(
        f"{len(doc['images'])} photos tagged on {doc['device']} with {m['embedder']} and "
        f"{m['detector']}, threshold {m['threshold']:g} ({m['threshold_source']})"
    )
    return "\n".join(lines)
