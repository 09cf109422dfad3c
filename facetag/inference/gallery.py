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
      "skipped": {"Bob/3.jpg": {"sha256": "...", "reason": "no face found"}},
      "rejections": [...],   # faces a user said are NOT a person (facetag learn)
      "clusters": {"c1": [...]},  # unknown faces grouped (facetag cluster), stable ids
      "history": [{"when", "who", "action", "person", "photo", "from"}],
      "model_file": ""       # a tuned embedder (facetag tune) tagging uses by default
    }

Entries learnt from corrections (``"source": "learn"`` or ``"cluster"``) keep the photo's
absolute path and who confirmed them from which file; re-enrolling keeps them.

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
    source: str = "enroll"  # enroll (PEOPLE_DIR), learn (a user's correction), cluster
    landmarks: list[list[float]] | None = None  # five points, displayed pixels (re-cutting)
    confirmed: dict[str, str] | None = None  # learn/cluster: who, from (file), when

    def key(self) -> tuple[str, tuple[float, ...]]:
        """The face this entry is: its photo and box (1 px)."""
        return self.path, tuple(round(v) for v in self.box)


@dataclass
class Rejection:
    """A face a user said is not ``person`` (a deleted or renamed region): tagging never
    gives that person to a face this close to it again."""

    person: str
    embedding: Tensor  # (D,)
    path: str
    box: list[float]
    confirmed: dict[str, str]


@dataclass
class ClusterFace:
    """An unknown face in a cluster (facetag cluster)."""

    path: str  # absolute
    sha256: str
    box: list[float]
    embedding: Tensor
    landmarks: list[list[float]] | None = None

    def key(self) -> tuple[str, tuple[float, ...]]:
        return self.sha256, tuple(round(v) for v in self.box)


@dataclass
class Gallery:
    model: str  # the embedder version (LoadedEmbedder.version)
    detector: str = ""
    margin: float = 0.0
    root: str = ""
    people: dict[str, list[GalleryEntry]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    clusters: dict[str, list[ClusterFace]] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    model_file: str = ""  # the tuned embedder's file (facetag tune); "" = the given --model

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
        h = hashlib.sha256(self.model.encode())
        for name in self.names():
            for e in sorted(self.people[name], key=lambda e: e.path):
                h.update(f"\0{name}\0{e.path}\0{e.sha256}\0".encode())
                h.update(e.embedding.numpy().astype("<f4").tobytes())
        for r in self.rejections:
            h.update(f"\0not\0{r.person}\0{r.path}\0".encode())
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
            "rejections": [_rejection_to_json(r) for r in self.rejections],
            "clusters": {
                cid: [_cluster_face_to_json(f) for f in faces]
                for cid, faces in sorted(self.clusters.items(), key=lambda kv: _cluster_no(kv[0]))
            },
            "history": self.history,
            "model_file": self.model_file,
        }

    def rejection_matrix(self) -> tuple[Tensor, Tensor]:
        """(embeddings (R, D), labels (R,) index into names(); -1 for people not enrolled)."""
        names = {n: p for p, n in enumerate(self.names())}
        if not self.rejections:
            return torch.zeros((0, 0)), torch.zeros(0, dtype=torch.int64)
        E = torch.stack([r.embedding for r in self.rejections])
        labels = torch.tensor([names.get(r.person, -1) for r in self.rejections])
        return E, labels


def _cluster_no(cid: str) -> int:
    return int(cid[1:]) if cid[1:].isdigit() else 0


def _vector_to_json(t: Tensor) -> str:
    return base64.b64encode(t.detach().cpu().numpy().astype("<f4").tobytes()).decode("ascii")


def _vector_from_json(text: str) -> Tensor:
    raw = base64.b64decode(text, validate=True)
    if not raw or len(raw) % 4:
        raise ValueError("embedding is not a float32 vector")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))


def _rejection_to_json(r: Rejection) -> dict[str, Any]:
    return {
        "person": r.person,
        "path": r.path,
        "box": [round(float(v), 1) for v in r.box],
        "confirmed": r.confirmed,
        "embedding": _vector_to_json(r.embedding),
    }


def _cluster_face_to_json(f: ClusterFace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": f.path,
        "sha256": f.sha256,
        "box": [round(float(v), 1) for v in f.box],
        "embedding": _vector_to_json(f.embedding),
    }
    if f.landmarks is not None:
        out["landmarks"] = f.landmarks
    return out


def _entry_to_json(e: GalleryEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": e.path,
        "sha256": e.sha256,
        "box": [round(float(v), 1) for v in e.box],
        "score": round(float(e.score), 4),
        "faces": int(e.faces),
        "embedding": _vector_to_json(e.embedding),
    }
    if e.source != "enroll":
        out["source"] = e.source
    if e.landmarks is not None:
        out["landmarks"] = e.landmarks
    if e.confirmed is not None:
        out["confirmed"] = e.confirmed
    return out


def _entry_from_json(d: dict[str, Any]) -> GalleryEntry:
    return GalleryEntry(
        path=str(d["path"]),
        sha256=str(d["sha256"]),
        box=[float(v) for v in d["box"]],
        score=float(d["score"]),
        faces=int(d["faces"]),
        embedding=_vector_from_json(d["embedding"]),
        source=str(d.get("source", "enroll")),
        landmarks=_points(d.get("landmarks")),
        confirmed={str(k): str(v) for k, v in d["confirmed"].items()}
        if d.get("confirmed")
        else None,
    )


def _points(v: Any) -> list[list[float]] | None:
    if v is None:
        return None
    pts = [[float(x), float(y)] for x, y in v]
    if len(pts) != 5:
        raise ValueError("landmarks are not five points")
    return pts


def _how_to_make(path: Path) -> str:
    return f"facetag enroll PEOPLE_DIR --gallery {path}"


def load_gallery(path: Path | str, expect_model: str | None = None) -> Gallery:
    """Read a gallery file; with ``expect_model``, refuse one made with another model.

    Raises DataError for a missing, unreadable or corrupt file and ModelError for a
    gallery of another model version (one line each, saying how to re-enrol).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: expected a gallery file, got no such file; create it with "
            f"{_how_to_make(path)}"
        )
    if path.is_dir():
        raise DataError(f"{path}: expected a gallery file, got a folder; pass the file")
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
            rejections=[
                Rejection(
                    str(r["person"]),
                    _vector_from_json(r["embedding"]),
                    str(r["path"]),
                    [float(v) for v in r["box"]],
                    {str(k): str(v) for k, v in r["confirmed"].items()},
                )
                for r in doc.get("rejections", [])
            ],
            clusters={
                str(cid): [
                    ClusterFace(
                        str(f["path"]),
                        str(f["sha256"]),
                        [float(v) for v in f["box"]],
                        _vector_from_json(f["embedding"]),
                        _points(f.get("landmarks")),
                    )
                    for f in faces
                ]
                for cid, faces in doc.get("clusters", {}).items()
            },
            history=[{str(k): str(v) for k, v in h.items()} for h in doc.get("history", [])],
            model_file=str(doc.get("model_file", "")),
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
