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
import math
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

    def dim(self) -> int | None:
        """D of the embeddings (None for a gallery without photos)."""
        for entries in self.people.values():
            for e in entries:
                return int(e.embedding.numel())
        return None

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


class _Bad(ValueError):
    """A gallery field that is not what it should be: (field, expected, got)."""


class Words(str):
    """What was found, said in words (shown as it is, where a value is shown as its repr)."""


def _check(ok: bool, field: str, expected: str, got: object) -> None:
    if not ok:
        shown = str(got) if isinstance(got, Words) else repr(got)
        raise _Bad(field, expected, shown if len(shown) <= 60 else shown[:57] + "...")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _entry_from_json(d: Any, where: str) -> GalleryEntry:
    """One gallery entry, every field checked (_Bad names the first wrong one)."""
    _check(isinstance(d, dict), where, "an object", Words(type(d).__name__))
    path, sha = d.get("path"), d.get("sha256")
    _check(isinstance(path, str) and bool(path), f"{where}.path", "a photo path", path)
    _check(
        isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
        f"{where}.sha256",
        "64 hex digits",
        sha,
    )
    box = d.get("box")
    _check(
        isinstance(box, list) and len(box) == 4 and all(_finite(v) for v in box),
        f"{where}.box",
        "[x1, y1, x2, y2] of finite numbers",
        box,
    )
    _check(box[0] <= box[2] and box[1] <= box[3], f"{where}.box", "x1 <= x2 and y1 <= y2", box)
    score, faces = d.get("score"), d.get("faces")
    _check(_finite(score), f"{where}.score", "a finite number", score)
    _check(
        isinstance(faces, int) and not isinstance(faces, bool) and faces >= 1,
        f"{where}.faces",
        "an integer >= 1",
        faces,
    )
    values = _embedding(d.get("embedding"), f"{where}.embedding")
    source = d.get("source", "enroll")
    _check(isinstance(source, str) and bool(source), f"{where}.source", "a word", source)
    confirmed = d.get("confirmed")
    _check(
        confirmed is None
        or (isinstance(confirmed, dict) and all(isinstance(v, str) for v in confirmed.values())),
        f"{where}.confirmed",
        "an object of text",
        confirmed,
    )
    return GalleryEntry(
        path=path,
        sha256=sha,
        box=[float(v) for v in box],
        score=float(score),
        faces=faces,
        embedding=values,
        source=source,
        landmarks=_points(d.get("landmarks"), f"{where}.landmarks"),
        confirmed=dict(confirmed) if confirmed else None,
    )


def _embedding(raw_text: Any, field: str) -> Tensor:
    """A base64 float32 unit vector, checked (_Bad names ``field``)."""
    _check(isinstance(raw_text, str), field, "base64 float32 values", raw_text)
    try:
        raw = base64.b64decode(raw_text, validate=True)
    except ValueError:
        raise _Bad(field, "base64 float32 values", Words("text that is not base64")) from None
    _check(bool(raw) and len(raw) % 4 == 0, field, "float32 values", Words(f"{len(raw)} bytes"))
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    _check(bool(np.isfinite(values).all()), field, "finite values", Words("NaN or infinity"))
    norm = float(np.linalg.norm(values.astype(np.float64)))
    _check(abs(norm - 1.0) <= 1e-3, field, "a unit-length vector", Words(f"length {norm:.4g}"))
    return torch.from_numpy(values)


def _box(v: Any, field: str) -> list[float]:
    _check(
        isinstance(v, list) and len(v) == 4 and all(_finite(x) for x in v),
        field,
        "[x1, y1, x2, y2] of finite numbers",
        v,
    )
    return [float(x) for x in v]


def _text(d: dict[str, Any], key: str, field: str) -> str:
    v = d.get(key)
    _check(isinstance(v, str), f"{field}.{key}", "text", v)
    return str(v)


def _rejection_from_json(r: Any, where: str) -> Rejection:
    _check(isinstance(r, dict), where, "an object", Words(type(r).__name__))
    confirmed = r.get("confirmed", {})
    _check(isinstance(confirmed, dict), f"{where}.confirmed", "an object", confirmed)
    return Rejection(
        _text(r, "person", where),
        _embedding(r.get("embedding"), f"{where}.embedding"),
        _text(r, "path", where),
        _box(r.get("box"), f"{where}.box"),
        {str(k): str(v) for k, v in confirmed.items()},
    )


def _cluster_face_from_json(f: Any, where: str) -> ClusterFace:
    _check(isinstance(f, dict), where, "an object", Words(type(f).__name__))
    return ClusterFace(
        _text(f, "path", where),
        _text(f, "sha256", where),
        _box(f.get("box"), f"{where}.box"),
        _embedding(f.get("embedding"), f"{where}.embedding"),
        _points(f.get("landmarks"), f"{where}.landmarks"),
    )


def _gallery_from_json(doc: dict[str, Any]) -> Gallery:
    """The document's fields, each checked; raises _Bad for the first that is wrong."""
    model, detector, root = doc.get("model"), doc.get("detector", ""), doc.get("root", "")
    _check(isinstance(model, str) and bool(model), "model", "the embedder's id", model)
    assert isinstance(model, str)  # for mypy: _check raised otherwise
    _check(isinstance(detector, str), "detector", "the detector's name", detector)
    _check(isinstance(root, str), "root", "a folder path", root)
    margin = doc.get("margin", 0.0)
    _check(_finite(margin) and 0 <= margin <= 2, "margin", "a number in [0, 2]", margin)
    people = doc.get("people")
    _check(
        isinstance(people, dict),
        "people",
        "an object of person: photos",
        Words(type(people).__name__),
    )
    assert isinstance(people, dict)
    out: dict[str, list[GalleryEntry]] = {}
    for name, entries in people.items():
        where = f"people[{json.dumps(name)}]"
        _check(bool(name.strip()), where, "a person's name", name)
        _check(isinstance(entries, list), where, "a list of photos", Words(type(entries).__name__))
        out[name] = [_entry_from_json(e, f"{where}[{i}]") for i, e in enumerate(entries)]
    skipped = doc.get("skipped", {})
    _check(isinstance(skipped, dict), "skipped", "an object", Words(type(skipped).__name__))
    kept: dict[str, dict[str, str]] = {}
    for k, v in skipped.items():
        where = f"skipped[{json.dumps(k)}]"
        ok = isinstance(v, dict) and all(isinstance(v.get(f), str) for f in ("sha256", "reason"))
        _check(ok, where, "an object with sha256 and reason", v)
        kept[k] = {"sha256": v["sha256"], "reason": v["reason"]}
    dims = {int(e.embedding.numel()) for v in out.values() for e in v}
    _check(len(dims) <= 1, "people", "embeddings of one size", sorted(dims))
    rejections, clusters = doc.get("rejections", []), doc.get("clusters", {})
    _check(isinstance(rejections, list), "rejections", "a list", Words(type(rejections).__name__))
    _check(isinstance(clusters, dict), "clusters", "an object", Words(type(clusters).__name__))
    history, model_file = doc.get("history", []), doc.get("model_file", "")
    _check(
        isinstance(history, list) and all(isinstance(h, dict) for h in history),
        "history",
        "a list of objects",
        Words(type(history).__name__),
    )
    _check(isinstance(model_file, str), "model_file", "a file path", model_file)
    for cid, faces in clusters.items():
        _check(isinstance(faces, list), f"clusters[{json.dumps(cid)}]", "a list", faces)
    return Gallery(
        model,
        detector,
        float(margin),
        root,
        out,
        kept,
        rejections=[_rejection_from_json(r, f"rejections[{i}]") for i, r in enumerate(rejections)],
        clusters={
            cid: [
                _cluster_face_from_json(f, f"clusters[{json.dumps(cid)}][{i}]")
                for i, f in enumerate(faces)
            ]
            for cid, faces in clusters.items()
        },
        history=[{str(k): str(v) for k, v in h.items()} for h in history],
        model_file=model_file,
    )


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _points(v: Any, field: str) -> list[list[float]] | None:
    """Five [x, y] landmarks, or None (_Bad names ``field``)."""
    if v is None:
        return None
    ok = isinstance(v, list) and len(v) == 5
    ok = ok and all(isinstance(p, list) and len(p) == 2 and all(_finite(c) for c in p) for p in v)
    _check(ok, field, "five [x, y] points", v)
    return [[float(x), float(y)] for x, y in v]


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


def load_gallery(
    path: Path | str, expect_model: str | None = None, expect_dim: int | None = None
) -> Gallery:
    """Read a gallery file; with ``expect_model``, refuse one made with another model.

    Every field is checked (ids, margin, boxes, unit-length finite embeddings of one
    size, ``expect_dim`` values when given). Raises DataError for a missing, unreadable
    or corrupt file, naming the first wrong field, and ModelError for a gallery of
    another model version (one line each, saying how to re-enrol).
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
    except (ValueError, RecursionError) as e:  # JSONDecodeError, > 4300 digits, deep nesting
        what = "nesting too deep" if isinstance(e, RecursionError) else _short(e)
        raise DataError(corrupt.format(what=f"a file that is not valid JSON ({what})")) from None
    if not isinstance(doc, dict) or doc.get("format") != GALLERY_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise DataError(corrupt.format(what=f"format {got!r}" if got else "another file"))
    try:
        gallery = _gallery_from_json(doc)
    except _Bad as e:
        field, expected, got = e.args
        raise DataError(
            f"{path}: expected {field} to be {expected}, got {got}; re-create it with "
            f"{_how_to_make(path)}"
        ) from None
    D = gallery.dim()
    if expect_dim is not None and D is not None and expect_dim != D:
        raise DataError(
            f"{path}: expected embeddings of {expect_dim} values (the model's), got {D}; "
            f"re-create it with {_how_to_make(path)}"
        )
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
