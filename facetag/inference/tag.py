"""Enrol people and tag photos: decode -> detect -> align -> embed -> match.

    photo paths --(--workers processes: hash + decode, a bounded queue)--> Photo
      -> detector: boxes (K, 5) in the loaded pixels
      -> align.photo_crops: uint8 crops (K, C, H, W) as the embedder was trained
      -> pending photos until batch_size crops are waiting, then one embedding batch
         across photos (N, D), split back per photo
      -> match_faces per photo: nearest enrolled person by cosine distance, assigned
         jointly so that one person names at most one face of a photo
      -> outputs (XMP sidecar, annotated copy), then one manifest record per photo
    final JSON / CSV: made from the records of this run's photos

Memory stays flat: at most ``workers * 2`` decoded photos wait in the queue, pending
photos keep only their crops (and, with --annotate, at most ANNOTATE_PENDING images),
and nothing else of a photo outlives its manifest record.

Distances are cosine distances 1 - <a, b> between L2-normalised embeddings, in [0, 2]; a
person's distance to a face is the smallest over that person's gallery photos.

Confidence, in [0, 1], says how far the distance is from the threshold t, in units of t:
a named face has (t - d) / t (1 for d = 0, 0 at the threshold); an unknown face has
min(1, (d - t) / t) with d its nearest person's distance (1 from d = 2t on), and 0 when
that person was under the threshold but went to a closer face of the same photo.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from facetag.data.images import find_images, is_image_file
from facetag.errors import DataError, ModelError
from facetag.inference.align import (
    DEFAULT_MARGIN,
    FaceDetector,
    Photo,
    displayed_box,
    embed_crops,
    file_sha256,
    find_faces,
    open_detector,
    photo_crops,
    read_photo,
)
from facetag.inference.gallery import Gallery, GalleryEntry, load_gallery, save_gallery
from facetag.inference.manifest import DEFAULT_NAME, Manifest
from facetag.inference.writers import (
    annotate,
    annotated_path,
    write_annotated,
    write_csv,
    write_xmp,
)
from facetag.models.io import LoadedEmbedder, load_embedder

DEFAULT_THRESHOLD = 0.5  # cosine distance used when neither --threshold nor the model has one
ANNOTATE_PENDING = 8  # photos whose pixels are kept for drawing while their batch fills
_BIG = 1e6  # cost of an assignment that is not allowed (a person over the threshold)

MessageFn = Callable[[str], None]


@dataclass(frozen=True)
class Progress:
    """Reported after each photo: how far the run is and how fast it goes."""

    done: int  # photos handled (tagged, skipped as done before, or failed)
    total: int
    photos_per_s: float
    eta_s: float


ProgressFn = Callable[[Progress], None]


class _Meter:
    def __init__(self, total: int, callback: ProgressFn | None) -> None:
        self.total, self.callback, self.done = total, callback, 0
        self.t0 = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.callback is None:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        self.callback(Progress(self.done, self.total, rate, (self.total - self.done) / rate))


# --- models -----------------------------------------------------------------------------


@dataclass
class Models:
    """The embedder and detector of a run, on ``device``, and the threshold used."""

    embedder: LoadedEmbedder
    detector: FaceDetector
    device: str
    threshold: float
    threshold_source: str  # "--threshold", "calibrated", "model file" or "default"
    embedder_source: str = ""  # the --model spec, or the shipped file

    def info(self) -> dict[str, Any]:
        """The ``model`` block of the tag JSON (versions, MLflow run ids, threshold)."""
        det_state = getattr(self.detector, "state", None) or {}
        return {
            "detector": self.detector.name,
            "embedder": self.embedder.version,
            "embedder_source": self.embedder_source,
            "run_ids": {
                "detector": det_state.get("run_id") or None,
                "embedder": self.embedder.state.get("run_id") or None,
            },
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
        }


def shipped_embedder() -> Path:
    """The embedder weights inside the package (``make weights`` rebuilds them)."""
    return Path(str(resources.files("facetag") / "weights" / "embedder.pt"))


def embedder_path(spec: str | None) -> tuple[Path, str]:
    """(local model file, the spec shown in outputs) for --model (None = shipped)."""
    if spec is None:
        path = shipped_embedder()
        if not path.is_file():
            raise ModelError(
                f"{path}: expected the shipped embedder weights, got no such file; pass "
                "--model (a model.pt from facetag train, runs:/... or models:/...) or run "
                "make weights"
            )
        return path, "shipped"
    from facetag.training.tracking import resolve_model_uri

    return resolve_model_uri(spec), spec


def resolve_threshold(
    override: float | None, spec: str, embedder: LoadedEmbedder
) -> tuple[float, str]:
    """--threshold, else the calibrated one (facetag evaluate), else the model file's,
    else DEFAULT_THRESHOLD; with where it came from."""
    if override is not None:
        return float(override), "--threshold"
    if spec.startswith(("runs:/", "models:/")):
        from facetag.training.evaluate import calibrated_threshold

        t = calibrated_threshold(spec)
        if t is not None:
            return float(t), "calibrated"
    if embedder.threshold is not None:
        return float(embedder.threshold), "model file"
    return DEFAULT_THRESHOLD, "default"


def load_models(
    model: str | None, detector: str | None, device: str, threshold: float | None = None
) -> Models:
    """Resolve the device (DeviceError for cuda without a GPU), then load both models."""
    from facetag.device import resolve_device

    dev = resolve_device(device)
    path, spec = embedder_path(model)
    emb = load_embedder(path, dev)
    det = open_detector(detector, dev)
    t, source = resolve_threshold(threshold, spec, emb)
    return Models(emb, det, dev, t, source, spec)


# --- decoding in worker processes -------------------------------------------------------


@dataclass
class Skipped:
    """A photo whose bytes match a finished record: not decoded."""

    path: Path
    sha256: str


@dataclass
class Failed:
    path: Path
    error: str


class _PhotoSource(Dataset[Any]):
    """Hash (and unless already done, decode) photo i; runs in the DataLoader's workers."""

    def __init__(self, paths: Sequence[Path], max_side: int, done: dict[str, str]) -> None:
        self.paths, self.max_side, self.done = list(paths), max_side, done

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Photo | Skipped | Failed:
        path = self.paths[i]
        try:
            sha = file_sha256(path)
            if self.done.get(str(path.resolve())) == sha:
                return Skipped(path, sha)
            return read_photo(path, self.max_side, sha=sha)
        except DataError as e:
            return Failed(path, str(e))


def _keep(item: Any) -> Any:
    return item


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is Pillow's work; leave the cores to the models


def iter_photos(
    paths: Sequence[Path], max_side: int, workers: int = 0, done: dict[str, str] | None = None
) -> Iterator[Photo | Skipped | Failed]:
    """Photos in order, hashed and decoded by ``workers`` processes (0: this one).

    ``done`` maps absolute paths to the sha256 of a finished record: those photos come
    back as Skipped without being decoded. At most 2 photos per worker are decoded ahead.
    """
    source = _PhotoSource(paths, max_side, done or {})
    if workers <= 0:
        for i in range(len(source)):
            yield source[i]
        return
    loader = DataLoader(
        source,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_keep,
        prefetch_factor=2,
        worker_init_fn=_worker_init,
    )
    yield from loader


# --- matching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    person: int | None  # index into the gallery's names(), None = unknown
    distance: float  # to the person given, or to the nearest person for an unknown face
    confidence: float  # in [0, 1], see the module docstring


def person_distances(embeddings: Tensor, gallery: Tensor, labels: Tensor, P: int) -> Tensor:
    """Faces (K, D), gallery (M, D) with labels (M,) in [0, P) -> distances (K, P).

    d[k, p] = min over person p's gallery rows m of 1 - <e_k, g_m> (cosine distance).
    """
    K = embeddings.shape[0]
    dist = (1.0 - embeddings @ gallery.T).clamp_(0.0, 2.0)  # (K, M)
    out = torch.full((K, P), float("inf"))
    return out.scatter_reduce_(1, labels.expand(K, -1), dist, reduce="amin")  # (K, P)


def assign(distances: Tensor, threshold: float) -> list[Match]:
    """Jointly name the K faces of one photo from distances (K, P).

    Minimum-cost assignment (Hungarian, scipy) over a (K, P + K) cost matrix: face k to
    person p costs d[k, p] - t when d[k, p] < t (forbidden otherwise) and to its own
    "unknown" column 0. So every face gets at most one person, a person at most one
    face, a face is only named under the threshold, and when two faces are nearest to the
    same person the assignment with the smaller total distance wins: the closer face
    gets the person unless the other face has no better option at all.
    """
    if threshold <= 0:
        raise ValueError(f"assign: expected threshold > 0, got {threshold}")
    K, P = distances.shape
    if K == 0:
        return []
    d = distances.double().numpy()
    cost = np.zeros((K, P + K))
    cost[:, :P] = np.where(d < threshold, d - threshold, _BIG)
    rows, cols = linear_sum_assignment(cost)
    nearest = d.min(axis=1) if P else np.full(K, np.inf)
    out: list[Match] = []
    for k, c in sorted(zip(rows.tolist(), cols.tolist(), strict=True)):
        if c < P and d[k, c] < threshold:
            dist = float(d[k, c])
            out.append(Match(int(c), dist, (threshold - dist) / threshold))
        else:
            near = float(nearest[k])
            conf = 0.0 if near < threshold else min(1.0, (near - threshold) / threshold)
            out.append(Match(None, near, conf))
    return out


# --- enrolment --------------------------------------------------------------------------


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


def scan_people(people_dir: Path, on_message: MessageFn) -> dict[str, list[Path]]:
    """PEOPLE_DIR/<person>/**/<photo> -> {person: photos}; stray files are reported."""
    if not people_dir.is_dir():
        got = "a file" if people_dir.exists() else "no such folder"
        raise DataError(
            f"{people_dir}: expected a folder of person folders (PEOPLE_DIR/<person>/*.jpg), "
            f"got {got}; check the path"
        )
    people: dict[str, list[Path]] = {}
    for child in sorted(people_dir.iterdir(), key=lambda p: p.name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            photos = sorted(
                (
                    f
                    for f in child.rglob("*")
                    if is_image_file(f)
                    and not any(part.startswith(".") for part in f.relative_to(child).parts)
                ),
                key=lambda f: f.as_posix(),
            )
            if photos:
                people[child.name] = photos
            else:
                on_message(f"{child}: expected photos of {child.name}, got none; skipped")
        elif is_image_file(child):
            on_message(
                f"{child}: expected photos inside person folders (PEOPLE_DIR/<person>/), got "
                "one at the top; move it into its person's folder"
            )
    if not people:
        raise DataError(
            f"{people_dir}: expected person folders with photos (PEOPLE_DIR/<person>/*.jpg), "
            "got none; make one folder per person"
        )
    return people


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
    people = scan_people(people_dir, say)
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
    old_entries = {e.path: e for es in reuse.people.values() for e in es}
    new = Gallery(
        model=emb.version, detector=det.name, margin=margin, root=str(people_dir.resolve())
    )
    rel_of: dict[Path, tuple[str, str]] = {}  # photo -> (person, relative path)
    done: dict[str, str] = {}  # absolute path -> sha256 of a reusable result
    for person, photos in people.items():
        for p in photos:
            rel = p.relative_to(people_dir).as_posix()
            rel_of[p] = (person, rel)
            known = old_entries.get(rel) or reuse.skipped.get(rel)
            if known is not None:
                done[str(p.resolve())] = (
                    known.sha256 if isinstance(known, GalleryEntry) else known["sha256"]
                )
    order = list(rel_of)
    meter = _Meter(len(order), progress)
    pending: list[tuple[str, GalleryEntry]] = []
    crops: list[Tensor] = []
    counts = {"embedded": 0, "kept": 0, "skipped": 0}

    def flush() -> None:
        if not pending:
            return
        vectors = embed_crops(emb.net, torch.stack(crops), batch_size, models.device)  # (N, D)
        for (person, entry), v in zip(pending, vectors, strict=True):
            entry.embedding = v.clone()
            new.people.setdefault(person, []).append(entry)
        counts["embedded"] += len(pending)
        pending.clear()
        crops.clear()

    for item in iter_photos(order, det.settings.max_side, workers, done):
        person, rel = rel_of[item.path]
        meter.step()
        if isinstance(item, Failed):
            say(item.error)
            counts["skipped"] += 1
            continue
        if isinstance(item, Skipped):
            if rel in old_entries:
                new.people.setdefault(person, []).append(old_entries[rel])
                counts["kept"] += 1
            else:
                new.skipped[rel] = reuse.skipped[rel]
                say(f"{item.path}: {reuse.skipped[rel]['reason']} (unchanged); skipped")
                counts["skipped"] += 1
            continue
        faces = find_faces(det, item)
        if not faces:
            reason = "expected a face, got none"
            new.skipped[rel] = {"sha256": item.sha256, "reason": reason}
            say(f"{item.path}: {reason}; skipped (use a photo where the face is clear)")
            counts["skipped"] += 1
            continue
        face = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
        if len(faces) > 1:
            say(f"{item.path}: {len(faces)} faces found; enrolling the largest as {person}")
        crops.append(photo_crops(det, item, [face], emb.image_size, emb.in_channels, margin)[0])
        pending.append(
            (
                person,
                GalleryEntry(
                    rel,
                    item.sha256,
                    displayed_box(face, item.scale),
                    round(face[4], 4),
                    len(faces),
                    torch.zeros(0),
                ),
            )
        )
        if len(pending) >= batch_size:
            flush()
    flush()
    for person in people:
        if not new.people.get(person):
            say(f"{people_dir / person}: no photo with a usable face; {person} is not enrolled")
    if not new.photos():
        raise DataError(
            f"{people_dir}: expected at least one photo with a face, got none; "
            f"{gallery_path} was not written"
        )
    try:
        gallery_path.parent.mkdir(parents=True, exist_ok=True)
        save_gallery(gallery_path, new)
    except OSError as e:
        raise DataError(
            f"{gallery_path}: expected a writable place for the gallery, got "
            f"{e.strerror or type(e).__name__}; check the folder's permissions"
        ) from None
    present = {rel for _, rel in rel_of.values()}
    removed = sum(1 for rel in old_entries if rel not in present)
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
        rebuilt,
    )


# --- tagging ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TagOptions:
    recursive: bool = False  # look into sub-folders of folder arguments
    batch_size: int = 64  # faces per embedding batch (across photos)
    workers: int = 0  # decoding processes; 0 decodes in this process
    margin: float = DEFAULT_MARGIN  # see facetag.inference.align
    csv: Path | None = None  # write the CSV here
    xmp: bool = False  # write/merge XMP sidecars beside the photos
    annotate: Path | None = None  # write annotated copies into this folder
    manifest: Path | None = None  # default: beside --csv, else in --annotate, else ./
    resume: bool = True  # False: no manifest at all (benchmarks)


@dataclass
class TagRun:
    doc: dict[str, Any]  # the JSON document
    failed: int  # problems reported (photos or outputs)
    tagged: int  # photos processed this time
    resumed: int  # photos taken from the manifest
    manifest: Path | None = None


@dataclass
class _Pending:
    photo: Photo
    abs_path: str
    faces: list[list[float]]
    n_crops: int
    image: Image.Image | None = None  # kept only for --annotate
    extra: dict[str, Any] = field(default_factory=dict)


def manifest_path(options: TagOptions) -> Path:
    """Where the manifest goes: --manifest, else beside --csv, else in --annotate, else ./"""
    if options.manifest is not None:
        return options.manifest
    if options.csv is not None:
        return options.csv.parent / DEFAULT_NAME
    if options.annotate is not None:
        return options.annotate / DEFAULT_NAME
    return Path(DEFAULT_NAME)


def _check_writable(folder: Path, what: str) -> None:
    """Fail before any work when an output folder cannot be written (one line)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DataError(
            f"{folder}: expected a writable folder for {what}, got "
            f"{e.strerror or type(e).__name__}; check its permissions or choose another"
        ) from None


def tag_photos(
    paths: Sequence[Path],
    gallery_path: Path,
    models: Models,
    options: TagOptions | None = None,
    *,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
) -> TagRun:
    """Tag every photo of ``paths`` (files or folders) with the people of the gallery.

    Problems with single photos or their outputs are passed to on_message (one line
    each) and the run goes on; problems with the whole run (gallery, output folders,
    manifest) raise FacetagError before any photo is touched.
    """
    opts = options or TagOptions()
    say = on_message or (lambda _: None)
    emb, det = models.embedder, models.detector
    gallery = load_gallery(gallery_path, expect_model=emb.version)
    names = gallery.names()
    if not names:
        raise DataError(
            f"{gallery_path}: expected enrolled people, got none; run facetag "
            f"enroll PEOPLE_DIR --gallery {gallery_path}"
        )
    G, labels = gallery.matrix()  # (M, D), (M,)
    errors: list[dict[str, str]] = []

    def problem(path: Path, message: str) -> None:
        errors.append({"path": str(path), "error": message})
        say(message)

    photos = find_images(paths, opts.recursive, on_problem=problem)
    if opts.csv is not None:
        _check_writable(opts.csv.parent, "the CSV")
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in photos]))
    if opts.annotate is not None:
        if opts.annotate.resolve() == root:
            raise DataError(
                f"--annotate {opts.annotate}: expected a folder other than the "
                "photos' own, got the same; choose another folder"
            )
        _check_writable(opts.annotate, "annotated copies")
    key = {
        "detector": det.name,
        "embedder": emb.version,
        "threshold": models.threshold,
        "gallery": gallery.fingerprint(),
        "margin": opts.margin,
        "image_size": list(emb.image_size),
    }
    wanted = {"xmp": opts.xmp, "annotated": opts.annotate is not None}
    manifest = None
    if opts.resume:
        where = manifest_path(opts)
        _check_writable(where.parent, "the manifest")
        manifest = Manifest.open(where)
    abs_of = {p: str(p.resolve()) for p in photos}
    done = {}
    if manifest is not None:
        for a in abs_of.values():
            rec = manifest.records.get(a)
            if rec is not None and manifest.is_done(a, rec["sha256"], key, wanted):
                done[a] = rec["sha256"]
    results: dict[str, dict[str, Any]] = {}
    pending: list[_Pending] = []
    crops: list[Tensor] = []
    meter = _Meter(len(photos), progress)
    counts = {"tagged": 0, "resumed": 0}

    def finish(pend: _Pending, vectors: Tensor) -> None:
        photo = pend.photo
        matches = (
            assign(person_distances(vectors, G, labels, len(names)), models.threshold)
            if pend.faces
            else []
        )
        faces = [
            {
                "box": displayed_box(f, photo.scale),
                "score": round(f[4], 4),
                "name": names[m.person] if m.person is not None else None,
                "distance": round(m.distance, 4),
                "confidence": round(m.confidence, 4),
            }
            for f, m in zip(pend.faces, matches, strict=True)
        ]
        result = {
            "path": str(photo.path),
            "width": photo.width,
            "height": photo.height,
            "faces": faces,
        }
        record: dict[str, Any] = {
            "path": pend.abs_path,
            "sha256": photo.sha256,
            "key": key,
            "result": result,
        }
        if opts.xmp:
            try:
                sidecar = write_xmp(photo.path, result)
                record["xmp"] = str(sidecar.resolve()) if sidecar else None
            except DataError as e:
                problem(photo.path, str(e))
        if opts.annotate is not None and pend.image is not None:
            out = annotated_path(opts.annotate, Path(pend.abs_path).relative_to(root))
            try:
                write_annotated(out, annotate(pend.image, result, photo.scale))
                record["annotated"] = str(out.resolve())
            except DataError as e:
                problem(photo.path, str(e))
        if manifest is not None:
            manifest.append(record)
        results[pend.abs_path] = result
        counts["tagged"] += 1

    def flush() -> None:
        if not pending:
            return
        if crops:
            vectors = embed_crops(emb.net, torch.cat(crops), opts.batch_size, models.device)
        else:
            vectors = torch.zeros((0, G.shape[1]))
        start = 0
        for pend in pending:
            finish(pend, vectors[start : start + pend.n_crops])
            start += pend.n_crops
            meter.step()
        pending.clear()
        crops.clear()

    try:
        for item in iter_photos(photos, det.settings.max_side, opts.workers, done):
            if isinstance(item, Failed):
                problem(item.path, item.error)
                meter.step()
            elif isinstance(item, Skipped):
                assert manifest is not None
                rec = manifest.records[abs_of[item.path]]
                results[abs_of[item.path]] = {**rec["result"], "path": str(item.path)}
                counts["resumed"] += 1
                meter.step()
            else:
                faces = find_faces(det, item)
                c = photo_crops(det, item, faces, emb.image_size, emb.in_channels, opts.margin)
                crops.append(c)
                image = item.image() if opts.annotate is not None else None
                pending.append(_Pending(item, abs_of[item.path], faces, len(faces), image))
                item.pixels = torch.zeros(0, dtype=torch.uint8)  # only the crops are kept
                n_waiting = sum(p.n_crops for p in pending)
                if (
                    n_waiting >= opts.batch_size
                    or len(pending) >= opts.batch_size
                    or (image is not None and len(pending) >= ANNOTATE_PENDING)
                ):
                    flush()
        flush()
    finally:
        if manifest is not None:
            manifest.close()
    images = [results[abs_of[p]] for p in photos if abs_of[p] in results]
    doc: dict[str, Any] = {
        "device": models.device,
        "model": models.info(),
        "gallery": {"path": str(gallery_path), "people": len(names), "photos": gallery.photos()},
        "images": images,
    }
    if errors:
        doc["errors"] = errors
    if opts.csv is not None:
        try:
            write_csv(opts.csv, images)
        except OSError as e:
            raise DataError(
                f"{opts.csv}: expected a writable file, got "
                f"{e.strerror or type(e).__name__}; check its folder"
            ) from None
    if manifest is not None:
        manifest.compact()
    return TagRun(
        doc,
        len(errors),
        counts["tagged"],
        counts["resumed"],
        manifest.path if manifest is not None else None,
    )


# --- benchmark --------------------------------------------------------------------------


def random_gallery(model: str, D: int, people: int = 8, per_person: int = 2) -> Gallery:
    """A gallery of random unit embeddings, for timing when no real one is given."""
    g = torch.Generator().manual_seed(0)
    gallery = Gallery(model=model)
    for p in range(people):
        entries = []
        for k in range(per_person):
            v = torch.randn(D, generator=g)
            entries.append(
                GalleryEntry(f"p{p}/{k}.jpg", "0" * 64, [0, 0, 1, 1], 1.0, 1, v / v.norm())
            )
        gallery.people[f"person{p}"] = entries
    return gallery


def bench_tag(
    folder: Path,
    models: Models,
    *,
    gallery_path: Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    repeats: int = 2,
    scratch: Path,
) -> dict[str, Any]:
    """``facetag bench tag``: photos/s end to end (decode, detect, crop, embed, match).

    One warm-up photo, then ``repeats`` passes over the photos of ``folder``, no outputs
    and no manifest. ``scratch`` holds the random gallery when none is given.
    """
    if gallery_path is None:
        gallery_path = save_gallery(
            scratch / "bench-gallery.json",
            random_gallery(models.embedder.version, models.embedder.net.embedding_dim),
        )
    photos = find_images([folder])
    opts = TagOptions(batch_size=batch_size, workers=workers, resume=False)
    tag_photos(photos[:1], gallery_path, models, TagOptions(resume=False))

    def rss_mb() -> float:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / (1024 * 1024) if platform.system() == "Darwin" else kb / 1024

    faces = n = 0
    peak_first = 0.0
    t0 = time.perf_counter()
    for k in range(repeats):
        run = tag_photos(photos, gallery_path, models, opts)
        faces += sum(len(im["faces"]) for im in run.doc["images"])
        n += len(photos)
        if models.device == "cuda":
            torch.cuda.synchronize()
        if k == 0:
            peak_first = rss_mb()
    seconds = time.perf_counter() - t0
    return {
        "device": models.device,
        "device_name": torch.cuda.get_device_name()
        if models.device == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "workers": workers,
        "batch_size": batch_size,
        "detector": models.detector.name,
        "embedder": models.embedder.version,
        "photos": n,
        "distinct_photos": len(photos),
        "seconds": round(seconds, 3),
        "photos_per_s": round(n / seconds, 3),
        "faces_per_photo": round(faces / max(n, 1), 2),
        "peak_rss_mb_first_pass": round(peak_first, 1),
        "peak_rss_mb": round(rss_mb(), 1),
    }
