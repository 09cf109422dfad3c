"""Landmark teachers: pseudo-labels for the detector's ONet, at training time only.

We have hand-labelled landmarks for 43 faces (dlib_faces, the test set), so the five
training landmarks of every face of 40 px and more come from two teachers with licences
that allow it, combined where each is best (measured on dlib_faces: REPORT in
experiments/LOG.md):

- MTCNN (facenet-pytorch 2.6.0's weights, MIT): boxes and all five points; its eye
  centres are 0.061 of the outer-eye distance off, nose and mouth 0.077-0.084;
- dlib's 5-point shape predictor (face_recognition_models, public domain): two corners
  per eye, whose midpoints are eye centres 0.025 off; it has no mouth and its nose point
  is the nose base, not the tip, so nose and mouth stay MTCNN's.

A face keeps its label only when the two teachers agree on where the eyes are (within
``AGREE`` of the eye distance): a face where they disagree is one neither sees well.

Neither package is needed to detect or tag: ``facetag data landmarks`` imports them, and
a missing one is a one-line error with the pip command.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facetag.atomic import atomic_write
from facetag.data.boxes import iou_matrix, read_boxes, resolve_image
from facetag.data.folders import held_out
from facetag.data.images import decode_photo, is_image_file
from facetag.errors import DataError, ModelError
from facetag.progress import Meter, ProgressFn

LANDMARKS_FORMAT = "facetag-landmarks/1"
MIN_FACE = 40.0  # px high: smaller faces are not labelled
AGREE = 0.2  # largest eye disagreement between the teachers, in units of the eye distance
MATCH_IOU = 0.4  # a teacher box and a WIDER box of the same face overlap at least this much
# dlib's 5-point predictor was trained on dlib's own detector boxes; an MTCNN box maps to
# such a box as (centre offset, side) / MTCNN width (fitted on lfw A-M and johns faces,
# median of dlib HOG rect vs MTCNN box: centre + (0.025, -0.059) * w, w = box w / 0.883).
DLIB_RECT = {"kx": 0.025, "ky": -0.059, "kw": 0.883}
MTCNN_PIP = "pip install --no-deps facenet-pytorch==2.6.0 tqdm"
DLIB_PIP = "pip install dlib-bin face_recognition_models"


def teacher_files() -> list[dict[str, str]]:
    """The teachers' weight files as installed (package, file, sha256, licence), for the
    landmarks file and the detector trained on it; [] where a teacher is not installed."""
    import hashlib

    out = []
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is not None and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        for name in ("pnet.pt", "rnet.pt", "onet.pt"):
            if (data / name).is_file():
                out.append(
                    {
                        "package": "facenet-pytorch 2.6.0 (PyPI)",
                        "file": f"facenet_pytorch/data/{name}",
                        "sha256": hashlib.sha256((data / name).read_bytes()).hexdigest(),
                        "licence": "MIT",
                    }
                )
    if importlib.util.find_spec("face_recognition_models") is not None:
        from facetag.models.dlib_import import packaged_dlib_model

        sp5 = packaged_dlib_model().parent / "shape_predictor_5_face_landmarks.dat"
        if sp5.is_file():
            out.append(
                {
                    "package": "face_recognition_models 0.3.0 (PyPI)",
                    "file": f"face_recognition_models/models/{sp5.name}",
                    "sha256": hashlib.sha256(sp5.read_bytes()).hexdigest(),
                    "licence": "CC0 1.0 (public domain, Davis King)",
                }
            )
    return out


def landmark_provenance(path: Path) -> dict[str, Any]:
    """What a detector trained on the landmarks file ``path`` records of its teachers:
    the file's own record, else the teachers installed now."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    return {
        "landmark_labels": "pseudo-labels by teachers at training time (facetag data landmarks)",
        "teachers": doc.get("teachers", {}),
        "teacher_files": doc.get("teacher_files") or teacher_files(),
    }


def _need(module: str, pip: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"{module}: expected the landmark teacher installed, got none; {pip}")


@dataclass
class Teachers:
    """MTCNN (facenet-pytorch) and dlib's 5-point predictor, loaded once."""

    mtcnn: Any
    predictor: Any
    dlib: Any

    @classmethod
    def load(cls) -> Teachers:
        _need("facenet_pytorch", MTCNN_PIP)
        _need("tqdm", MTCNN_PIP)
        _need("dlib", DLIB_PIP)
        from facetag.models.dlib_import import packaged_dlib_model

        sp5 = packaged_dlib_model().parent / "shape_predictor_5_face_landmarks.dat"
        import dlib
        from facenet_pytorch import MTCNN

        mtcnn = MTCNN(keep_all=True, min_face_size=20, thresholds=[0.6, 0.7, 0.7], device="cpu")
        return cls(mtcnn, dlib.shape_predictor(str(sp5)), dlib)

    def faces(self, rgb: np.ndarray, pad: float = 0.0) -> list[dict[str, Any]]:
        """Every face MTCNN finds in an RGB uint8 photo (H, W, 3), with eyes from dlib:
        [{"box": [x1, y1, x2, y2], "score", "landmarks": [[x, y] x 5]}], agreeing ones only.

        ``pad``: the photo is first extended by pad * its longer side of repeated edge
        pixels. NOTE: a face cut by the border (a tight crop: johns, glint) makes MTCNN
        put eyes on the brows and the mouth on the cheeks (its crops are zero-filled
        outside the photo); with 30% edge padding 113 of 115 such crops agree with dlib
        (median eye disagreement 0.05 of the eye distance), without it 63.
        """
        from PIL import Image

        b = round(pad * max(rgb.shape[:2]))
        big = np.pad(rgb, ((b, b), (b, b), (0, 0)), mode="edge") if b else rgb
        boxes, probs, marks = self.mtcnn.detect(Image.fromarray(big), landmarks=True)
        out: list[dict[str, Any]] = []
        if boxes is None:
            return out
        for box, p, lm in zip(boxes, probs, marks, strict=True):
            box = np.asarray(box, np.float64)
            merged = merge_teachers(np.asarray(lm, np.float64), self._dlib_eyes(big, box))
            if merged is None:
                continue
            out.append(
                {
                    "box": (box - b).round(2).tolist(),
                    "score": round(float(p), 5),
                    "landmarks": (merged - b).round(2).tolist(),
                }
            )
        return out

    def _dlib_eyes(self, rgb: np.ndarray, box: Sequence[float] | np.ndarray) -> np.ndarray:
        """(2, 2): image-left and image-right eye centres from dlib's corner points."""
        x1, y1, x2, y2 = (float(v) for v in box)
        w = (x2 - x1) / DLIB_RECT["kw"]
        cx = (x1 + x2) / 2 - DLIB_RECT["kx"] * w  # the dlib rect's centre and side w
        cy = (y1 + y2) / 2 - DLIB_RECT["ky"] * w
        rect = self.dlib.rectangle(
            round(cx - (w - 1) / 2),
            round(cy - (w - 1) / 2),
            round(cx + (w - 1) / 2),
            round(cy + (w - 1) / 2),
        )
        shape = self.predictor(rgb, rect)
        p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(4)], np.float64)
        a, b = p[:2].mean(axis=0), p[2:4].mean(axis=0)  # the two eyes, in dlib's order
        return np.stack([a, b] if a[0] < b[0] else [b, a])


def merge_teachers(mtcnn: np.ndarray, dlib_eyes: np.ndarray) -> np.ndarray | None:
    """MTCNN's five points (5, 2) with dlib's eye centres (2, 2) in place of its own, or
    None when the two disagree on an eye by more than AGREE of the eye distance."""
    iod = float(np.linalg.norm(mtcnn[1] - mtcnn[0]))
    if iod <= 0 or np.linalg.norm(dlib_eyes - mtcnn[:2], axis=1).max() > AGREE * iod:
        return None
    out: np.ndarray = mtcnn.copy()
    out[:2] = dlib_eyes
    return out


@dataclass
class LandmarkReport:
    out: Path
    photos: int = 0
    faces: int = 0  # labelled
    per_set: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # teachers disagreed, or no teacher face matched a box


def _wider_faces(
    teachers: Teachers, root: Path, box_file: Path, images: Path, meter: Meter
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """{image name: [labelled face with "index" into the box file's faces]} for the WIDER
    photos: each box of MIN_FACE px and more gets the teacher face that overlaps it most."""
    boxes = read_boxes(box_file)
    out: dict[str, list[dict[str, Any]]] = {}
    dropped = 0
    for name, truth in boxes.items():
        meter.step()
        wanted = [i for i, f in enumerate(truth) if not f.invalid and f.h >= MIN_FACE]
        path = resolve_image(images, name)
        if not wanted or not path.is_file():
            continue
        photo = decode_photo(path)
        found = teachers.faces(photo.pixels.numpy(), pad=0.1)
        if not found:
            dropped += len(wanted)
            continue
        iou = iou_matrix(
            np.array([truth[i].xyxy for i in wanted]), np.array([f["box"] for f in found])
        )  # (G, T)
        faces = []
        for g, i in enumerate(wanted):
            t = int(iou[g].argmax())
            if iou[g, t] < MATCH_IOU:
                dropped += 1
                continue
            faces.append({**found[t], "index": i})
        if faces:
            out[str(path.relative_to(root))] = faces
    return out, dropped


def _folder_faces(
    teachers: Teachers, root: Path, folder: Path, meter: Meter
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """{image: [its face]} for a person-folder set (one person a photo: the face nearest
    the centre of those MIN_FACE px and more)."""
    out: dict[str, list[dict[str, Any]]] = {}
    dropped = 0
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        if held_out(folder, person.name):
            continue  # LFW N-Z: the verification set, never labelled nor trained on
        for path in sorted(p for p in person.iterdir() if is_image_file(p)):
            meter.step()
            try:
                photo = decode_photo(path)
            except DataError:
                continue
            H, W = photo.pixels.shape[:2]
            found = [
                f
                for f in teachers.faces(photo.pixels.numpy(), pad=0.3)
                if f["box"][3] - f["box"][1] >= MIN_FACE
            ]
            if not found:
                dropped += 1
                continue
            face = min(
                found,
                key=lambda f: (
                    (f["box"][0] + f["box"][2] - W) ** 2 + (f["box"][1] + f["box"][3] - H) ** 2
                ),
            )
            out[str(path.relative_to(root))] = [face]
    return out, dropped


def label_landmarks(
    root: Path,
    out: Path,
    *,
    sets: Sequence[str] = ("wider_train", "lfw", "celeba", "glint_celebs", "johns"),
    progress: ProgressFn | None = None,
) -> LandmarkReport:
    """``facetag data landmarks``: write the teachers' five landmarks of every face of
    MIN_FACE px and more in ``sets`` (folders of ``root``) to ``out`` (JSON, atomically).

    Deterministic: the teachers run in eval mode on the photos in sorted order.
    """
    teachers = Teachers.load()
    folders = {s: root / s for s in sets}
    missing = [str(p) for p in folders.values() if not p.is_dir()]
    if missing:
        raise DataError(f"{missing[0]}: expected a face data folder, got none; check the path")
    total = 0
    for s, p in folders.items():
        total += (
            len(read_boxes(p / "wider_face_train_bbx_gt.txt"))
            if s == "wider_train"
            else sum(
                1 for f in p.glob("*/*") if is_image_file(f) and not held_out(p, f.parent.name)
            )
        )
    meter = Meter("landmarks", total, progress, "photos/s")
    report = LandmarkReport(out)
    images: dict[str, list[dict[str, Any]]] = {}
    for s, p in folders.items():
        if s == "wider_train":
            got, dropped = _wider_faces(
                teachers, root, p / "wider_face_train_bbx_gt.txt", p / "images", meter
            )
        else:
            got, dropped = _folder_faces(teachers, root, p, meter)
        images.update(got)
        report.per_set[s] = sum(len(v) for v in got.values())
        report.dropped += dropped
    report.photos = len(images)
    report.faces = sum(report.per_set.values())
    doc = {
        "format": LANDMARKS_FORMAT,
        "order": ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"],
        "teachers": {
            "mtcnn": "facenet-pytorch 2.6.0 MTCNN (MIT): boxes, nose tip, mouth corners",
            "dlib": "dlib shape_predictor_5_face_landmarks (public domain): eye centres",
        },
        "teacher_files": teacher_files(),
        "min_face": MIN_FACE,
        "images": images,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(doc, indent=0).encode())
    return report
