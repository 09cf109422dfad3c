"""``facetag tag``: name the faces in a photo library with the people of a gallery.

    photo paths -> plan: which photos a manifest already has (same bytes, models, gallery)
      -> decode in workers (inference.pipeline) -> detector: boxes (K, 5), loaded pixels
      -> align.photo_crops -> FaceBatcher: one embedding batch across photos (N, D)
      -> match.assign per photo: nearest enrolled person by cosine distance, jointly, so
         that one person names at most one face of a photo
      -> outputs.TagOutputs: sidecar, annotated copy, then the photo's manifest record
    -> the CSV and the JSON document of the whole run; with --expected, its score

A killed run loses nothing: rerunning skips every photo with a record. Memory stays flat:
waiting photos keep only their crops (and, with --annotate, at most ANNOTATE_PENDING
images), and nothing else of a photo outlives its record.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from facetag.data.images import Photo, Scan, photo_key, scan_photos, scan_problems
from facetag.errors import DataError
from facetag.inference.align import (
    DEFAULT_MARGIN,
    face_json,
    find_faces,
    photo_crops,
)
from facetag.inference.gallery import load_gallery
from facetag.inference.manifest import Manifest
from facetag.inference.match import assign, exclude_rejected, person_distances
from facetag.inference.models import Models
from facetag.inference.outputs import (
    TagOutputs,
    XmpOptions,
    check_writable,
    manifest_path,
    register_manifest,
)
from facetag.inference.pipeline import FaceBatcher, Failed, Skipped, iter_photos, worker_count
from facetag.inference.xmp import SidecarName
from facetag.metrics.names import Score, read_expected, score_tags
from facetag.progress import Meter, ProgressFn

ANNOTATE_PENDING = 8  # photos whose pixels are kept for drawing while their batch fills

MessageFn = Callable[[str], None]


@dataclass(frozen=True)
class TagOptions:
    recursive: bool = False  # look into sub-folders of folder arguments
    batch_size: int = 64  # faces per embedding batch (across photos)
    workers: int = 0  # decoding processes; 0 decodes in this process
    margin: float = DEFAULT_MARGIN  # see facetag.inference.align
    csv: Path | None = None  # write the CSV here
    xmp: bool = False  # write/merge XMP sidecars beside the photos
    xmp_unknown: bool = False  # with xmp: unknown faces as regions without a name
    sidecar_name: SidecarName = SidecarName.ext  # with xmp: photo.jpg.xmp or photo.xmp
    annotate: Path | None = None  # write annotated copies into this folder
    manifest: Path | None = None  # default: see outputs.manifest_path
    resume: bool = True  # False: no manifest at all (benchmarks)
    expected: Path | None = None  # expected.csv: score the run's names against it


@dataclass
class TagRun:
    doc: dict[str, Any]  # the JSON document
    failed: int  # problems reported (photos or outputs)
    tagged: int  # photos processed this time
    resumed: int  # photos taken from the manifest
    manifest: Path | None = None
    score: Score | None = None  # with TagOptions.expected
    not_read: str = ""  # what the scan left out on purpose: data.images.Scan.summary()


@dataclass
class _Job:
    """A planned run: the photos, the gallery matrix, the manifest and what it resumes."""

    photos: list[Path]
    abs_of: dict[Path, str]  # photo -> absolute path (the manifest's key)
    done: dict[str, str]  # absolute path -> sha256 of a finished record
    key: dict[str, Any]  # what a record must match to be reused
    names: list[str]
    G: Tensor  # (M, D) gallery embeddings
    labels: Tensor  # (M,) person of each row
    rejected: tuple[Tensor, Tensor]  # (R, D) faces users said are not person (R,); -1: gone
    manifest: Manifest | None
    outputs: TagOutputs
    gallery_photos: int
    scan: Scan
    errors: list[dict[str, str]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # absolute path -> JSON


@dataclass
class _Waiting:
    """A decoded photo whose faces wait in the embedding batch."""

    photo: Photo
    faces: list[list[float]]
    image: Image.Image | None  # kept only for --annotate


def _plan(
    paths: Sequence[Path], gallery_path: Path, models: Models, opts: TagOptions, say: MessageFn
) -> _Job:
    """Check the gallery and every output place, open the manifest, find finished photos."""
    emb, det = models.embedder, models.detector
    gallery = load_gallery(gallery_path, expect_model=emb.version, expect_dim=emb.net.embedding_dim)
    names = gallery.names()
    if not names:
        raise DataError(
            f"{gallery_path}: expected enrolled people, got none; run facetag "
            f"enroll PEOPLE_DIR --gallery {gallery_path}"
        )
    errors: list[dict[str, str]] = []

    def problem(path: Path, message: str) -> None:
        errors.append({"path": str(path), "error": message})
        say(message)

    # Our own output folder is never scanned: its copies are not photos to tag again.
    exclude = [opts.annotate] if opts.annotate is not None else []
    scan = scan_photos(paths, opts.recursive, exclude=exclude)
    photos = scan_problems(scan, paths, problem)
    root = Path(os.path.commonpath([os.path.realpath(p.parent) for p in photos]))
    TagOutputs.check(opts.csv, opts.annotate, root, photos=photos, gallery=gallery_path)
    key = {
        "detector": det.name,
        "embedder": emb.version,
        "threshold": models.threshold,
        "gallery": gallery.fingerprint(),
        "margin": opts.margin,
        "image_size": list(emb.image_size),
    }
    manifest = None
    if opts.resume:
        where = manifest_path(opts.manifest, opts.csv, opts.annotate, root, gallery_path)
        TagOutputs.check_manifest(where, opts.csv, photos, gallery_path)
        check_writable(where.parent, "the manifest")
        manifest = Manifest.open(where)
        register_manifest(gallery_path, where)
    abs_of = {p: photo_key(p) for p in photos}
    wanted = {"xmp": opts.xmp, "annotated": opts.annotate is not None}
    xmp = XmpOptions(opts.xmp_unknown, opts.sidecar_name) if opts.xmp else None
    done = {}
    if manifest is not None:
        for a in abs_of.values():
            rec = manifest.records.get(a)
            if rec is None or not manifest.is_done(a, rec["sha256"], key, wanted):
                continue
            # Sidecars written with other options (or by facetag before they were
            # recorded, in the displayed frame) are written again.
            if xmp is None or rec.get("xmp_options") == xmp.to_json():
                done[a] = rec["sha256"]
    outputs = TagOutputs(
        root=root,
        csv=opts.csv,
        xmp=xmp,
        annotate_dir=opts.annotate,
        manifest=manifest,
        problem=problem,
        message=say,
    )
    G, labels = gallery.matrix()  # (M, D), (M,)
    return _Job(
        photos,
        abs_of,
        done,
        key,
        names,
        G,
        labels,
        gallery.rejection_matrix(),
        manifest,
        outputs,
        gallery.photos(),
        scan,
        errors,
    )


def _named(job: _Job, w: _Waiting, vectors: Tensor, threshold: float) -> dict[str, Any]:
    """One photo's JSON result: each face's box, score, name, distance and confidence."""
    photo = w.photo
    matches = []
    if w.faces:
        distances = person_distances(vectors, job.G, job.labels, len(job.names))  # (K, P)
        distances = exclude_rejected(distances, vectors, *job.rejected, threshold / 2)
        matches = assign(distances, threshold)
    faces = []
    for f, m in zip(w.faces, matches, strict=True):
        face = face_json(f, photo.scale)
        face["name"] = job.names[m.person] if m.person is not None else None
        face["distance"] = round(m.distance, 4)
        face["confidence"] = round(m.confidence, 4)
        faces.append(face)
    return {"path": str(photo.path), "width": photo.width, "height": photo.height, "faces": faces}


def tag_photos(
    paths: Sequence[Path],
    gallery_path: Path,
    models: Models,
    options: TagOptions | None = None,
    *,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
    on_photo: Callable[[dict[str, Any]], None] | None = None,
) -> TagRun:
    """Tag every photo of ``paths`` (files or folders) with the people of the gallery.

    ``on_photo`` gets each photo's JSON result as soon as it is finished or taken from the
    manifest (``{"path", "error"}`` for a photo that could not be read): ``tag --jsonl``.

    Problems with single photos or their outputs are passed to on_message (one line
    each) and the run goes on; so are notes that are not failures (they start with
    facetag.inference.xmp.NOTE: a name kept in a sidecar where facetag found another).
    Problems with the whole run (gallery, output folders, manifest, --expected) raise
    FacetagError before any photo is touched.
    """
    opts = options or TagOptions()
    say = on_message or (lambda _: None)
    emit = on_photo or (lambda _: None)
    expected = read_expected(opts.expected) if opts.expected is not None else None
    job = _plan(paths, gallery_path, models, opts, say)
    if expected is not None and opts.expected is not None:
        _check_expected(opts.expected, expected, job.photos)
    workers, capped = worker_count(opts.workers)
    if capped:
        say(capped)
    emb, det = models.embedder, models.detector
    meter = Meter("photos", len(job.photos), progress, "photos/s")
    most = ANNOTATE_PENDING if opts.annotate is not None else opts.batch_size
    batcher: FaceBatcher[_Waiting] = FaceBatcher(
        emb.net, job.G.shape[1], models.device, opts.batch_size, most
    )
    counts = {"tagged": 0, "resumed": 0}

    def finished(done: list[tuple[_Waiting, Tensor]]) -> None:
        for w, vectors in done:
            a = job.abs_of[w.photo.path]
            result = _named(job, w, vectors, models.threshold)
            record = {"path": a, "sha256": w.photo.sha256, "key": job.key, "result": result}
            job.outputs.photo(a, record, w.image, w.photo.scale)
            job.results[a] = result
            counts["tagged"] += 1
            meter.step()
            emit(result)

    try:
        for item in iter_photos(job.photos, det.settings.max_side, workers, job.done):
            if isinstance(item, Failed):
                job.outputs.problem(item.path, item.error)
                meter.step()
                emit({"path": str(item.path), "error": item.error})
            elif isinstance(item, Skipped):
                assert job.manifest is not None
                a = job.abs_of[item.path]
                job.results[a] = {**job.manifest.records[a]["result"], "path": str(item.path)}
                counts["resumed"] += 1
                meter.step(worked=False)
                emit(job.results[a])
            else:
                faces = find_faces(det, item)
                crops = photo_crops(det, item, faces, emb, opts.margin)
                image = item.image() if opts.annotate is not None else None
                item.pixels = torch.zeros(0, dtype=torch.uint8)  # only the crops are kept
                finished(batcher.add(_Waiting(item, faces, image), crops))
        finished(batcher.flush())
    finally:
        if job.manifest is not None:
            job.manifest.close()
    return _finish(job, gallery_path, models, counts, expected)


def _check_expected(path: Path, expected: dict[str, list[str]], photos: list[Path]) -> None:
    """Every photo of --expected must be one this run tags (a wrong folder or a typo would
    otherwise score as precision 1.0, recall 0.0)."""
    tagged = {str(p.resolve()) for p in photos}
    missing = [k for k in expected if k not in tagged]
    if missing:
        raise DataError(
            f"{path}: expected paths of the photos being tagged, got {len(missing)} of "
            f"{len(expected)} that match none (first: {missing[0]}); paths are relative to "
            "the CSV's folder: check them and the photos passed"
        )


def _finish(
    job: _Job,
    gallery_path: Path,
    models: Models,
    counts: dict[str, int],
    expected: dict[str, list[str]] | None,
) -> TagRun:
    images = [job.results[job.abs_of[p]] for p in job.photos if job.abs_of[p] in job.results]
    doc: dict[str, Any] = {
        "device": models.device,
        "model": models.info(),
        "gallery": {
            "path": str(gallery_path),
            "people": len(job.names),
            "photos": int(job.labels.numel()),
        },
        "images": images,
    }
    if job.errors:
        doc["errors"] = job.errors
    if job.scan.unread or job.scan.hidden:
        doc["not_read"] = job.scan.counts()
    job.outputs.finish(images)
    if job.manifest is not None:
        job.manifest.compact()
    score = score_tags(images, expected) if expected is not None else None
    if score is not None:
        doc["score"] = score.to_json()
    manifest = job.manifest.path if job.manifest is not None else None
    return TagRun(
        doc,
        len(job.errors),
        counts["tagged"],
        counts["resumed"],
        manifest,
        score,
        job.scan.summary(),
    )
