"""Training crops for the colour embedder, cut the way tagging cuts faces.

At tag time a face reaches the embedder as: detector box -> face_square (side (1 + margin)
* the box's longer side, grey outside the photo) -> resize. Face datasets come cropped
in their own ways (LFW 250x250 with the face in the middle, Glint360K 112x112 ArcFace
alignment, CelebA whole photos), so training on them as they are teaches the network a
framing it never sees at tag time. ``cut_crops`` runs the same detector over every
photo and saves the same square crop tagging would embed:

    SRC/<person>/<photo>            (several sources; people with the same folder name
      -> detect (largest face,       in two sources are merged: lfw/Halle_Berry and
         like enrolment)             glint_celebs/Halle_Berry are one person)
      -> face_square(box, margin)
      -> OUT/<person>/<source>__<photo stem>.png   (size x size, RGB)

A tight crop (Glint's 112x112) can leave too little around the face for the detector's
proposal net; such photos are tried again with a grey border of ``pad`` * their longer
side. A photo with no face found even then is reported and left out. Person folders
named only with digits (CelebA's identity ids) are prefixed with their source's name,
since two sources' numeric ids are different people.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facetag.atomic import atomic_write
from facetag.data.folders import held_out
from facetag.data.images import decode_photo, is_image_file
from facetag.errors import DataError
from facetag.inference.align import (
    DEFAULT_MARGIN,
    FILL,
    FaceDetector,
    crop_face,
    face_chip,
    face_landmarks,
)
from facetag.progress import Meter, ProgressFn

MessageFn = Callable[[str], None]


@dataclass
class CropReport:
    """What cut_crops did: counts per source and the people merged across sources."""

    out: Path
    people: int = 0  # with at least one crop (and min_photos)
    written: int = 0
    kept: int = 0  # already in OUT from an earlier run with the same settings
    padded: int = 0  # found only after padding the photo with grey
    missed: list[str] = field(default_factory=list)  # photos without a face
    merged: dict[str, list[str]] = field(default_factory=dict)  # person -> sources
    per_source: dict[str, int] = field(default_factory=dict)  # crops per source
    too_few: list[str] = field(default_factory=list)  # people left out: < min_photos crops

    def summary(self) -> dict[str, object]:
        return {
            "out": str(self.out),
            "people": self.people,
            "crops": self.written + self.kept,
            "written": self.written,
            "kept": self.kept,
            "padded": self.padded,
            "no_face": len(self.missed),
            "merged": self.merged,
            "per_source": self.per_source,
            "too_few": self.too_few,
        }


def person_key(source: Path, folder: str) -> str:
    """The identity a person folder stands for: its name; digits-only ids get the source."""
    return f"{source.name}_{folder}" if folder.isdigit() else folder


def _people(sources: Sequence[Path]) -> dict[str, list[tuple[Path, Path]]]:
    """{person: [(source, photo)]} over all sources, sorted (a fixed order for a seed)."""
    people: dict[str, list[tuple[Path, Path]]] = {}
    for src in sources:
        if not src.is_dir():
            got = "a file" if src.exists() else "no such folder"
            raise DataError(
                f"{src}: expected a folder of person folders (SRC/<person>/*.jpg), got "
                f"{got}; check the path"
            )
        for child in sorted(src.iterdir(), key=lambda p: p.name):
            if not child.is_dir() or child.name.startswith("."):
                continue  # FILES.csv and the like
            if held_out(src, child.name):
                continue  # LFW N-Z: the verification set, never trained on
            photos = sorted((f for f in child.iterdir() if is_image_file(f)), key=lambda f: f.name)
            people.setdefault(person_key(src, child.name), []).extend((src, f) for f in photos)
    return {k: v for k, v in people.items() if v}


def largest(found: torch.Tensor) -> list[float] | None:
    """The largest face of a (K, 5 or 15) detection: its row (box, score, landmarks), None
    when K = 0."""
    if found.shape[0] == 0:
        return None
    area = (found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1])  # (K,)
    return [float(v) for v in found[int(area.argmax())]]


def _pixels(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float (3, H, W) in 0..255, what detectors take."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()


def find_face(
    detector: FaceDetector, img: Image.Image, pad: float
) -> tuple[list[float] | None, bool]:
    """(the largest face's row, box and landmarks in img's pixels, or None; whether
    padding was needed)."""
    box = largest(detector.detect(_pixels(img)))
    if box is not None or pad <= 0:
        return box, False
    b = round(pad * max(img.size))
    W, H = img.size
    grown = Image.new("RGB", (W + 2 * b, H + 2 * b), (FILL, FILL, FILL))
    grown.paste(img, (b, b))
    row = largest(detector.detect(_pixels(grown)))
    if row is None:
        return None, True
    shifted = [v - b for v in row[:4]] + row[4:5] + [v - b for v in row[5:]]
    return shifted, True


def square_crop(img: Image.Image, box: Sequence[float], size: int, margin: float) -> Image.Image:
    """What tagging embeds for ``box`` (align.crop_face), as a size x size RGB image."""
    pixels = crop_face(img, box, (size, size), 3, margin)  # uint8 (3, size, size)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _cut_one(
    detector: FaceDetector,
    photo: Path,
    target: Path,
    size: int,
    margin: float,
    pad: float,
    report: CropReport,
    say: MessageFn,
    aligned: bool = False,
) -> bool:
    """Detect, crop and write one photo's face; False (reported) when there is none."""
    try:
        img = decode_photo(photo, detector.settings.max_side).image()
    except DataError as e:
        say(str(e))
        report.missed.append(str(photo))
        return False
    box, padded = find_face(detector, img, pad)
    if box is None:
        say(f"{photo}: expected a face, got none; left out")
        report.missed.append(str(photo))
        return False
    report.padded += int(padded)
    target.parent.mkdir(parents=True, exist_ok=True)
    buf = BytesIO()
    if aligned:  # as tagging cuts faces for the dlib-resnet
        chip = face_chip(img, face_landmarks(box), size).permute(1, 2, 0).numpy()
        Image.fromarray(chip).save(buf, format="PNG")
    else:
        square_crop(img, box[:4], size, margin).save(buf, format="PNG")
    atomic_write(target, buf.getvalue())
    return True


def cut_crops(
    sources: Sequence[Path],
    out: Path,
    detector: FaceDetector,
    *,
    size: int = 112,
    margin: float = DEFAULT_MARGIN,
    pad: float = 0.25,
    aligned: bool = False,
    min_photos: int = 1,
    on_message: MessageFn | None = None,
    progress: ProgressFn | None = None,
) -> CropReport:
    """Detect and crop every photo of ``sources`` into OUT/<person>/ (see the module doc);
    ``aligned``: landmark-aligned chips (align.face_chip, for the dlib-resnet) instead of
    squares around the box. A person with fewer than ``min_photos`` crops is left out
    (a train/test split needs 2 of each), named in ``too_few`` and one message.

    Re-running with the same settings keeps crops already written (OUT/.crops.json
    records the settings; other settings rewrite everything). Each PNG is written
    atomically, so an interrupted run leaves only whole files.
    """
    say = on_message or (lambda _: None)
    people = _people(sources)
    if not people:
        raise DataError(
            f"{', '.join(map(str, sources))}: expected person folders with photos, got none; "
            "check the paths"
        )
    settings = {"detector": detector.name, "size": size, "margin": margin, "pad": pad}
    if aligned:
        settings["aligned"] = True
    stamp = out / ".crops.json"
    same = stamp.is_file() and json.loads(stamp.read_text()).get("settings") == settings
    out.mkdir(parents=True, exist_ok=True)
    report = CropReport(out=out)
    meter = Meter("photos", sum(len(v) for v in people.values()), progress, "photos/s")
    made: set[Path] = set()
    for person, photos in people.items():
        srcs = sorted({s.name for s, _ in photos})
        if len(srcs) > 1:
            report.merged[person] = srcs
        theirs: list[tuple[str, Path, bool]] = []  # (source, crop, kept from an earlier run)
        for src, photo in photos:
            target = out / person / f"{src.name}__{photo.stem}.png"
            if same and target.is_file():
                theirs.append((src.name, target, True))
            elif _cut_one(detector, photo, target, size, margin, pad, report, say, aligned):
                theirs.append((src.name, target, False))
            meter.step()
        if not theirs:
            continue  # no face in any photo: each one was reported
        if len(theirs) < min_photos:
            report.too_few.append(person)
            for _, target, _ in theirs:
                target.unlink()
            if (out / person).is_dir() and not any((out / person).iterdir()):
                (out / person).rmdir()
            continue
        report.people += 1
        for src_name, target, kept in theirs:
            made.add(target)
            report.kept += kept
            report.written += not kept
            report.per_source[src_name] = report.per_source.get(src_name, 0) + 1
    if report.too_few:
        say(
            f"{len(report.too_few)} people left out with fewer than {min_photos} crops: "
            f"{', '.join(report.too_few[:5])}{', ...' if len(report.too_few) > 5 else ''}"
        )
    if stamp.is_file():  # OUT is a crops folder: drop crops of photos no longer there
        for old in out.glob("*/*__*.png"):
            if old not in made:
                old.unlink()
        for folder in out.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    atomic_write(stamp, json.dumps({"settings": settings, **report.summary()}, indent=1).encode())
    return report
