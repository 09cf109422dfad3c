"""``facetag cluster``: the faces no enrolled person matched, grouped so that a person is
named once (``facetag name CLUSTER_ID NAME``).

    photos -> every face embedded (facetag.inference.embed) -> matched against the gallery
    (the faces an enrolled person takes leave) -> the unknown faces:
      a face already in a cluster (same photo bytes, same box) keeps its cluster;
      a new face within ``distance`` of a cluster, on average over its members, joins the
      nearest such cluster (incrementally, as Immich does); the rest are grouped by
      scikit-learn's average-linkage agglomerative clustering at ``distance`` (cosine)
      and get new ids
    -> the clusters, stored in the gallery with stable ids (c1, c2, ...): re-running on a
       grown library keeps every old id and adds new ones

Average linkage rather than DBSCAN's single linkage: two people are only merged when
their faces are close on average, not through one chain of look-alikes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from facetag.atomic import atomic_write
from facetag.errors import DataError
from facetag.inference.align import DEFAULT_MARGIN
from facetag.inference.embed import embed_photos
from facetag.inference.gallery import ClusterFace, Gallery, load_gallery, save_gallery
from facetag.inference.match import assign, exclude_rejected, person_distances
from facetag.inference.models import Models
from facetag.progress import ProgressFn

MessageFn = Callable[[str], None]
THUMB = 96  # px, a face in a contact sheet


@dataclass
class ClusterRun:
    doc: dict[str, Any]  # per photo, each face with "name" and "cluster"
    failed: int
    clusters: int  # in the gallery after this run
    new_clusters: int
    unknown_faces: int


def _next_id(clusters: dict[str, list[ClusterFace]]) -> int:
    numbers = [int(c[1:]) for c in clusters if c[1:].isdigit()]
    return max(numbers, default=0) + 1


def group(
    vectors: np.ndarray, clusters: dict[str, list[ClusterFace]], distance: float
) -> list[str | None]:
    """The cluster of each new unknown face (N, D) (unit vectors): the existing cluster
    whose members are nearest on average, within ``distance``, else a new cluster from
    agglomerative grouping.

    The average cosine distance from v to a cluster's members m_1..m_k is
    mean_j (1 - v . m_j) = 1 - v . mean_j m_j: the average-linkage distance between v and
    the cluster, which is how the clusters were grouped in the first place. (The nearest
    single member instead, single linkage, chained people together as the library grew.)
    """
    from sklearn.cluster import AgglomerativeClustering

    N = vectors.shape[0]
    out: list[str | None] = [None] * N
    ids = [cid for cid, fs in clusters.items() if fs]
    if ids:
        means = np.stack(
            [np.mean([f.embedding.numpy() for f in clusters[c]], axis=0) for c in ids]
        )  # (K, D), not unit: the mean of the members
        d = 1.0 - vectors @ means.T  # (N, K): average distance to each cluster's members
        for i in range(N):
            j = int(d[i].argmin())
            if d[i, j] < distance:
                out[i] = ids[j]
    rest = [i for i in range(N) if out[i] is None]
    if len(rest) == 1:
        labels = np.zeros(1, dtype=int)
    elif rest:
        model = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=distance
        )
        labels = model.fit_predict(vectors[rest])
    else:
        labels = np.zeros(0, dtype=int)
    first = _next_id(clusters)
    # New ids in the order their first face appears: the same library, the same ids.
    order: dict[int, str] = {}
    for i, lab in zip(rest, labels.tolist(), strict=True):
        if lab not in order:
            order[lab] = f"c{first + len(order)}"
        out[i] = order[lab]
    return out


def cluster_photos(
    paths: Sequence[Path],
    gallery_path: Path,
    models: Models,
    *,
    distance: float | None = None,
    recursive: bool = False,
    annotate: Path | None = None,
    workers: int = 0,
    margin: float = DEFAULT_MARGIN,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
) -> ClusterRun:
    """Group the unknown faces of ``paths`` into the gallery's clusters (module doc); a
    gallery that does not exist yet is made (an empty one: everyone is unknown)."""
    emb = models.embedder
    if gallery_path.exists():
        gallery = load_gallery(gallery_path, expect_model=emb.version)
    else:
        gallery = Gallery(model=emb.version, detector=models.detector.name)
    t = models.threshold if distance is None else distance
    doc, failed = embed_photos(
        paths,
        models,
        recursive=recursive,
        workers=workers,
        margin=margin,
        on_message=on_message,
        progress=progress,
    )
    unknown = _name_known(doc, gallery, models.threshold)
    known_key = {f.key(): cid for cid, fs in gallery.clusters.items() for f in fs}
    fresh = [(im, face) for im, face in unknown if _key(im, face) not in known_key]
    before = set(gallery.clusters)
    if fresh:
        V = np.array([face["embedding"] for _, face in fresh], np.float32)
        V /= np.linalg.norm(V, axis=1, keepdims=True)
        for (im, face), cid in zip(fresh, group(V, gallery.clusters, t), strict=True):
            assert cid is not None
            gallery.clusters.setdefault(cid, []).append(
                ClusterFace(
                    str(Path(im["path"]).resolve()),
                    im["sha256"],
                    face["box"],
                    torch.tensor(face["embedding"]),
                    face.get("landmarks"),
                )
            )
    cluster_of = {f.key(): cid for cid, fs in gallery.clusters.items() for f in fs}
    for im, face in unknown:
        face["cluster"] = cluster_of.get(_key(im, face))
    for im in doc["images"]:
        for face in im["faces"]:
            face.pop("embedding", None)
            face.setdefault("cluster", None)
    gallery.history.append(
        {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "action": "cluster",
            "photos": str(len(doc["images"])),
        }
    )
    save_gallery(gallery_path, gallery)
    if annotate is not None:
        write_contact_sheets(annotate, gallery, on_message)
    new = len(set(gallery.clusters) - before)
    return ClusterRun(doc, failed, len(gallery.clusters), new, len(unknown))


def _key(im: dict[str, Any], face: dict[str, Any]) -> tuple[str, tuple[float, ...]]:
    return im["sha256"], tuple(round(v) for v in face["box"])


def _name_known(
    doc: dict[str, Any], gallery: Gallery, threshold: float
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Give each face the enrolled person it matches ("name"); the unknown ones back."""
    names = gallery.names()
    G, labels = gallery.matrix()
    rejected = gallery.rejection_matrix()
    unknown = []
    for im in doc["images"]:
        faces = im["faces"]
        if not faces:
            continue
        if names:
            V = torch.tensor([f["embedding"] for f in faces])
            d = person_distances(V, G, labels, len(names))
            d = exclude_rejected(d, V, *rejected, threshold / 2)
            persons = [m.person for m in assign(d, threshold)]
        else:
            persons = [None] * len(faces)
        for f, p in zip(faces, persons, strict=True):
            f["name"] = names[p] if p is not None else None
            if f["name"] is None:
                unknown.append((im, f))
    return unknown


def write_contact_sheets(folder: Path, gallery: Gallery, on_message: MessageFn | None) -> None:
    """One image per cluster, <folder>/<id>.jpg: its faces side by side (at most 48)."""
    folder.mkdir(parents=True, exist_ok=True)
    for cid, faces in gallery.clusters.items():
        shown = faces[:48]
        cols = min(8, len(shown))
        rows = (len(shown) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * THUMB, rows * THUMB + 20), (30, 30, 30))
        ImageDraw.Draw(sheet).text(
            (4, rows * THUMB + 4), f"{cid}: {len(faces)} faces", fill="white"
        )
        for k, f in enumerate(shown):
            try:
                with Image.open(f.path) as img:
                    thumb = img.convert("RGB").crop(tuple(round(v) for v in f.box))
            except (OSError, ValueError) as e:
                if on_message is not None:
                    on_message(f"{f.path}: expected the photo of a face in {cid}, got {e}")
                continue
            thumb.thumbnail((THUMB, THUMB))
            sheet.paste(thumb, ((k % cols) * THUMB, (k // cols) * THUMB))
        from io import BytesIO

        buf = BytesIO()
        sheet.save(buf, format="JPEG", quality=85)
        atomic_write(folder / f"{cid}.jpg", buf.getvalue())


def name_cluster(gallery_path: Path, cluster: str, name: str) -> dict[str, Any]:
    """``facetag name``: the faces of ``cluster`` become enrolled photos of ``name``."""
    from facetag.inference.gallery import GalleryEntry
    from facetag.inference.learn import UNSAFE, _who

    gallery = load_gallery(gallery_path)
    if cluster not in gallery.clusters:
        known = ", ".join(sorted(gallery.clusters, key=lambda c: int(c[1:]))) or "none"
        raise DataError(
            f"{gallery_path}: expected a cluster id, got {cluster!r}; clusters: {known}"
        )
    if not name.strip() or set(name) & UNSAFE or name.strip() != name:
        raise DataError(f"{name!r}: expected a person's name without /\\:*?\"<>| or edge spaces")
    stamp = {
        "who": _who(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "from": f"cluster {cluster}",
    }
    faces = gallery.clusters.pop(cluster)
    people = gallery.people.setdefault(name, [])
    for f in faces:
        people.append(
            GalleryEntry(
                f.path, f.sha256, f.box, 1.0, 1, f.embedding, "cluster", f.landmarks, dict(stamp)
            )
        )
    gallery.history.append({**stamp, "action": "name", "person": name, "faces": str(len(faces))})
    save_gallery(gallery_path, gallery)
    return {
        "gallery": str(gallery_path),
        "cluster": cluster,
        "person": name,
        "faces": len(faces),
        "photos": len(people),
    }
