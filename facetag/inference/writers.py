"""What ``facetag tag`` writes: JSON, CSV, XMP sidecars with face regions, annotated copies.

Every file is written atomically (facetag.atomic.atomic_write): a kill at any
moment leaves the old file or the new one. The photo itself is never touched.

XMP sidecars follow the Metadata Working Group's region schema (MWG 2.0, section 5.9),
which Lightroom, digiKam, darktable and exiftool read: ``mwg-rs:Regions`` holds
``AppliedToDimensions`` (the photo's displayed size) and a ``RegionList`` of named
``Face`` regions whose ``Area`` is the box centre (x, y) and size (w, h) as fractions of
the displayed width and height. Only named faces are written. Regions we write carry
``<facetag:Source>facetag</facetag:Source>``, so writing again replaces ours and keeps every other
region and every other property of an existing sidecar. A sidecar that is not valid XML
is reported and left as it is.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from facetag.atomic import atomic_write, write_problem
from facetag.data.images import is_image_file
from facetag.errors import DataError
from facetag.fsnames import json_text

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "mwg-rs": "http://www.metadataworkinggroup.com/schemas/regions/",
    "stArea": "http://ns.adobe.com/xmp/sType/Area#",
    "stDim": "http://ns.adobe.com/xap/1.0/sType/Dimensions#",
    "facetag": "https://github.com/facetag/facetag/ns/1.0/",
}
CSV_COLUMNS = ("path", "x1", "y1", "x2", "y2", "score", "name", "distance", "confidence")
ANNOTATED_MARK = b"facetag annotated copy"  # the JPEG comment of every annotated copy
XPACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
XPACKET_END = '\n<?xpacket end="w"?>\n'


def _q(prefix: str, name: str) -> str:
    return f"{{{NS[prefix]}}}{name}"


def to_json(doc: dict[str, Any]) -> str:
    """The tag document as indented JSON text (non-UTF-8 names as \\udcXX escapes)."""
    return json_text(doc, indent=2)


def csv_text(images: Iterable[dict[str, Any]]) -> str:
    """One row per face: path, x1, y1, x2, y2, score, name ('' = unknown), distance,
    confidence. Photos without faces have no rows.

    Lines end in "\\r\\n" (RFC 4180): Python's csv quotes a field only for the characters
    of its line end, so with "\\n" alone a file name holding "\\r" went out bare and split
    its row in two for every other reader.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for image in images:
        for f in image["faces"]:
            w.writerow(
                [
                    image["path"],
                    *f["box"],
                    f["score"],
                    f["name"] or "",
                    f["distance"],
                    f["confidence"],
                ]
            )
    return buf.getvalue()


def write_csv(path: Path, images: Iterable[dict[str, Any]]) -> Path:
    """The CSV of csv_text, written atomically as UTF-8. A file name that is not UTF-8
    (bytes from an old Windows or Samba share) is written as its own bytes, so
    ``open(csv, errors="surrogateescape")`` reads back the path that opens the photo."""
    atomic_write(path, csv_text(images).encode("utf-8", "surrogateescape"))
    return path


def sidecar_path(photo: Path) -> Path:
    """``photo.xmp`` beside the photo (Adobe's naming), or ``photo.jpg.xmp`` (digiKam's and
    darktable's naming) when that one exists already or when another image in the folder
    has the same stem: photo.jpg and photo.png would otherwise share photo.xmp, and each
    would overwrite the other's face regions."""
    long = photo.with_name(photo.name + ".xmp")
    if long.exists():
        return long
    try:
        twins = [
            p
            for p in photo.parent.glob(glob.escape(photo.stem) + ".*")
            if p.name != photo.name and p.stem == photo.stem and is_image_file(p)
        ]
    except OSError:
        twins = []
    return long if twins else photo.with_suffix(".xmp")


def regions(image: dict[str, Any]) -> list[dict[str, float | str]]:
    """Named faces -> MWG areas: centre x, y and w, h as fractions of the displayed size."""
    W, H = float(image["width"]), float(image["height"])
    out: list[dict[str, float | str]] = []
    for f in image["faces"]:
        if not f.get("name"):
            continue
        x1, y1, x2, y2 = (float(v) for v in f["box"])
        x1, x2 = max(0.0, min(x1, W)), max(0.0, min(x2, W))
        y1, y2 = max(0.0, min(y1, H)), max(0.0, min(y2, H))
        out.append(
            {
                "name": str(f["name"]),
                "x": round((x1 + x2) / 2 / W, 6),
                "y": round((y1 + y2) / 2 / H, 6),
                "w": round((x2 - x1) / W, 6),
                "h": round((y2 - y1) / H, 6),
            }
        )
    return out


def write_xmp(photo: Path, image: dict[str, Any]) -> Path | None:
    """Write (or merge into) the photo's XMP sidecar; returns its path.

    Returns None, writing nothing, when the photo has no named face and no sidecar with
    our regions exists. Raises DataError (one line) for a sidecar that is not valid XML
    or not XMP (left untouched) and for a sidecar that cannot be written.
    """
    path = sidecar_path(photo)
    ours = regions(image)
    if path.exists():
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(
                f"{path}: expected a readable XMP sidecar, got "
                f"{e.strerror or type(e).__name__}; check its permissions"
            ) from None
        root, prefixes = _parse(path, raw)
    else:
        if not ours:
            return None
        root, prefixes = _new_xmp(), {}
    changed = _merge(root, ours, int(image["width"]), int(image["height"]))
    if path.exists() and not changed:
        return path
    text = _serialise(root, prefixes)
    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as e:
        raise DataError(
            f"{path}: expected a writable folder for the XMP sidecar, got "
            f"{e.strerror or type(e).__name__}; check the folder's permissions"
        ) from None
    return path


def _parse(path: Path, raw: bytes) -> tuple[ET.Element, dict[str, str]]:
    """Parse a sidecar, keeping the prefixes it declares (prefix -> uri)."""
    prefixes: dict[str, str] = {}
    try:
        for _, (prefix, uri) in ET.iterparse(io.BytesIO(raw), events=("start-ns",)):
            prefixes.setdefault(prefix, uri)
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise DataError(
            f"{path}: expected an XMP sidecar, got invalid XML ({e}); left unchanged: fix or "
            "delete it to get face regions"
        ) from None
    if root.tag not in (_q("x", "xmpmeta"), _q("rdf", "RDF")) or _rdf(root) is None:
        raise DataError(
            f"{path}: expected an XMP sidecar (x:xmpmeta or rdf:RDF), got <{root.tag}>; left "
            "unchanged: move it away to get face regions"
        )
    return root, prefixes


def _rdf(root: ET.Element) -> ET.Element | None:
    return root if root.tag == _q("rdf", "RDF") else root.find(_q("rdf", "RDF"))


def _new_xmp() -> ET.Element:
    root = ET.Element(_q("x", "xmpmeta"))
    ET.SubElement(root, _q("rdf", "RDF"))
    return root


def _merge(root: ET.Element, ours: Sequence[dict[str, float | str]], W: int, H: int) -> bool:
    """Replace our regions in the XMP tree by ``ours``; True when anything changed."""
    rdf = _rdf(root)
    assert rdf is not None
    regions_el = None
    for desc in rdf.findall(_q("rdf", "Description")):
        regions_el = desc.find(_q("mwg-rs", "Regions"))
        if regions_el is not None:
            break
    if regions_el is None:
        if not ours:
            return False
        desc = ET.SubElement(rdf, _q("rdf", "Description"), {_q("rdf", "about"): ""})
        regions_el = ET.SubElement(
            desc, _q("mwg-rs", "Regions"), {_q("rdf", "parseType"): "Resource"}
        )
    owner = desc  # the Description holding the Regions block
    region_list = regions_el.find(_q("mwg-rs", "RegionList"))
    if region_list is None:
        region_list = ET.SubElement(regions_el, _q("mwg-rs", "RegionList"))
    bag = region_list.find(_q("rdf", "Bag"))
    if bag is None:
        bag = ET.SubElement(region_list, _q("rdf", "Bag"))
    before = ET.tostring(regions_el)
    for li in list(bag):
        source = li.find(f".//{_q('facetag', 'Source')}")
        if source is not None and source.text == "facetag":
            bag.remove(li)
    for r in ours:
        li = ET.SubElement(bag, _q("rdf", "li"), {_q("rdf", "parseType"): "Resource"})
        ET.SubElement(li, _q("mwg-rs", "Name")).text = str(r["name"])
        ET.SubElement(li, _q("mwg-rs", "Type")).text = "Face"
        ET.SubElement(
            li,
            _q("mwg-rs", "Area"),
            {
                _q("stArea", "x"): f"{r['x']}",
                _q("stArea", "y"): f"{r['y']}",
                _q("stArea", "w"): f"{r['w']}",
                _q("stArea", "h"): f"{r['h']}",
                _q("stArea", "unit"): "normalized",
            },
        )
        ET.SubElement(li, _q("facetag", "Source")).text = "facetag"
    if ours:
        dims = regions_el.find(_q("mwg-rs", "AppliedToDimensions"))
        if dims is None:
            dims = ET.Element(_q("mwg-rs", "AppliedToDimensions"))
            regions_el.insert(0, dims)
        dims.attrib.clear()
        dims.set(_q("rdf", "parseType"), "Resource")
        for child in list(dims):
            dims.remove(child)
        ET.SubElement(dims, _q("stDim", "w")).text = str(W)
        ET.SubElement(dims, _q("stDim", "h")).text = str(H)
        ET.SubElement(dims, _q("stDim", "unit")).text = "pixel"
    elif len(bag) == 0:
        # No region left (ours gone, none of anyone else's): drop the empty block, and
        # its Description when that held nothing else, rather than leave an empty list.
        owner.remove(regions_el)
        if len(owner) == 0 and set(owner.attrib) <= {_q("rdf", "about")}:
            rdf.remove(owner)
        return True
    return ET.tostring(regions_el) != before


def _serialise(root: ET.Element, prefixes: dict[str, str]) -> str:
    """The tree as sidecar text, with the file's own prefixes and ours registered."""
    for prefix, uri in {**prefixes, **NS}.items():
        if prefix and not prefix.startswith("ns"):
            try:
                ET.register_namespace(prefix, uri)
            except ValueError:
                continue  # a prefix ElementTree reserves; it picks another name
    ET.indent(root, space=" ")
    return XPACKET_BEGIN + ET.tostring(root, encoding="unicode") + XPACKET_END


def read_regions(sidecar: Path) -> list[dict[str, Any]]:
    """Every face region of a sidecar (ours or not): name, x, y, w, h (for tests/tools)."""
    root, _ = _parse(sidecar, sidecar.read_bytes())
    out = []
    for li in root.iter(_q("rdf", "li")):
        area = li.find(f".//{_q('mwg-rs', 'Area')}")
        name = li.find(f".//{_q('mwg-rs', 'Name')}")
        if area is None:
            continue
        out.append(
            {
                "name": name.text if name is not None else None,
                **{k: float(area.get(_q("stArea", k), "nan")) for k in "xywh"},
            }
        )
    return out


def annotate(img: Image.Image, image: dict[str, Any], scale: float) -> Image.Image:
    """A copy of ``img`` (the loaded photo, ``scale`` = loaded / displayed) with each face's
    box and name (or '?' for unknown) drawn on it."""
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 400))
    font = ImageFont.load_default(size=max(12, round(max(out.size) / 60)))
    for f in image["faces"]:
        x1, y1, x2, y2 = (float(v) * scale for v in f["box"])
        colour = (40, 200, 60) if f["name"] else (230, 60, 40)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        label = f"{f['name']} {f['confidence']:.2f}" if f["name"] else "?"
        tx, ty = x1, max(0.0, y1 - float(getattr(font, "size", 12)) - 2 * width)
        bbox = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(bbox, fill=colour)
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
    return out


def annotated_path(folder: Path, rel: Path) -> Path:
    """Where the annotated copy of a photo goes: folder/rel, as JPEG (.jpg kept, any
    other extension gets .jpg appended so photo.png and photo.jpg do not collide)."""
    suffix = rel.suffix.lower()
    name = rel.name if suffix in (".jpg", ".jpeg") else rel.name + ".jpg"
    return folder / rel.parent / name


def is_annotated_copy(path: Path) -> bool:
    """True when ``path`` is a JPEG that write_annotated wrote (its comment says so)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\xff\xd8") and ANNOTATED_MARK in head


def write_annotated(path: Path, img: Image.Image) -> Path:
    """Save an annotated copy atomically as JPEG, creating its folders. Only a file that
    is itself an annotated copy is replaced: DataError (one line) for anything else there,
    which is left unchanged."""
    if os.path.lexists(path) and not is_annotated_copy(path):
        raise DataError(
            f"{path}: expected a new file or an annotated copy of facetag's, got another "
            "file; left unchanged: pass another --annotate folder"
        )
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, comment=ANNOTATED_MARK)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    except OSError as e:
        got = write_problem(e, path.parent, "check --annotate's permissions")
        raise DataError(
            f"{path}: expected a writable folder for the annotated copy, got {got}"
        ) from None
    return path


def format_tags(doc: dict[str, Any]) -> str:
    """The human-readable summary of a tag document: one line per photo."""
    lines = []
    for image in doc["images"]:
        faces = ", ".join(
            f"{f['name']} ({f['distance']:.2f})" if f["name"] else "unknown" for f in image["faces"]
        )
        lines.append(f"{image['path']}: {faces or 'no faces'}")
    m = doc["model"]
    lines.append(
        f"{len(doc['images'])} photos tagged on {doc['device']} with {m['embedder']} and "
        f"{m['detector']}, threshold {m['threshold']:g} ({m['threshold_source']})"
    )
    return "\n".join(lines)
