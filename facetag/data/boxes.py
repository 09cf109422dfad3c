"""Face box files: the WIDER FACE text format and CSV, read into one shape.

Two layouts are read (boxes are ``x, y, w, h`` in pixels, top-left origin, in the image as
stored):

- WIDER FACE ``wider_face_train_bbx_gt.txt``: an image path, the number of faces, then one
  line per face ``x y w h blur expression illumination invalid occlusion pose`` (an image
  with no face has count 0 and one line of zeros);
- CSV with a header naming at least ``image, x, y, w, h``; optional columns ``invalid``
  (1 = an ignored region when scoring) and ``split`` (kept as given). Both
  ``wider_train/boxes.csv`` and ``dlib_faces/boxes.csv`` have this shape.

    boxes = read_boxes(Path("wider_train/wider_face_train_bbx_gt.txt"))
    boxes["1--Handshaking/1_Handshaking_Handshaking_1_105.jpg"][0].xyxy  # (178, 112, 236, 242)
    train, val = split_images(list(boxes), val_fraction=0.15, seed=0)
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetag.errors import DataError

BoxFile = dict[str, list["FaceBox"]]  # image path (relative, as in the file) -> its faces

_CSV_REQUIRED = ("image", "x", "y", "w", "h")


@dataclass(frozen=True)
class FaceBox:
    """One labelled face: ``x, y, w, h`` in pixels; ``invalid`` faces are ignored regions."""

    x: float
    y: float
    w: float
    h: float
    invalid: bool = False
    # Five landmarks x0 y0 ... x4 y4 (facetag.models.detector.LANDMARKS order), in the same
    # pixels as the box, when a teacher labelled them (facetag data landmarks).
    landmarks: tuple[float, ...] | None = None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) corners."""
        return (self.x, self.y, self.x + self.w, self.y + self.h)


def read_boxes(path: Path | str) -> BoxFile:
    """Read a WIDER-format text file or a CSV (chosen by the ``.csv`` suffix).

    Returns {image path as written in the file: [FaceBox, ...]} in file order; images with
    no face map to an empty list. Raises DataError naming the file and line for anything
    malformed (a missing count, a short face line, a non-number, a negative size).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: no such box file; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{p}: expected a box file (WIDER .txt or .csv), got a folder") from None
    except UnicodeDecodeError:
        raise DataError(f"{p}: expected a text box file, got binary data") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read the box file ({e.strerror}); check it") from None
    boxes = _read_csv(p, text) if p.suffix.lower() == ".csv" else _read_wider(p, text)
    if not boxes:
        raise DataError(
            f"{p}: expected at least one image with its boxes, got none; is it the right file?"
        )
    return boxes


def _number(p: Path, line_no: int, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{p}:{line_no}: expected a number, got {text!r}; fix that line") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise DataError(f"{p}:{line_no}: expected a finite number, got {text!r}")
    return value


def _face(p: Path, line_no: int, x: str, y: str, w: str, h: str, invalid: bool) -> FaceBox:
    box = FaceBox(
        _number(p, line_no, x),
        _number(p, line_no, y),
        _number(p, line_no, w),
        _number(p, line_no, h),
        invalid,
    )
    if box.w < 0 or box.h < 0:
        raise DataError(f"{p}:{line_no}: expected a box width and height >= 0, got w={w}, h={h}")
    return box


def _read_wider(p: Path, text: str) -> BoxFile:
    boxes: BoxFile = {}
    for image, faces, _ in wider_records(p, text):
        boxes.setdefault(image, []).extend(faces)
    return boxes


def wider_records(p: Path, text: str) -> Iterator[tuple[str, list[FaceBox], str]]:
    """(image, its faces, its lines as written) for each record of a WIDER box file.

    The lines are kept so that a subset of the file can be written back unchanged
    (facetag data fetch wider). ``p`` names the file in errors.
    """
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines())]
    lines = [(n, line) for n, line in lines if line]
    i = 0
    while i < len(lines):
        n, image = lines[i]
        if i + 1 >= len(lines):
            raise DataError(f"{p}:{n}: expected a face count after image {image!r}, got the end")
        count_no, count_text = lines[i + 1]
        if not count_text.isdigit():
            raise DataError(
                f"{p}:{count_no}: expected the number of faces of {image!r}, got {count_text!r}; "
                "is this a WIDER FACE box file?"
            )
        count = int(count_text)
        faces: list[FaceBox] = []
        # An image without faces is written with count 0 and one line of zeros.
        rows = count
        if count == 0 and i + 2 < len(lines) and _all_numbers(lines[i + 2][1]):
            rows = 1
        for k in range(rows):
            if i + 2 + k >= len(lines):
                raise DataError(
                    f"{p}:{count_no}: expected {count} face lines for {image!r}, got {k}"
                )
            line_no, row = lines[i + 2 + k]
            fields = row.split()
            if len(fields) < 4:
                raise DataError(
                    f"{p}:{line_no}: expected 'x y w h [blur expression illumination invalid "
                    f"occlusion pose]', got {row!r}"
                )
            if count == 0:
                continue
            invalid = len(fields) >= 8 and fields[7] == "1"
            x, y, w, h = fields[:4]
            faces.append(_face(p, line_no, x, y, w, h, invalid))
        yield image, faces, "".join(line + "\n" for _, line in lines[i : i + 2 + rows])
        i += 2 + rows


def _all_numbers(row: str) -> bool:
    try:
        return all(float(f) == float(f) for f in row.split())
    except ValueError:
        return False


def _read_csv(p: Path, text: str) -> BoxFile:
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in _CSV_REQUIRED if c not in header]
    if missing:
        raise DataError(
            f"{p}: expected CSV columns {', '.join(_CSV_REQUIRED)} (optional invalid), got "
            f"{', '.join(header) or 'no header'}; missing {', '.join(missing)}"
        )
    reader.fieldnames = header
    boxes: BoxFile = {}
    for line_no, row in enumerate(reader, start=2):
        image = (row.get("image") or "").strip()
        if not image:
            raise DataError(f"{p}:{line_no}: expected an image path, got an empty one")
        values = [(row.get(c) or "").strip() for c in ("x", "y", "w", "h")]
        if all(v == "" for v in values):  # an image listed with no face
            boxes.setdefault(image, [])
            continue
        invalid = (row.get("invalid") or "0").strip() in ("1", "true", "True")
        x, y, w, h = values
        boxes.setdefault(image, []).append(_face(p, line_no, x, y, w, h, invalid))
    return boxes


def split_images(
    images: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split image names (not faces: all faces of a photo stay together) into train and val.

    The same names, fraction and seed give the same split; both lists keep sorted order.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"split_images: expected val_fraction in [0, 1), got {val_fraction}")
    names = sorted(set(images))
    shuffled = names[:]
    random.Random(seed).shuffle(shuffled)
    n_val = round(len(names) * val_fraction)
    val = set(shuffled[:n_val])
    return [n for n in names if n not in val], [n for n in names if n in val]


def resolve_image(root: Path, name: str) -> Path:
    """The file of image ``name`` under ``root`` (WIDER's ``images/`` folder is tried too)."""
    direct = root / name
    if direct.is_file():
        return direct
    nested = root / "images" / name
    return nested if nested.is_file() else direct


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (A, 4) and b (B, 4), both x1 y1 x2 y2 -> (A, B)."""
    if a.size == 0 or b.size == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)  # (A, B)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def read_landmarks_xml(path: Path | str) -> dict[str, list[tuple[FaceBox, np.ndarray]]]:
    """dlib's imglab XML with 68-point parts (dlib_faces/*_with_face_landmarks.xml) ->
    {image file: [(box, points (68, 2))]}; DataError (one line) when it is not one."""
    import xml.etree.ElementTree as ET

    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except (OSError, ET.ParseError) as e:
        raise DataError(
            f"{p}: expected dlib's XML of faces with 68 landmarks, got "
            f"{getattr(e, 'strerror', None) or type(e).__name__}; check the path"
        ) from None
    out: dict[str, list[tuple[FaceBox, np.ndarray]]] = {}
    for image in root.iter("image"):
        faces = []
        for box in image.iter("box"):
            parts = {int(part.get("name", "-1")): part for part in box.iter("part")}
            if len(parts) != 68:
                continue
            pts = np.array(
                [[float(parts[k].get("x", 0)), float(parts[k].get("y", 0))] for k in range(68)]
            )
            x, y, w, h = (float(box.get(k, 0)) for k in ("left", "top", "width", "height"))
            fb = FaceBox(x, y, w, h)
            faces.append((fb, pts))
        out[str(image.get("file"))] = faces
    if not any(out.values()):
        raise DataError(f"{p}: expected faces with 68 landmark parts, got none")
    return out
