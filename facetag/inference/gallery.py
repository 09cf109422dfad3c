"""The gallery file: the enrolled people's face embeddings, made by ``facetag enroll``.

One JSON document (readable, and loading it never runs code), written atomically::

    {
      "format": "facetag-gallery/1",
      "model": "embedder-3f2a...",        # LoadedEmbedder.version the embeddings come from
      "detector": "shipped:detector-...",  # and how the faces were found and cropped
      "margin": 0.25,
      "root": "/photos/people",            # PEOPLE_DIR when it was enrolled (informational)
      "people": {
        "Alice": [
          {"path": "Alice/1.jpg",          # relative to PEOPLE_DIR, / separated
           "sha256": "9c1e...",            # of the photo's bytes: unchanged photos are kept
           "box": [x1, y1, x2, y2],        # the face used, displayed pixels
           "score": 0.98, "faces": 1,      # detector score; faces found in the photo
           "embedding": "<base64 of D little-endian float32>"}   # L2-normalised
        ]
      },
      "skipped": {"Bob/3.jpg": {"sha256": "...", "reason": "no face found"}}
    }

Embeddings of two different models are never compared: a gallery made with another
model version is refused (tagging) or rebuilt (enrolling).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facetag.atomic import atomic_write
from facetag.errors import DataError, ModelError

GALLERY_FORMAT = "facetag-gallery/1"


@dataclass
class GalleryEntry:
    """One enrolled photo of a person."""

    path: str  # relative to PEOPLE_DIR, "/" separated: "<person>/<file>"
    sha256: str  # of the photo's bytes
    box: list[float]  # the face used, [x1, y1, x2, y2] in displayed pixels
    score: float  # the detector's score for it
    faces: int  # faces the detector found in the photo (the largest is used)
    embedding: Tensor  # (D,) float32, L2-normalised


@dataclass
class Gallery:
    model: str  # the embedder version (LoadedEmbedder.version)
    detector: str = ""
    margin: float = 0.0
    root: str = ""
    people: dict[str, list[GalleryEntry]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    def names(self) -> list[str]:
        """People with at least one photo, sorted: index p of matrix()'s labels."""
        return sorted(name for name, entries in self.people.items() if entries)

    def photos(self) -> int:
        return sum(len(v) for v in self.people.values())

    def matrix(self) -> tuple[Tensor, Tensor]:
        """(embeddings (M, D) float32, labels (M,) int64 index into names())."""
        names = self.names()
        rows, labels = [], []
        for p, name in enumerate(names):
            for e in self.people[name]:
                rows.append(e.embedding)
                labels.append(p)
        if not rows:
            return torch.zeros((0, 0)), torch.zeros(0, dtype=torch.int64)
        return torch.stack(rows), torch.tensor(labels, dtype=torch.int64)

    def fingerprint(self) -> str:
        """sha256 over the model and every (person, photo, embedding): tagging manifests
        record it, so enrolling someone new makes a rerun tag the photos again."""
        h = hashlib.sha256(self.model.encode("utf-8", "surrogateescape"))
        for name in self.names():
            for e in sorted(self.people[name], key=lambda e: e.path):
                # surrogateescape: a non-UTF-8 file name hashes as its own bytes
                h.update(f"\0{name}\0{e.path}\0{e.sha256}\0".encode("utf-8", "surrogateescape"))
                h.update(e.embedding.numpy().astype("<f4").tobytes())
        return h.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": GALLERY_FORMAT,
            "model": self.model,
            "detector": self.detector,
            "margin": self.margin,
            "root": self.root,
            "people": {
                name: [_entry_to_json(e) for e in sorted(entries, key=lambda e: e.path)]
                for name, entries in sorted(self.people.items())
            },
            "skipped": dict(sorted(self.skipped.items())),
        }


def _entry_to_json(e: GalleryEntry) -> dict[str, Any]:
    raw = e.embedding.detach().cpu().numpy().astype("<f4").tobytes()
    return {
        "path": e.path,
        "sha256": e.sha256,
        "box": [round(float(v), 1) for v in e.box],
        "score": round(float(e.score), 4),
        "faces": int(e.faces),
        "embedding": base64.b64encode(raw).decode("ascii"),
    }


def _entry_from_json(d: dict[str, Any]) -> GalleryEntry:
    raw = base64.b64decode(d["embedding"], validate=True)
    if not raw or len(raw) % 4:
        raise ValueError("embedding is not a float32 vector")
    emb = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
    return GalleryEntry(
        path=str(d["path"]),
        sha256=str(d["sha256"]),
        box=[float(v) for v in d["box"]],
        score=float(d["score"]),
        faces=int(d["faces"]),
        embedding=emb,
    )


def _how_to_make(path: Path) -> str:
    return f"facetag enroll PEOPLE_DIR --gallery {path}"


def require_gallery(path: Path) -> None:
    """DataError (one line) when there is no gallery file at ``path``: the CLI checks this
    before it spends seconds loading models."""
    if not path.exists():
        raise DataError(
            f"{path}: expected a gallery file, got no such file; create it with "
            f"{_how_to_make(path)}"
        )
    if path.is_dir():
        raise DataError(f"{path}: expected a gallery file, got a folder; pass the file")


def load_gallery(path: Path | str, expect_model: str | None = None) -> Gallery:
    """Read a gallery file; with ``expect_model``, refuse one made with another model.

    Raises DataError for a missing, unreadable or corrupt file and ModelError for a
    gallery of another model version (one line each, saying how to re-enrol).
    """
    path = Path(path)
    require_gallery(path)
    corrupt = (
        f"{path}: expected a facetag gallery ({GALLERY_FORMAT}), got {{what}}; re-create it "
        f"with {_how_to_make(path)}"
    )
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise DataError(
            f"{path}: expected a readable gallery, got no permission; check its permissions"
        ) from None
    except (OSError, UnicodeDecodeError):
        raise DataError(corrupt.format(what="a file that is not text")) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise DataError(corrupt.format(what="a file that is not valid JSON")) from None
    if not isinstance(doc, dict) or doc.get("format") != GALLERY_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise DataError(corrupt.format(what=f"format {got!r}" if got else "another file"))
    try:
        gallery = Gallery(
            model=str(doc["model"]),
            detector=str(doc.get("detector", "")),
            margin=float(doc.get("margin", 0.0)),
            root=str(doc.get("root", "")),
            people={
                str(name): [_entry_from_json(e) for e in entries]
                for name, entries in doc["people"].items()
            },
            skipped={
                str(k): {"sha256": str(v["sha256"]), "reason": str(v["reason"])}
                for k, v in doc.get("skipped", {}).items()
            },
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(corrupt.format(what="a damaged gallery")) from None
    dims = {int(e.embedding.numel()) for v in gallery.people.values() for e in v}
    if len(dims) > 1:
        raise DataError(corrupt.format(what=f"embeddings of sizes {sorted(dims)}"))
    if expect_model is not None and gallery.model != expect_model:
        raise ModelError(
            f"{path}: expected a gallery made with model {expect_model}, got one made with "
            f"{gallery.model}; re-enrol with this model: {_how_to_make(path)} --model <it>"
        )
    return gallery


def save_gallery(path: Path | str, gallery: Gallery) -> Path:
    """Write the gallery atomically (temporary file, fsync, rename): never half written."""
    path = Path(path)
    text = json.dumps(gallery.to_json(), indent=1) + "\n"
    atomic_write(path, text.encode("utf-8"))
    return path
