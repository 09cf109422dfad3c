"""XMP sidecars beside the photos: face regions and people keywords for the photo managers.

For each tagged photo we merge into ``photo.jpg.xmp`` (digiKam's default and Immich's first
choice; ``SidecarName.stem`` gives ``photo.xmp``, Lightroom's):

- MWG regions (MWG Guidelines 2.0, 5.9): ``mwg-rs:Regions`` with ``AppliedToDimensions`` and
  a ``RegionList`` of ``Face`` regions whose ``Area`` is the box centre (x, y) and size (w, h)
  as fractions. "Region metadata is applied to the stored image": when EXIF Orientation is
  set, AppliedToDimensions is the stored size and the areas are in the stored frame, and a
  reader turns them with the orientation (Immich's orientRegionInfo; digiKam's scanner turns
  the rectangle with TagRegion::adjustToOrientation). A photo stored 832x1480 with
  Orientation 6 and displayed 1480x832 gets AppliedToDimensions 832x1480.
- Microsoft regions (``MP:RegionInfo``, Windows Photo Gallery's, which digiKam writes too):
  ``MPReg:Rectangle`` "x, y, w, h" (top-left corner and size as fractions, in the same stored
  frame: digiKam reads both kinds into one list and turns them alike) and
  ``MPReg:PersonDisplayName``. Named faces only, as Windows writes them.
- The people as keywords the managers index: ``dc:subject`` (Name), ``lr:hierarchicalSubject``
  (People|Name) and ``digiKam:TagsList`` (People/Name).
- With ``unknown=True``, faces nobody was matched to as MWG regions without a name (what
  digiKam writes for an unknown face), after the named ones: old digiKam stops reading a
  region list at the first region without a name.

Merging keeps everything else: other tools' regions in any valid RDF layout (``rdf:Bag`` or
``rdf:Seq`` lists, structs as ``rdf:parseType="Resource"``, as a nested ``rdf:Description``
or as attributes), every other property, comments, processing instructions and namespace
prefixes (lxml keeps the document as it was; we only add and remove our own nodes). Our
regions carry ``facetag:Source`` and ``facetag:Person`` (the name we gave): the next run
replaces them, except a region whose name someone changed since, which is theirs from then
on. We never add a region where the sidecar (either name) already has one on the same face
(IoU >= 0.5 in the displayed frame): the existing name stays and the disagreement is
returned as one line. Keywords we added are listed in ``facetag:Keywords``, so a later run
removes only what it added.

Every file is written atomically (facetag.atomic); the photo itself is never opened for
writing. A sidecar that is not XMP is reported (DataError, one line) and left as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np
from lxml import etree
from PIL import Image

from facetag.atomic import atomic_write
from facetag.data.boxes import iou_matrix
from facetag.data.images import is_image_file
from facetag.errors import DataError

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "mwg-rs": "http://www.metadataworkinggroup.com/schemas/regions/",
    "stArea": "http://ns.adobe.com/xmp/sType/Area#",
    "stDim": "http://ns.adobe.com/xap/1.0/sType/Dimensions#",
    "MP": "http://ns.microsoft.com/photo/1.2/",
    "MPRI": "http://ns.microsoft.com/photo/1.2/t/RegionInfo#",
    "MPReg": "http://ns.microsoft.com/photo/1.2/t/Region#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "lr": "http://ns.adobe.com/lightroom/1.0/",
    "digiKam": "http://www.digikam.org/ns/1.0/",
    "facetag": "https://github.com/facetag/facetag/ns/1.0/",
}
XML_NS = "http://www.w3.org/XML/1998/namespace"
SAME_FACE_IOU = 0.5  # a region this close to a face is that face (digiKam uses 0.5 too)
PEOPLE = "People"  # the root of the hierarchical keywords: People|Name, People/Name
NOTE = "note: "  # how a line that is not a failure starts (a kept name, an unreadable twin)
MAX_SIDECAR_BYTES = 32 << 20  # a sidecar is kilobytes; refuse to parse a huge file
EMPTY_XMP = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="facetag">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>\n'
)
ORIENTATION_TAG = 0x0112
# Declared once where our nodes start, so the elements below them need no declarations.
OUR_PREFIXES = (
    "mwg-rs",
    "stArea",
    "stDim",
    "MP",
    "MPRI",
    "MPReg",
    "dc",
    "lr",
    "digiKam",
    "facetag",
)
MWG_PREFIXES = ("mwg-rs", "stArea", "facetag")
MP_PREFIXES = ("MPReg", "facetag")

Box = tuple[float, float, float, float]  # x1, y1, x2, y2


def _q(prefix: str, name: str) -> str:
    return f"{{{NS[prefix]}}}{name}"


RDF_DESCRIPTION, RDF_LI = _q("rdf", "Description"), _q("rdf", "li")
PARSE_TYPE = _q("rdf", "parseType")
ARRAYS = (_q("rdf", "Bag"), _q("rdf", "Seq"), _q("rdf", "Alt"))


class SidecarName(str, Enum):
    """How a photo's sidecar is named: photo.jpg.xmp (digiKam, Immich, darktable) or
    photo.xmp (Lightroom, Adobe Bridge)."""

    ext = "photo.jpg.xmp"
    stem = "photo.xmp"


class RegionSource(str, Enum):
    """Who wrote a region."""

    facetag = "facetag"  # we did, and nobody renamed it since
    renamed = "facetag-renamed"  # we did, and someone gave it another name since
    mwg = "mwg"  # another tool's MWG region (digiKam, Lightroom, Picasa, exiftool ...)
    mp = "mp"  # another tool's Microsoft region (Windows Photo Gallery, digiKam)


@dataclass(frozen=True)
class Region:
    """One face region of a sidecar, in the photo as displayed (EXIF orientation applied)."""

    name: str | None  # None: a region without a name (an unknown face)
    box: Box  # x1, y1, x2, y2 in displayed-image pixels
    source: RegionSource
    kind: str | None  # mwg-rs:Type: "Face", "Pet", "Focus", "BarCode" or None
    sidecar: Path


@dataclass
class SidecarWrite:
    """What write_xmp did: the sidecar (None when nothing needed one) and the notes for
    the run's message callback (one line each: kept names, unreadable twin sidecars)."""

    path: Path | None
    notes: list[str] = field(default_factory=list)


def sidecar_path(photo: Path, naming: SidecarName = SidecarName.ext) -> Path:
    """The sidecar we write for ``photo``: ``photo.jpg.xmp``, or with ``SidecarName.stem``
    ``photo.xmp``, unless another image in the folder has the same stem (photo.jpg and
    photo.png would share photo.xmp and overwrite each other's regions): then
    ``photo.jpg.xmp``."""
    long = photo.with_name(photo.name + ".xmp")
    if naming is SidecarName.ext:
        return long
    try:
        twins = [
            p
            for p in photo.parent.glob(glob_escape(photo.stem) + ".*")
            if p.name != photo.name and p.stem == photo.stem and is_image_file(p)
        ]
    except OSError:
        twins = []
    return long if twins else photo.with_suffix(".xmp")


def sidecar_candidates(photo: Path) -> list[Path]:
    """Both names a sidecar of ``photo`` can have, photo.jpg.xmp first (Immich's order)."""
    return [photo.with_name(photo.name + ".xmp"), photo.with_suffix(".xmp")]


def photo_orientation(photo: Path) -> int:
    """EXIF Orientation 1-8 of a photo (1 when absent or unreadable), from its header.

    NOTE: Pillow's PNG reader loads the image to find an EXIF chunk stored after the image
    data (as facetag.data.images does when decoding), so this can cost a decode for a PNG.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data": not our line
            with Image.open(photo) as img:
                value = img.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, IndexError, EOFError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# Geometry: the displayed frame (boxes in facetag's outputs) and the stored frame (MWG).


def stored_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(W, H) as stored from (W, H) as displayed: orientations 5-8 turn by 90 degrees."""
    W, H = size
    return (H, W) if orientation in (5, 6, 7, 8) else (W, H)


def _displayed_point(x: float, y: float, w: float, h: float, o: int) -> tuple[float, float]:
    """Where stored pixel position (x, y) of a (w, h) image is shown (EXIF orientation o)."""
    return {
        1: (x, y),
        2: (w - x, y),  # mirrored left-right
        3: (w - x, h - y),  # turned 180
        4: (x, h - y),  # mirrored top-bottom
        5: (y, x),  # transposed
        6: (h - y, x),  # turned 90 clockwise
        7: (h - y, w - x),  # transversed
        8: (y, w - x),  # turned 90 anticlockwise
    }[o]


def _stored_point(X: float, Y: float, W: float, H: float, o: int) -> tuple[float, float]:
    """The inverse of _displayed_point: displayed (X, Y) of a (W, H) display -> stored."""
    return {
        1: (X, Y),
        2: (W - X, Y),
        3: (W - X, H - Y),
        4: (X, H - Y),
        5: (Y, X),
        6: (Y, W - X),
        7: (H - Y, W - X),
        8: (H - Y, X),
    }[o]


def _map_box(box: Box, size: tuple[float, float], o: int, point: Callable[..., Any]) -> Box:
    x1, y1, x2, y2 = box
    (ax, ay), (bx, by) = point(x1, y1, *size, o), point(x2, y2, *size, o)
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))


def to_stored(box: Box, displayed: tuple[int, int], orientation: int) -> Box:
    """A box in displayed pixels -> the same box in stored pixels."""
    _check_orientation(orientation)
    return _map_box(box, (float(displayed[0]), float(displayed[1])), orientation, _stored_point)


def to_displayed(box: Box, stored: tuple[int, int], orientation: int) -> Box:
    """A box in stored pixels -> the same box in displayed pixels."""
    _check_orientation(orientation)
    return _map_box(box, (float(stored[0]), float(stored[1])), orientation, _displayed_point)


def _check_orientation(orientation: int) -> None:
    if orientation not in range(1, 9):
        raise ValueError(f"xmp: expected an EXIF orientation 1-8, got {orientation!r}")


# RDF/XML as XMP writes it: the few forms a property value can take (XMP part 1, 7.9).


def _elements(node: Any) -> list[Any]:
    """Child elements only (lxml also lists comments and processing instructions)."""
    return [c for c in node if isinstance(c.tag, str)]


def _is_property_attr(name: str) -> bool:
    return name.startswith("{") and not name.startswith((f"{{{NS['rdf']}}}", f"{{{XML_NS}}}"))


def _struct_body(node: Any) -> Any | None:
    """The element holding the fields of ``node``'s struct value, or None if not a struct:
    ``node`` itself for rdf:parseType="Resource" and for the attribute shorthand
    (``<p f="v"/>``), else its only child rdf:Description."""
    if node.get(PARSE_TYPE) == "Resource":
        return node
    kids = _elements(node)
    if len(kids) == 1 and kids[0].tag == RDF_DESCRIPTION:
        return kids[0]
    if not kids and any(_is_property_attr(a) for a in node.attrib):
        return node
    return None


def _get(node: Any | str | None, name: str) -> Any | str | None:
    """Field ``name`` of a struct value: its element, its text (attribute form) or None
    (also when ``node`` is absent or a plain text, so lookups chain)."""
    if node is None or isinstance(node, str):
        return None
    body = _struct_body(node)
    if body is None:
        return None
    if name in body.attrib:
        return str(body.get(name))
    for child in _elements(body):
        if child.tag == name:
            return child
    return None


def _text(value: Any | str | None) -> str | None:
    """A simple value's text, whichever form holds it (element, attribute, rdf:resource,
    or a qualified value's rdf:value); None for structs, arrays and absent values."""
    if value is None or isinstance(value, str):
        return value
    resource = value.get(_q("rdf", "resource"))
    if resource is not None:
        return str(resource)
    if _struct_body(value) is not None:
        return _text(_get(value, _q("rdf", "value")))
    if _elements(value):
        return None
    return str(value.text or "")


def _array(node: Any | str | None) -> Any | None:
    """The rdf:Bag / rdf:Seq / rdf:Alt of an array value, or None."""
    if node is None or isinstance(node, str):
        return None
    for child in _elements(node):
        if child.tag in ARRAYS:
            return child
    return None


def _items(container: Any | None) -> list[Any]:
    return [] if container is None else [c for c in _elements(container) if c.tag == RDF_LI]


def _top(rdf: Any, name: str) -> Any | None:
    """Top-level property ``name`` as its element (in any rdf:Description), or None."""
    for desc in _elements(rdf):
        if desc.tag != RDF_DESCRIPTION:
            continue
        for child in _elements(desc):
            if child.tag == name:
                return child
    return None


def _float(text: str | None) -> float | None:
    try:
        v = float(text) if text is not None else None
    except ValueError:
        return None
    return v if v is not None and np.isfinite(v) else None


# Reading regions.


@dataclass
class _Found:
    """A region as stored in one sidecar: its box in stored pixels, who wrote it."""

    name: str | None
    box: Box  # stored pixels
    source: RegionSource
    kind: str | None


def _who(li: Any, name: str | None, other: RegionSource) -> RegionSource:
    if _text(_get(li, _q("facetag", "Source"))) != "facetag":
        return other
    given = _get(li, _q("facetag", "Person"))
    # Sidecars of earlier facetag versions carry no facetag:Person: ours as written.
    if given is None or (_text(given) or None) == name:
        return RegionSource.facetag
    return RegionSource.renamed


def _mwg_found(rdf: Any, stored: tuple[int, int]) -> Iterator[_Found]:
    regions = _top(rdf, _q("mwg-rs", "Regions"))
    if regions is None:
        return
    dims = _get(regions, _q("mwg-rs", "AppliedToDimensions"))
    dim_w, dim_h = (_float(_text(_get(dims, _q("stDim", k)))) for k in "wh")
    for li in _items(_array(_get(regions, _q("mwg-rs", "RegionList")))):
        area = _get(li, _q("mwg-rs", "Area"))
        if area is None or isinstance(area, str):
            continue
        x, y, w, h = (_float(_text(_get(area, _q("stArea", k)))) for k in "xywh")
        if x is None or y is None or w is None or h is None or w <= 0 or h <= 0:
            continue  # a point (focus) region or a broken one: no box to compare faces with
        sx, sy = float(stored[0]), float(stored[1])
        if (_text(_get(area, _q("stArea", "unit"))) or "normalized") == "pixel":
            if not dim_w or not dim_h:
                continue
            x, y, w, h = x / dim_w, y / dim_h, w / dim_w, h / dim_h
        name = _text(_get(li, _q("mwg-rs", "Name"))) or None
        box = ((x - w / 2) * sx, (y - h / 2) * sy, (x + w / 2) * sx, (y + h / 2) * sy)
        kind = _text(_get(li, _q("mwg-rs", "Type")))
        yield _Found(name, box, _who(li, name, RegionSource.mwg), kind)


def _mp_found(rdf: Any, stored: tuple[int, int]) -> Iterator[_Found]:
    info = _top(rdf, _q("MP", "RegionInfo"))
    if info is None:
        return
    for li in _items(_array(_get(info, _q("MPRI", "Regions")))):
        rect = _text(_get(li, _q("MPReg", "Rectangle")))
        parts = [_float(p.strip()) for p in rect.split(",")] if rect else []
        if len(parts) != 4 or any(p is None for p in parts):
            continue
        x, y, w, h = (float(p) for p in parts if p is not None)
        if w <= 0 or h <= 0:
            continue
        name = _text(_get(li, _q("MPReg", "PersonDisplayName"))) or None
        sx, sy = float(stored[0]), float(stored[1])
        box = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
        yield _Found(name, box, _who(li, name, RegionSource.mp), "Face")


def _found(rdf: Any, stored: tuple[int, int]) -> list[_Found]:
    """Every region of a sidecar. A Microsoft region on the same face as an MWG region is
    left out when it repeats its name (digiKam and facetag write both kinds) or is our
    copy of a region someone renamed since in a tool that knows only MWG."""
    mwg = list(_mwg_found(rdf, stored))
    mp = list(_mp_found(rdf, stored))
    if not mwg or not mp:
        return mwg + mp
    iou = iou_matrix(np.array([m.box for m in mp]), np.array([g.box for g in mwg]))  # (P, G)

    def repeats(i: int, m: _Found) -> bool:
        return any(
            iou[i, j] >= SAME_FACE_IOU and (g.name == m.name or m.source is RegionSource.facetag)
            for j, g in enumerate(mwg)
        )

    return mwg + [m for i, m in enumerate(mp) if not repeats(i, m)]


def read_regions(sidecar: Path, size: tuple[int, int], orientation: int = 1) -> list[Region]:
    """Every region of a sidecar (ours and other tools', MWG and Microsoft), boxed in the
    displayed photo of ``size`` (W, H as displayed) with EXIF ``orientation``.

    Raises DataError (one line) for a sidecar that cannot be read or is not XMP.
    """
    stored = stored_size(size, orientation)
    rdf = _rdf(_parse(sidecar, _read(sidecar)))
    return [
        Region(f.name, to_displayed(f.box, stored, orientation), f.source, f.kind, sidecar)
        for f in _found(rdf, stored)
    ]


def photo_regions(
    photo: Path, size: tuple[int, int], orientation: int | None = None
) -> list[Region]:
    """The regions of every sidecar of ``photo`` (photo.jpg.xmp, then photo.xmp), for
    ``facetag learn``: ``size`` is the photo's displayed (W, H); the orientation is read
    from the photo when not given."""
    o = photo_orientation(photo) if orientation is None else orientation
    return [r for s in sidecar_candidates(photo) if s.is_file() for r in read_regions(s, size, o)]


# Parsing and writing.


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise DataError(
                f"{path}: expected an XMP sidecar of at most {MAX_SIDECAR_BYTES >> 20} MiB, "
                f"got {path.stat().st_size >> 20} MiB; left unchanged: move it away to get "
                "face regions"
            )
        return path.read_bytes()
    except OSError as e:
        raise DataError(
            f"{path}: expected a readable XMP sidecar, got "
            f"{e.strerror or type(e).__name__}; check its permissions"
        ) from None


def _parser() -> Any:
    # No entities expanded, no DTD or network fetched: a sidecar is data from anywhere.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=False,
        remove_pis=False,
    )


def _parse(path: Path, raw: bytes) -> Any:
    """A sidecar's root element (its document keeps the comments and PIs around it)."""
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as e:
        raise DataError(
            f"{path}: expected an XMP sidecar, got invalid XML ({e}); left unchanged: fix or "
            "delete it to get face regions"
        ) from None
    if root is None or root.tag not in (_q("x", "xmpmeta"), _q("rdf", "RDF")) or not _has_rdf(root):
        tag = etree.QName(root).localname if root is not None else "nothing"
        raise DataError(
            f"{path}: expected an XMP sidecar (x:xmpmeta or rdf:RDF), got <{tag}>; left "
            "unchanged: move it away to get face regions"
        )
    if root.getroottree().docinfo.doctype:
        # NOTE: XMP has no DTD; one here can only declare entities, which we never expand
        # and could not write back.
        raise DataError(
            f"{path}: expected an XMP sidecar without a DOCTYPE, got one; left unchanged: "
            "move it away to get face regions"
        )
    return root


def _has_rdf(root: Any) -> bool:
    return bool(root.tag == _q("rdf", "RDF") or root.find(_q("rdf", "RDF")) is not None)


def _rdf(root: Any) -> Any:
    return root if root.tag == _q("rdf", "RDF") else root.find(_q("rdf", "RDF"))


def _serialise(root: Any, declaration: bool) -> bytes:
    """The document as bytes: what precedes the root (xpacket, comments), the root, what
    follows it, one per line (libxml2 keeps no whitespace between top-level nodes)."""
    before = list(root.itersiblings(preceding=True))[::-1]
    after = list(root.itersiblings())
    parts = [etree.tostring(n, encoding="unicode", with_tail=False) for n in before]
    parts.append(etree.tostring(root, encoding="unicode", with_tail=False))
    parts += [etree.tostring(n, encoding="unicode", with_tail=False) for n in after]
    head = '<?xml version="1.0" encoding="UTF-8"?>\n' if declaration else ""
    return (head + "\n".join(parts) + "\n").encode("utf-8")


def _depth(el: Any) -> int:
    return sum(1 for _ in el.iterancestors())


def _append(parent: Any, el: Any) -> Any:
    """Append ``el`` as the last child of ``parent``, indented like its siblings."""
    d = _depth(parent)
    inner, outer = "\n" + " " * (d + 1), "\n" + " " * d
    kids = list(parent)
    if kids:
        last = kids[-1]
        el.tail = last.tail if last.tail is not None and not last.tail.strip() else outer
        last.tail = inner
    else:
        if parent.text is None or not parent.text.strip():
            parent.text = inner
        el.tail = outer
    parent.append(el)
    etree.indent(el, space=" ", level=d + 1)
    return el


def _remove(el: Any) -> None:
    """Remove ``el``; the indentation before its parent's closing tag stays."""
    parent, prev = el.getparent(), el.getprevious()
    if el.getnext() is None:
        if prev is not None:
            prev.tail = el.tail
        elif parent.text is None or not parent.text.strip():
            parent.text = el.tail
    parent.remove(el)


def _new(
    parent: Any,
    prefix: str,
    name: str,
    attrs: dict[str, str] | None = None,
    text: str | None = None,
    declare: Iterable[str] = (),
) -> Any:
    """A new element ``prefix:name`` appended to ``parent``; its namespaces, its
    attributes' and those of ``declare`` (prefixes its children will use) are declared on
    it unless already in scope."""
    uris = {NS[prefix]} | {etree.QName(a).namespace for a in attrs or {}}
    uris |= {NS[p] for p in declare}
    in_scope = set(parent.nsmap.values())
    nsmap = {p: u for p, u in NS.items() if u in uris and u not in in_scope}
    el = etree.Element(_q(prefix, name), nsmap=nsmap)
    for a, v in (attrs or {}).items():
        el.set(a, v)
    if text is not None:
        el.text = text
    return _append(parent, el)


def _field_parent(node: Any) -> Any:
    """Where a new field of struct ``node`` goes (the attribute shorthand ``<p f="v"/>``
    cannot hold elements: its fields move into a nested rdf:Description first)."""
    body = _struct_body(node)
    if body is None:
        node.set(PARSE_TYPE, "Resource")
        return node
    if body is node and node.get(PARSE_TYPE) != "Resource":
        desc = _new(node, "rdf", "Description")
        for a in [a for a in node.attrib if _is_property_attr(a)]:
            desc.set(a, node.attrib.pop(a))
        return desc
    return body


def _drop_field(node: Any, name: str) -> None:
    body = _struct_body(node)
    if body is None:
        return
    if name in body.attrib:
        del body.attrib[name]
    for child in _elements(body):
        if child.tag == name:
            _remove(child)


def _only_fields(node: Any, names: Iterable[str]) -> bool:
    """True when struct ``node`` holds no field besides ``names`` (so it can go)."""
    body = _struct_body(node)
    if body is None:
        return True
    allowed = set(names)
    attrs = {a for a in body.attrib if _is_property_attr(a)}
    return attrs <= allowed and all(c.tag in allowed for c in _elements(body))


def _drop_property(prop: Any) -> None:
    """Remove a top-level property, and its rdf:Description if that is left empty."""
    desc = prop.getparent()
    _remove(prop)
    if not _elements(desc) and not any(_is_property_attr(a) for a in desc.attrib):
        _remove(desc)


@dataclass
class _Doc:
    """A parsed sidecar and where new top-level properties go."""

    root: Any
    declaration: bool  # the file began with <?xml ...?>
    ours: Any | None = None  # the rdf:Description we add, made on first use

    @property
    def rdf(self) -> Any:
        return _rdf(self.root)

    def description(self) -> Any:
        if self.ours is None:
            descs = [d for d in _elements(self.rdf) if d.tag == RDF_DESCRIPTION]
            about = descs[0].get(_q("rdf", "about"), "") if descs else ""
            attrs = {_q("rdf", "about"): about}
            self.ours = _new(self.rdf, "rdf", "Description", attrs, declare=OUR_PREFIXES)
        return self.ours

    def array(self, prefix: str, name: str, kind: str) -> Any:
        """The container of top-level array ``prefix:name``, made (as ``kind``) if absent."""
        prop = _top(self.rdf, _q(prefix, name))
        if prop is None:
            prop = _new(self.description(), prefix, name)
        container = _array(prop)
        return container if container is not None else _new(prop, "rdf", kind)


def _load(path: Path) -> _Doc | None:
    if not path.exists():
        return None
    raw = _read(path)
    return _Doc(_parse(path, raw), raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<?xml"))


@dataclass(frozen=True)
class _Face:
    """A face we write: its name (None: unknown) and box in displayed pixels."""

    name: str | None
    box: Box


def _faces(image: dict[str, Any], unknown: bool) -> list[_Face]:
    """The faces to write, named ones first; boxes clipped to the displayed photo."""
    W, H = float(image["width"]), float(image["height"])
    out = []
    for f in image["faces"]:
        name = f.get("name") or None
        if name is None and not unknown:
            continue
        x1, y1, x2, y2 = (float(v) for v in f["box"])
        box = (max(0.0, min(x1, W)), max(0.0, min(y1, H)), max(0.0, min(x2, W)), min(y2, H))
        if box[2] > box[0] and box[3] > box[1]:
            out.append(_Face(str(name) if name is not None else None, box))
    return sorted(out, key=lambda f: f.name is None)


def _fmt_box(box: Box) -> str:
    return "({:.0f}, {:.0f})-({:.0f}, {:.0f})".format(*box)


def _keep_existing(
    photo: Path, faces: list[_Face], existing: list[Region]
) -> tuple[list[_Face], list[str], list[str]]:
    """Faces without a region already on them; the names confirmed by one; one note per
    face where an existing region says otherwise (its name is kept)."""
    theirs = [r for r in existing if r.source is not RegionSource.facetag]
    theirs = [r for r in theirs if r.kind in (None, "", "Face")]
    if not faces or not theirs:
        return faces, [], []
    iou = iou_matrix(np.array([f.box for f in faces]), np.array([r.box for r in theirs]))
    write, agreed, notes = [], [], []
    for i, f in enumerate(faces):
        j = int(iou[i].argmax())
        if iou[i, j] < SAME_FACE_IOU:
            write.append(f)
            continue
        r = theirs[j]
        if r.name == f.name or f.name is None:
            if f.name is not None:
                agreed.append(f.name)
            continue
        said = f"'{r.name}'" if r.name else "a region without a name"
        notes.append(
            f"{NOTE}{photo}: kept {said} from {r.sidecar.name} for the face at "
            f"{_fmt_box(f.box)}; facetag says '{f.name}'"
        )
    return write, agreed, notes


def write_xmp(
    photo: Path,
    image: dict[str, Any],
    *,
    orientation: int = 1,
    naming: SidecarName = SidecarName.ext,
    unknown: bool = False,
) -> SidecarWrite:
    """Write (or merge into) the sidecar of ``photo`` from its tag result ``image``.

    ``image`` is one photo of the tag document: "width", "height" (displayed) and "faces"
    (each "box" x1, y1, x2, y2 in displayed pixels and "name", None for unknown).
    ``orientation`` is the photo's EXIF Orientation (photo_orientation), which decides the
    stored frame the regions are written in. Writes nothing (path None) when there is
    nothing to write and no sidecar with our regions exists. Raises DataError (one line)
    for a sidecar that is not XMP (left untouched) or cannot be written.
    """
    _check_orientation(orientation)
    path = sidecar_path(photo, naming)
    size = (int(image["width"]), int(image["height"]))
    stored = stored_size(size, orientation)
    doc = _load(path)
    notes: list[str] = []
    existing = (
        [
            Region(f.name, to_displayed(f.box, stored, orientation), f.source, f.kind, path)
            for f in _found(doc.rdf, stored)
        ]
        if doc is not None
        else []
    )
    for twin in sidecar_candidates(photo):
        if twin != path and twin.is_file():
            try:
                existing += read_regions(twin, size, orientation)
            except DataError as e:
                notes.append(f"{NOTE}{e} (its regions were not compared)")
                continue
            try:
                _clear(twin, stored)
            except DataError as e:
                notes.append(f"{NOTE}{e}")
    faces, agreed, kept = _keep_existing(photo, _faces(image, unknown), existing)
    notes += kept
    names = list(dict.fromkeys([f.name for f in faces if f.name is not None] + agreed))
    if doc is None:
        if not faces and not names:
            return SidecarWrite(None, notes)
        doc = _Doc(_parse(path, EMPTY_XMP.encode("utf-8")), False)
    before = _serialise(doc.root, doc.declaration)
    _merge_mwg(doc, [(f, to_stored(f.box, size, orientation)) for f in faces], stored)
    _merge_mp(doc, [(f, to_stored(f.box, size, orientation)) for f in faces if f.name], stored)
    _merge_keywords(doc, names)
    text = _serialise(doc.root, doc.declaration)
    if text == before and path.exists():
        return SidecarWrite(path, notes)
    try:
        atomic_write(path, text)
    except OSError as e:
        raise DataError(
            f"{path}: expected a writable folder for the XMP sidecar, got "
            f"{e.strerror or type(e).__name__}; check the folder's permissions"
        ) from None
    return SidecarWrite(path, notes)


def _clear(twin: Path, stored: tuple[int, int]) -> None:
    """Take our regions and keywords out of the sidecar of the other name (written by an
    earlier run or with the other naming), so no manager shows a stale copy; the file goes
    when nothing is left in it (no property, no comment)."""
    doc = _load(twin)
    if doc is None:
        return
    before = _serialise(doc.root, doc.declaration)
    _merge_mwg(doc, [], stored)
    _merge_mp(doc, [], stored)
    _merge_keywords(doc, [])
    text = _serialise(doc.root, doc.declaration)
    if text == before:
        return
    try:
        if _holds_nothing(doc.root):
            twin.unlink()
        else:
            atomic_write(twin, text)
    except OSError as e:
        raise DataError(
            f"{twin}: expected a writable sidecar to take facetag's old regions out, got "
            f"{e.strerror or type(e).__name__}; check its permissions"
        ) from None


def _holds_nothing(root: Any) -> bool:
    """True for a packet with no property and no comment left (emptied rdf:Descriptions
    are gone already); the xpacket instructions do not count."""
    nodes = [*root.itersiblings(preceding=True), *root.iter(), *root.itersiblings()]
    if any(n.tag is etree.Comment for n in nodes):
        return False
    if any(n.tag is etree.PI and n.target != "xpacket" for n in nodes):
        return False
    return not _elements(_rdf(root))


def _ours(li: Any, name_field: str) -> bool:
    """A list item we wrote and nobody renamed since (replaced on every run)."""
    return _who(li, _text(_get(li, name_field)) or None, RegionSource.mwg) is RegionSource.facetag


def _merge_mwg(doc: _Doc, faces: list[tuple[_Face, Box]], stored: tuple[int, int]) -> None:
    """Replace our MWG regions by ``faces`` (each with its box in stored pixels)."""
    name_q, list_q, dims_q = (
        _q("mwg-rs", "Name"),
        _q("mwg-rs", "RegionList"),
        _q("mwg-rs", "AppliedToDimensions"),
    )
    regions = _top(doc.rdf, _q("mwg-rs", "Regions"))
    if regions is None:
        if not faces:
            return
        regions = _new(doc.description(), "mwg-rs", "Regions", {PARSE_TYPE: "Resource"})
    region_list = _get(regions, list_q)
    if isinstance(region_list, str):
        return  # not an array: someone else's broken block, left as it is
    container = _array(region_list)
    for li in _items(container):
        if _ours(li, name_q):
            _remove(li)
    if faces:
        if region_list is None:
            region_list = _new(_field_parent(regions), "mwg-rs", "RegionList")
        if container is None:
            container = _new(region_list, "rdf", "Bag")
        W, H = stored
        for f, (x1, y1, x2, y2) in faces:
            li = _new(container, "rdf", "li", {PARSE_TYPE: "Resource"}, declare=MWG_PREFIXES)
            if f.name is not None:
                _new(li, "mwg-rs", "Name", text=f.name)
            _new(li, "mwg-rs", "Type", text="Face")
            area = {
                _q("stArea", "x"): _num((x1 + x2) / 2 / W),
                _q("stArea", "y"): _num((y1 + y2) / 2 / H),
                _q("stArea", "w"): _num((x2 - x1) / W),
                _q("stArea", "h"): _num((y2 - y1) / H),
                _q("stArea", "unit"): "normalized",
            }
            _new(li, "mwg-rs", "Area", area)
            _new(li, "facetag", "Source", text="facetag")
            if f.name is not None:
                _new(li, "facetag", "Person", text=f.name)
        dims = _get(regions, dims_q)
        now = [_float(_text(_get(dims, _q("stDim", k)))) for k in "wh"]
        unit = _text(_get(dims, _q("stDim", "unit")))
        if now != [W, H] or unit not in (None, "pixel"):
            _drop_field(regions, dims_q)
            dims = _new(
                _field_parent(regions),
                "mwg-rs",
                "AppliedToDimensions",
                {PARSE_TYPE: "Resource"},
                declare=("stDim",),
            )
            _new(dims, "stDim", "w", text=str(W))
            _new(dims, "stDim", "h", text=str(H))
            _new(dims, "stDim", "unit", text="pixel")
    elif not _items(container) and _only_fields(regions, (list_q, dims_q)):
        _drop_property(regions)  # nobody's region left: no empty block either


def _merge_mp(doc: _Doc, faces: list[tuple[_Face, Box]], stored: tuple[int, int]) -> None:
    """Replace our Microsoft regions by ``faces`` (named ones, boxes in stored pixels)."""
    name_q, regions_q = _q("MPReg", "PersonDisplayName"), _q("MPRI", "Regions")
    info = _top(doc.rdf, _q("MP", "RegionInfo"))
    if info is None:
        if not faces:
            return
        info = _new(doc.description(), "MP", "RegionInfo", {PARSE_TYPE: "Resource"})
    regions = _get(info, regions_q)
    if isinstance(regions, str):
        return
    container = _array(regions)
    for li in _items(container):
        if _ours(li, name_q):
            _remove(li)
    if faces:
        if regions is None:
            regions = _new(_field_parent(info), "MPRI", "Regions")
        if container is None:
            container = _new(regions, "rdf", "Bag")
        W, H = stored
        for f, (x1, y1, x2, y2) in faces:
            li = _new(container, "rdf", "li", {PARSE_TYPE: "Resource"}, declare=MP_PREFIXES)
            rect = ", ".join(_num(v) for v in (x1 / W, y1 / H, (x2 - x1) / W, (y2 - y1) / H))
            _new(li, "MPReg", "Rectangle", text=rect)
            _new(li, "MPReg", "PersonDisplayName", text=f.name)
            _new(li, "facetag", "Source", text="facetag")
            _new(li, "facetag", "Person", text=f.name)
    elif not _items(container) and _only_fields(info, (regions_q,)):
        _drop_property(info)


KEYWORDS = (  # (prefix, property, array kind, keyword of a person)
    ("dc", "subject", "Bag", lambda name: name),
    ("lr", "hierarchicalSubject", "Bag", lambda name: f"{PEOPLE}|{name}"),
    ("digiKam", "TagsList", "Seq", lambda name: f"{PEOPLE}/{name}"),
)


def _merge_keywords(doc: _Doc, names: list[str]) -> None:
    """The people ``names`` as keywords. facetag:Keywords lists the keywords we added;
    those of people no longer found go, and a keyword that was there before us (a person
    typed it) is never ours, so never removed."""
    record = _top(doc.rdf, _q("facetag", "Keywords"))
    added = [t for li in _items(_array(record)) if (t := _text(li))]
    mine: list[str] = []
    for prefix, prop, kind, keyword in KEYWORDS:
        wanted = [keyword(n) for n in names]
        el = _top(doc.rdf, _q(prefix, prop))
        container = _array(el)
        removed = False
        for li in _items(container):
            if _text(li) in added and _text(li) not in wanted:
                _remove(li)
                removed = True
        if removed and not _items(container):
            _drop_property(el)
            container = None
        present = {t for li in _items(container) if (t := _text(li)) is not None}
        missing = [k for k in wanted if k not in present]
        mine += [k for k in wanted if k in present and k in added] + missing
        if missing:
            container = doc.array(prefix, prop, kind)
            for k in missing:
                _new(container, "rdf", "li", text=k)
    mine = list(dict.fromkeys(mine))
    if set(mine) == set(added):
        return
    if record is not None:
        _drop_property(record)
    if mine:
        container = doc.array("facetag", "Keywords", "Bag")
        for k in mine:
            _new(container, "rdf", "li", text=k)


def _num(v: float) -> str:
    """A fraction as XMP text: 6 decimals, no trailing zeros, never '-0'."""
    text = f"{round(v, 6):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
