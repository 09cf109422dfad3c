"""``facetag cluster``: the faces no enrolled person matched, grouped so that a person is
named once (``facetag name CLUSTER_ID NAME``).

    photos -> every face embedded (facetag.inference.embed) -> matched against the gallery
    (the faces an enrolled person takes leave) -> the unknown faces:
      a face already in a cluster (same photo bytes, same box) keeps its cluster;
      the new ones are grouped with the members of the clusters within reach by
      SciPy's average-linkage hierarchical clustering on shared-neighbour cosine
      distances, at 0.7 x the model's naming threshold (``group``): a new face grouped
      with a cluster joins it, a group of new faces alone gets a new id
    -> the clusters, stored in the gallery with stable ids (c1, c2, ...): re-running on a
       grown library keeps every old id and adds new ones

Average linkage rather than DBSCAN's single linkage: two people are only merged when
their faces are close on average, not through one chain of look-alikes. Shared
neighbours: photos of one person surround each other, two look-alikes do not. A lower
distance than naming's: naming compares a face with one person, grouping merges many
faces at once, and a cluster that mixes two people names the wrong one in every photo
it is named in. Chosen on LFW A-M (experiments/LOG.md): the scale with the best BCubed F
that leaves at most one mixed cluster.
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


SHARED_K = 5  # nearest neighbours compared (each face counts itself)
SHARED_WEIGHT = 0.5  # two faces with the same k neighbours are half as far apart
CLUSTER_SCALE = 0.7  # grouping distance = CLUSTER_SCALE x the model's naming threshold
_BLOCK_BYTES = 32 << 20  # rows of the (N, N) distances computed at a time


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero: far from everything, not NaN)."""
    v = np.asarray(v, np.float32)
    out: np.ndarray = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return out


def _row_blocks(N: int) -> list[tuple[int, int]]:
    rows = max(1, _BLOCK_BYTES // (4 * max(N, 1)))
    return [(i, min(N, i + rows)) for i in range(0, N, rows)]


def shared_neighbour_distances(X: np.ndarray) -> np.ndarray:
    """Cosine distances between unit vectors X (N, D), shrunk where two faces share their
    nearest neighbours, as scipy's condensed vector (N * (N - 1) / 2,): d'(i, j) for
    i < j, row by row (scipy.spatial.distance.squareform gives the (N, N) matrix):

        d'(i, j) = d(i, j) * (1 - w * |N_k(i) & N_k(j)| / |N_k(i) | N_k(j)|)

    N_k(i): the k faces nearest i (k = SHARED_K, w = SHARED_WEIGHT; i is normally one of
    them). Photos of one person surround each other and share neighbours, so they come
    closer; two look-alikes sit in different crowds of photos and keep their distance.
    (The shared-neighbourhood idea of rank-order face clustering, Otto et al. 2018, and
    of k-reciprocal re-ranking, Zhong et al. 2017.) d' <= d.

    Memory: the output (4 N^2 bytes) and blocks of rows of about _BLOCK_BYTES; the (N, N)
    matrix itself is never held (20,000 faces: 1.6 GB).
    """
    from scipy.sparse import csr_matrix

    N = X.shape[0]
    k = min(SHARED_K, N)
    nearest = np.empty((N, k), np.int64)
    for i0, i1 in _row_blocks(N):
        d = 1.0 - X[i0:i1] @ X.T  # (rows, N)
        nearest[i0:i1] = np.argpartition(d, k - 1, axis=1)[:, :k]
    A = csr_matrix((np.ones(N * k, np.float32), (np.repeat(np.arange(N), k), nearest.ravel())))
    out = np.empty(N * (N - 1) // 2, np.float64)
    pos = 0
    for i0, i1 in _row_blocks(N):
        d = np.clip(1.0 - X[i0:i1] @ X.T, 0.0, None)  # (rows, N)
        inter = (A[i0:i1] @ A.T).toarray()  # (rows, N): neighbours shared
        d *= 1.0 - SHARED_WEIGHT * inter / (2 * k - inter)
        for r in range(i1 - i0):
            n = N - (i0 + r) - 1
            out[pos : pos + n] = d[r, i0 + r + 1 :]
            pos += n
    return out


def group(
    vectors: np.ndarray, clusters: dict[str, list[ClusterFace]], distance: float
) -> list[str | None]:
    """The cluster of each new unknown face (N, D) (unit vectors).

    The new faces and the members of the existing clusters within reach (a member within
    distance / (1 - SHARED_WEIGHT) of some new face, the farthest a shared neighbourhood
    can bring two faces together) are grouped together by SciPy's average-linkage
    hierarchical clustering, cut at ``distance``, on shared-neighbour distances
    (shared_neighbour_distances). A new face whose group holds members of one existing
    cluster joins it; of several, the one nearest on average (mean_j (1 - v . m_j) =
    1 - v . mean_j m_j); of none, the group is a new cluster. Old faces never move and old
    clusters never merge: ids stay stable.

    Grouping old and new faces together, rather than first joining each new face to the
    nearest cluster and grouping only the rest, is close to what one run over the whole
    library would do: on LFW A-M (half the photos, then all of them, at 0.9 x the naming
    threshold, cosine distances) it made 7 mixed clusters where the greedy join made 9
    (experiments/LOG.md).
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    N = vectors.shape[0]
    vectors = _unit(vectors)
    members = [
        (c, _unit(np.stack([f.embedding.numpy() for f in fs]))) for c, fs in clusters.items() if fs
    ]
    old_ids: list[str] = []
    old = np.zeros((0, vectors.shape[1]), np.float32)
    if members and N:
        reach = 1.0 - distance / (1.0 - SHARED_WEIGHT)  # cosine similarity
        near = [(c, m) for c, m in members if (vectors @ m.T).max() > reach]
        old_ids = [c for c, m in near for _ in range(len(m))]
        if near:
            old = np.concatenate([m for _, m in near])
    X = np.concatenate([old, vectors])
    if len(X) >= 2:
        tree = linkage(shared_neighbour_distances(X), method="average")
        # Merged while the average distance is below ``distance``: fcluster keeps merges
        # at or below its t, so t is the float just under it.
        labels = fcluster(tree, np.nextafter(distance, 0.0), criterion="distance")
    else:
        labels = np.zeros(len(X), dtype=int)
    n_old = len(old_ids)
    olds_in: dict[int, set[str]] = {}
    for lab, cid in zip(labels[:n_old].tolist(), old_ids, strict=True):
        olds_in.setdefault(lab, set()).add(cid)
    means = {c: m.mean(axis=0) for c, m in members}  # (D,) each, not unit
    first = _next_id(clusters)
    order: dict[int, str] = {}  # new ids in the order their first face appears
    out: list[str | None] = []
    for v, lab in zip(vectors, labels[n_old:].tolist(), strict=True):
        olds = sorted(olds_in.get(lab, ()))
        if len(olds) == 1:
            out.append(olds[0])
        elif olds:
            out.append(min(olds, key=lambda c: 1.0 - float(v @ means[c])))
        else:
            if lab not in order:
                order[lab] = f"c{first + len(order)}"
            out.append(order[lab])
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
    t = models.threshold * CLUSTER_SCALE if distance is None else distance
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
        V = _unit(np.array([face["embedding"] for _, face in fresh], np.float32))
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
