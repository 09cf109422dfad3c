"""XMP sidecars: rotated photos, sidecar names, MWG and Microsoft regions, keywords, unknown
faces, names kept on faces a person named, and other tools' layouts kept as they were.

exiftool (as photo managers and their users read sidecars) checks what we write where it is
installed; .ci/run installs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lxml import etree
from PIL import Image, ImageDraw, ImageOps

from facetag.data.images import decode_photo
from facetag.errors import DataError
from facetag.inference.xmp import (
    NOTE,
    NS,
    RegionSource,
    SidecarName,
    photo_orientation,
    photo_regions,
    read_regions,
    sidecar_path,
    to_displayed,
    to_stored,
    write_xmp,
)

needs_exiftool = pytest.mark.skipif(shutil.which("exiftool") is None, reason="no exiftool")

SIZE = (400, 200)  # displayed W, H of IMAGE
ALICE = [100.0, 50.0, 140.0, 130.0]
BOB = [300.0, 20.0, 350.0, 80.0]
GRANDMA = (30.0, 15.0, 50.0, 25.0)  # the region other tools wrote in the layouts below


def face(box: list[float], name: str | None) -> dict[str, Any]:
    return {"box": box, "score": 0.9, "name": name, "distance": 0.1, "confidence": 0.8}


IMAGE = {"path": "a.jpg", "width": 400, "height": 200, "faces": [face(ALICE, "Alice")]}


def exiftool(path: Path, *tags: str) -> dict[str, Any]:
    out = subprocess.run(
        ["exiftool", "-j", "-struct", "-n", *tags, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout)[0])


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def names(sidecar: Path) -> list[str | None]:
    return sorted((r.name for r in read_regions(sidecar, SIZE)), key=str)


# Rotated photos: regions on the stored image, as MWG says and Immich and digiKam read them.

STORED = (120, 200)  # W, H of the stored pixels
FACE_STORED = (20.0, 40.0, 80.0, 120.0)  # the bright "face" in stored pixels


def rotated_photo(path: Path, orientation: int) -> Path:
    img = Image.new("RGB", STORED, (0, 0, 0))
    ImageDraw.Draw(img).rectangle((20, 40, 79, 119), fill=(255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif)
    return path


def bright_box(img: Image.Image) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(np.asarray(img.convert("L")) > 128)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


@needs_exiftool
@pytest.mark.parametrize("orientation", range(1, 9))
def test_rotated_photo_region_lands_on_the_face(tmp_path: Path, orientation: int):
    photo = rotated_photo(tmp_path / "p.jpg", orientation)
    assert exiftool(photo, "-Orientation")["Orientation"] == orientation
    shown = decode_photo(photo)  # what the detector sees: the photo as displayed
    box = bright_box(shown.image())
    image = {"width": shown.width, "height": shown.height, "faces": [face(list(box), "Alice")]}
    original = photo.read_bytes()
    done = write_xmp(photo, image, orientation=photo_orientation(photo))
    assert done.path == tmp_path / "p.jpg.xmp"
    assert photo.read_bytes() == original  # the photo is only ever read
    info = exiftool(done.path, "-XMP:all")
    region = info["RegionInfo"]
    assert region["AppliedToDimensions"] == {"W": 120, "H": 200, "Unit": "pixel"}
    (r,) = region["RegionList"]
    assert r["Name"] == "Alice"
    a = r["Area"]
    W, H = STORED
    on_stored = ((a["X"] - a["W"] / 2) * W, (a["Y"] - a["H"] / 2) * H)
    on_stored += ((a["X"] + a["W"] / 2) * W, (a["Y"] + a["H"] / 2) * H)
    assert iou(on_stored, FACE_STORED) > 0.9
    # As a photo manager shows it: the region turned with the photo lands on the face.
    mask = Image.new("L", STORED, 0)
    ImageDraw.Draw(mask).rectangle([round(v) for v in on_stored], fill=255)
    mask.getexif()[0x0112] = orientation
    mask_shown = ImageOps.exif_transpose(mask)
    assert mask_shown.size == (shown.width, shown.height)
    assert iou(bright_box(mask_shown), box) > 0.9
    # Microsoft's rectangle (top-left, size) is on the stored image too.
    (mp,) = info["RegionInfoMP"]["Regions"]
    x, y, w, h = (float(v) for v in mp["Rectangle"].split(","))
    assert iou((x * W, y * H, (x + w) * W, (y + h) * H), FACE_STORED) > 0.9
    # And we read it back where we found it.
    (back,) = read_regions(done.path, (shown.width, shown.height), orientation)
    assert back.name == "Alice"
    assert back.source is RegionSource.facetag
    assert iou(back.box, box) > 0.99


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_and_displayed_boxes_agree_with_pillow(orientation: int):
    W, H = 30, 50  # stored
    stored_box = (3.0, 7.0, 12.0, 20.0)
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (3, 7, 12, 20))
    mask.getexif()[0x0112] = orientation
    shown = ImageOps.exif_transpose(mask)
    assert to_displayed(stored_box, (W, H), orientation) == bright_box(shown)
    assert to_stored(bright_box(shown), shown.size, orientation) == stored_box


def test_photo_orientation_is_read_from_the_header(tmp_path: Path):
    assert photo_orientation(rotated_photo(tmp_path / "a.jpg", 6)) == 6
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    assert photo_orientation(tmp_path / "b.png") == 1
    (tmp_path / "c.jpg").write_bytes(b"not a photo")
    assert photo_orientation(tmp_path / "c.jpg") == 1


# Sidecar names.


def test_sidecar_is_photo_jpg_xmp_by_default_and_photo_xmp_on_request(tmp_path: Path):
    photo = tmp_path / "a.jpg"
    assert write_xmp(photo, IMAGE).path == tmp_path / "a.jpg.xmp"
    assert not (tmp_path / "a.xmp").exists()
    assert not photo.exists()  # the photo itself is never written
    assert write_xmp(tmp_path / "b.jpg", IMAGE, naming=SidecarName.stem).path == (
        tmp_path / "b.xmp"
    )
    assert not (tmp_path / "b.jpg.xmp").exists()


def test_photos_sharing_a_stem_get_a_sidecar_each_with_stem_naming(tmp_path: Path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("notes")  # not an image: no clash
    stem = SidecarName.stem
    assert sidecar_path(tmp_path / "a.jpg", stem) == tmp_path / "a.jpg.xmp"
    assert sidecar_path(tmp_path / "a.png", stem) == tmp_path / "a.png.xmp"
    assert sidecar_path(tmp_path / "b.jpg", stem) == tmp_path / "b.xmp"
    write_xmp(tmp_path / "a.jpg", IMAGE, naming=stem)
    write_xmp(tmp_path / "a.png", {**IMAGE, "faces": [face(ALICE, "Bob")]}, naming=stem)
    assert names(tmp_path / "a.jpg.xmp") == ["Alice"]
    assert names(tmp_path / "a.png.xmp") == ["Bob"]
    assert not (tmp_path / "a.xmp").exists()


def test_both_sidecar_names_are_read_when_merging(tmp_path: Path):
    lightroom = tmp_path / "a.xmp"
    lightroom.write_text(LAYOUTS["parse-type-resource-bag"], encoding="utf-8")
    on_grandma = {**IMAGE, "faces": [face(list(GRANDMA), "Alice"), face(BOB, "Bob")]}
    done = write_xmp(tmp_path / "a.jpg", on_grandma)
    assert done.path == tmp_path / "a.jpg.xmp"
    assert names(done.path) == ["Bob"]  # no second region on Grandma's face
    (note,) = done.notes
    assert note.startswith(NOTE)
    assert "kept 'Grandma' from a.xmp" in note
    assert "facetag says 'Alice'" in note
    assert lightroom.read_text(encoding="utf-8") == LAYOUTS["parse-type-resource-bag"]
    both = photo_regions(tmp_path / "a.jpg", SIZE, orientation=1)
    assert [(r.name, r.sidecar.name, r.source) for r in both] == [
        ("Bob", "a.jpg.xmp", RegionSource.facetag),
        ("Grandma", "a.xmp", RegionSource.mwg),
    ]


# What the managers show: MWG and Microsoft regions, keywords, unknown faces.


@needs_exiftool
def test_people_are_regions_of_both_kinds_and_keywords(tmp_path: Path):
    two = {**IMAGE, "faces": [face(ALICE, "Alice"), face(BOB, "Bob")]}
    done = write_xmp(tmp_path / "a.jpg", two)
    info = exiftool(done.path, "-XMP:all")
    region = info["RegionInfo"]
    assert region["AppliedToDimensions"] == {"W": 400, "H": 200, "Unit": "pixel"}
    areas = {r["Name"]: r["Area"] for r in region["RegionList"]}
    assert areas["Alice"] == {"X": 0.3, "Y": 0.45, "W": 0.1, "H": 0.4, "Unit": "normalized"}
    assert areas["Bob"] == {"X": 0.8125, "Y": 0.25, "W": 0.125, "H": 0.3, "Unit": "normalized"}
    mp = {r["PersonDisplayName"]: r["Rectangle"] for r in info["RegionInfoMP"]["Regions"]}
    assert mp == {"Alice": "0.25, 0.25, 0.1, 0.4", "Bob": "0.75, 0.1, 0.125, 0.3"}
    assert info["Subject"] == ["Alice", "Bob"]
    assert info["HierarchicalSubject"] == ["People|Alice", "People|Bob"]
    assert info["TagsList"] == ["People/Alice", "People/Bob"]
    # Microsoft regions repeat the MWG ones: read once.
    assert names(done.path) == ["Alice", "Bob"]


@needs_exiftool
def test_keywords_we_added_go_with_the_person_and_typed_ones_stay(tmp_path: Path):
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_text(LAYOUTS["parse-type-resource-bag"].replace("holiday", "Bob"), "utf-8")
    two = {**IMAGE, "faces": [face(ALICE, "Alice"), face(BOB, "Bob")]}
    write_xmp(tmp_path / "a.jpg", two)
    assert exiftool(sidecar, "-Subject")["Subject"] == ["Bob", "Alice"]
    write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": []})  # nobody found any more
    info = exiftool(sidecar, "-XMP:all")
    assert info["Subject"] == ["Bob"]  # typed by a person before us: stays
    assert "HierarchicalSubject" not in info
    assert "TagsList" not in info
    assert "RegionInfoMP" not in info
    assert [r["Name"] for r in info["RegionInfo"]["RegionList"]] == ["Grandma"]


@needs_exiftool
def test_unknown_faces_are_unnamed_regions_only_when_asked(tmp_path: Path):
    unknown_first = {**IMAGE, "faces": [face(BOB, None), face(ALICE, "Alice")]}
    plain = write_xmp(tmp_path / "a.jpg", unknown_first)
    assert plain.path is not None
    assert names(plain.path) == ["Alice"]
    done = write_xmp(tmp_path / "b.jpg", unknown_first, unknown=True)
    assert done.path is not None
    info = exiftool(done.path, "-XMP:all")
    listed = info["RegionInfo"]["RegionList"]
    assert [r.get("Name") for r in listed] == ["Alice", None]  # named first (old digiKam)
    assert listed[1]["Type"] == "Face"
    assert listed[1]["Area"]["X"] == 0.8125
    assert [r["PersonDisplayName"] for r in info["RegionInfoMP"]["Regions"]] == ["Alice"]
    assert info["Subject"] == ["Alice"]
    nobody = write_xmp(tmp_path / "c.jpg", {**IMAGE, "faces": [face(BOB, None)]}, unknown=True)
    assert nobody.path is not None
    assert names(nobody.path) == [None]


def test_without_faces_to_write_no_sidecar_is_made(tmp_path: Path):
    done = write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": [face(BOB, None)]})
    assert done.path is None
    assert list(tmp_path.iterdir()) == []


# A face that already has a region keeps it.


def test_region_on_the_same_face_keeps_its_name_and_the_disagreement_is_told(tmp_path: Path):
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_text(LAYOUTS["parse-type-resource-bag"], encoding="utf-8")
    near = [29.0, 14.0, 51.0, 26.0]  # IoU 0.83 with Grandma's region
    beside = [60.0, 15.0, 80.0, 25.0]  # IoU 0 with it
    faces = [face(near, "Alice"), face(beside, "Bob")]
    done = write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": faces})
    assert names(sidecar) == ["Bob", "Grandma"]
    (note,) = done.notes
    assert note == (
        f"{NOTE}{tmp_path / 'a.jpg'}: kept 'Grandma' from a.jpg.xmp for the face at "
        "(29, 14)-(51, 26); facetag says 'Alice'"
    )
    same = write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": [face(near, "Grandma")]})
    assert same.notes == []  # agreeing is nothing to tell
    assert names(sidecar) == ["Grandma"]
    assert "<rdf:li>Grandma</rdf:li>" in sidecar.read_text(encoding="utf-8")  # a keyword


def test_unnamed_region_on_the_face_is_kept_and_told(tmp_path: Path):
    sidecar = tmp_path / "a.jpg.xmp"
    unnamed = LAYOUTS["parse-type-resource-bag"].replace("<mwg-rs:Name>Grandma</mwg-rs:Name>", "")
    sidecar.write_text(unnamed, encoding="utf-8")
    done = write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": [face(list(GRANDMA), "Alice")]})
    assert names(sidecar) == [None]
    (note,) = done.notes
    assert "kept a region without a name from a.jpg.xmp" in note


def test_microsoft_region_of_another_tool_counts_as_the_face(tmp_path: Path):
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_text(WLPG, encoding="utf-8")
    (wlpg,) = read_regions(sidecar, SIZE)
    assert (wlpg.name, wlpg.source) == ("Grandma", RegionSource.mp)
    assert wlpg.box == pytest.approx(GRANDMA)
    done = write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": [face(list(GRANDMA), "Alice")]})
    assert "kept 'Grandma'" in done.notes[0]
    assert names(sidecar) == ["Grandma"]


def test_our_region_renamed_by_a_person_is_theirs(tmp_path: Path):
    sidecar = write_xmp(tmp_path / "a.jpg", IMAGE).path
    assert sidecar is not None
    text = sidecar.read_text(encoding="utf-8")
    sidecar.write_text(text.replace("<mwg-rs:Name>Alice<", "<mwg-rs:Name>Alicia<"), "utf-8")
    (renamed,) = read_regions(sidecar, SIZE)  # our Microsoft copy does not count
    assert (renamed.name, renamed.source) == ("Alicia", RegionSource.renamed)
    done = write_xmp(tmp_path / "a.jpg", IMAGE)
    assert "kept 'Alicia'" in done.notes[0]
    assert names(sidecar) == ["Alicia"]  # not replaced, and no second region on the face
    after = sidecar.read_text(encoding="utf-8")
    assert "<facetag:Person>Alice</facetag:Person>" in after  # their region, untouched
    assert "PersonDisplayName>Alice<" not in after  # our Microsoft twin went
    assert "<rdf:li>Alice</rdf:li>" not in after  # and our keyword


# Other tools' layouts: every valid RDF form of the same region, kept as it was.

HEAD = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<!-- written by OtherTool -->\n'
TAIL = '<?xpacket end="w"?>\n'
RDF_OPEN = '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
XMLNS = (
    'xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/" '
    'xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#" '
    'xmlns:stDim="http://ns.adobe.com/xap/1.0/sType/Dimensions#" '
    'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
)
SUBJECT = "<dc:subject><rdf:Bag><rdf:li>holiday</rdf:li></rdf:Bag></dc:subject>"
AREA = 'stArea:x="0.1" stArea:y="0.1" stArea:w="0.05" stArea:h="0.05" stArea:unit="normalized"'
LAYOUTS = {
    # Struct fields as elements (rdf:parseType="Resource"), the list an rdf:Bag.
    "parse-type-resource-bag": f"""{HEAD}<x:xmpmeta xmlns:x="adobe:ns:meta/">
 {RDF_OPEN}
  <rdf:Description rdf:about="" {XMLNS} xmp:Rating="4">
   {SUBJECT}
  </rdf:Description>
  <?other-tool keep="this"?>
  <rdf:Description rdf:about="" {XMLNS}>
   <mwg-rs:Regions rdf:parseType="Resource">
    <mwg-rs:AppliedToDimensions rdf:parseType="Resource">
     <stDim:w>400</stDim:w><stDim:h>200</stDim:h><stDim:unit>pixel</stDim:unit>
    </mwg-rs:AppliedToDimensions>
    <mwg-rs:RegionList><rdf:Bag>
     <rdf:li rdf:parseType="Resource"><mwg-rs:Name>Grandma</mwg-rs:Name>
      <mwg-rs:Type>Face</mwg-rs:Type>
      <mwg-rs:Area {AREA}/></rdf:li>
    </rdf:Bag></mwg-rs:RegionList>
   </mwg-rs:Regions>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
{TAIL}""",
    # Every struct as a nested rdf:Description (how the Adobe XMP Toolkit can write them).
    "nested-descriptions": f"""{HEAD}<x:xmpmeta xmlns:x="adobe:ns:meta/">
 {RDF_OPEN}
  <rdf:Description rdf:about="" {XMLNS} xmp:Rating="4">
   {SUBJECT}
   <!-- faces below -->
   <mwg-rs:Regions>
    <rdf:Description>
     <mwg-rs:AppliedToDimensions>
      <rdf:Description stDim:w="400" stDim:h="200" stDim:unit="pixel"/>
     </mwg-rs:AppliedToDimensions>
     <mwg-rs:RegionList>
      <rdf:Bag>
       <rdf:li>
        <rdf:Description mwg-rs:Name="Grandma" mwg-rs:Type="Face">
         <mwg-rs:Area><rdf:Description {AREA}/></mwg-rs:Area>
        </rdf:Description>
       </rdf:li>
      </rdf:Bag>
     </mwg-rs:RegionList>
    </rdf:Description>
   </mwg-rs:Regions>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
{TAIL}""",
    # The region list as an rdf:Seq.
    "seq-list": f"""{HEAD}<x:xmpmeta xmlns:x="adobe:ns:meta/">
 {RDF_OPEN}
  <rdf:Description rdf:about="" {XMLNS} xmp:Rating="4">
   {SUBJECT}
   <mwg-rs:Regions rdf:parseType="Resource">
    <mwg-rs:RegionList>
     <rdf:Seq>
      <rdf:li rdf:parseType="Resource">
       <mwg-rs:Name>Grandma</mwg-rs:Name><mwg-rs:Type>Face</mwg-rs:Type>
       <mwg-rs:Area {AREA}/>
      </rdf:li>
     </rdf:Seq>
    </mwg-rs:RegionList>
   </mwg-rs:Regions>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
{TAIL}""",
    # Simple fields as attributes, the dimensions as the empty-element shorthand.
    "attribute-shorthand": f"""{HEAD}<x:xmpmeta xmlns:x="adobe:ns:meta/">
 {RDF_OPEN}
  <rdf:Description rdf:about="" {XMLNS} xmp:Rating="4">
   {SUBJECT}
   <mwg-rs:Regions rdf:parseType="Resource">
    <mwg-rs:AppliedToDimensions stDim:w="400" stDim:h="200" stDim:unit="pixel"/>
    <mwg-rs:RegionList><rdf:Bag><rdf:li><rdf:Description mwg-rs:Name="Grandma"
      mwg-rs:Type="Face"><mwg-rs:Area {AREA}/></rdf:Description></rdf:li></rdf:Bag>
    </mwg-rs:RegionList>
   </mwg-rs:Regions>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
{TAIL}""",
    # rdf:RDF as the root, an XML declaration, no packet wrapper, prefixes of its own.
    "rdf-root-own-prefixes": f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- written by OtherTool -->
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <?other-tool keep="this"?>
 <rdf:Description rdf:about="" xmlns:r="http://www.metadataworkinggroup.com/schemas/regions/"
   xmlns:a="http://ns.adobe.com/xmp/sType/Area#" xmlns:dc="http://purl.org/dc/elements/1.1/"
   xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="4">
  {SUBJECT}
  <r:Regions rdf:parseType="Resource">
   <r:RegionList><rdf:Bag><rdf:li rdf:parseType="Resource"><r:Name>Grandma</r:Name>
    <r:Type>Face</r:Type><r:Area a:x="0.1" a:y="0.1" a:w="0.05" a:h="0.05"
    a:unit="normalized"/></rdf:li></rdf:Bag></r:RegionList>
  </r:Regions>
 </rdf:Description>
</rdf:RDF>
""",
}
WLPG = f"""{HEAD}<x:xmpmeta xmlns:x="adobe:ns:meta/">
 {RDF_OPEN}
  <rdf:Description rdf:about="" xmlns:MP="http://ns.microsoft.com/photo/1.2/"
    xmlns:MPRI="http://ns.microsoft.com/photo/1.2/t/RegionInfo#"
    xmlns:MPReg="http://ns.microsoft.com/photo/1.2/t/Region#">
   <MP:RegionInfo rdf:parseType="Resource"><MPRI:Regions><rdf:Bag>
    <rdf:li MPReg:PersonDisplayName="Grandma" MPReg:Rectangle="0.075, 0.075, 0.05, 0.05"/>
   </rdf:Bag></MPRI:Regions></MP:RegionInfo>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
{TAIL}"""

OURS = ("RegionInfo", "RegionInfoMP", "Subject", "HierarchicalSubject", "TagsList", "Keywords")


def grandma_node(sidecar: Path) -> bytes:
    """Grandma's list item, canonicalised, as the file holds it."""
    root = etree.parse(str(sidecar)).getroot()
    mwg = NS["mwg-rs"]
    (li,) = [
        li
        for li in root.iter(f"{{{NS['rdf']}}}li")
        if "Grandma" in etree.tostring(li, encoding="unicode")
        and li.getparent().getparent().tag == f"{{{mwg}}}RegionList"
    ]
    return bytes(etree.tostring(li, method="c14n"))


def region_lists(sidecar: Path) -> list[int]:
    """For each RegionList: how many arrays it holds (one is valid XMP)."""
    root = etree.parse(str(sidecar)).getroot()
    lists = root.iter(f"{{{NS['mwg-rs']}}}RegionList")
    return [sum(1 for c in rl if etree.QName(c).localname in ("Bag", "Seq", "Alt")) for rl in lists]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_merge_keeps_other_tools_regions_in_every_layout(tmp_path: Path, layout: str):
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_text(LAYOUTS[layout], encoding="utf-8")
    (theirs,) = read_regions(sidecar, SIZE)
    assert (theirs.name, theirs.source) == ("Grandma", RegionSource.mwg)
    assert theirs.box == pytest.approx(GRANDMA)
    node = grandma_node(sidecar)
    write_xmp(tmp_path / "a.jpg", IMAGE)
    text = sidecar.read_text(encoding="utf-8")
    assert "<!-- written by OtherTool -->" in text
    if "other-tool" in LAYOUTS[layout]:
        assert '<?other-tool keep="this"?>' in text
    if "<!-- faces below -->" in LAYOUTS[layout]:
        assert "<!-- faces below -->" in text
    assert region_lists(sidecar) == [1]  # our region joined their list, no second list
    assert grandma_node(sidecar) == node  # their region, as it was
    assert names(sidecar) == ["Alice", "Grandma"]
    if layout.startswith("rdf-root"):
        assert text.startswith("<?xml")
        assert "<r:Name>Grandma</r:Name>" in text
        assert "<r:Name>Alice</r:Name>" in text  # their prefix, used for ours too
    twice = text
    write_xmp(tmp_path / "a.jpg", IMAGE)
    assert sidecar.read_text(encoding="utf-8") == twice  # nothing changed, nothing written
    write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": []})
    assert names(sidecar) == ["Grandma"]
    assert grandma_node(sidecar) == node
    assert "<!-- written by OtherTool -->" in sidecar.read_text(encoding="utf-8")


@needs_exiftool
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_exiftool_reads_every_layout_after_the_merge(tmp_path: Path, layout: str):
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_text(LAYOUTS[layout], encoding="utf-8")
    before = exiftool(sidecar, "-XMP:all")
    write_xmp(tmp_path / "a.jpg", IMAGE)
    after = exiftool(sidecar, "-XMP:all")
    listed = after["RegionInfo"]["RegionList"]
    assert listed[: len(before["RegionInfo"]["RegionList"])] == before["RegionInfo"]["RegionList"]
    assert [r.get("Name") for r in listed] == ["Grandma", "Alice"]
    assert after["Subject"] == ["holiday", "Alice"]
    assert after["Rating"] == 4
    drop = {"SourceFile", *OURS}
    assert {k: v for k, v in after.items() if k not in drop} == {
        k: v for k, v in before.items() if k not in drop
    }


# Sidecars we do not touch.


def test_invalid_sidecar_is_reported_and_left_untouched(tmp_path: Path):
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_bytes(b"<x:xmpmeta><unclosed>")
    with pytest.raises(DataError, match=r"a\.jpg\.xmp: expected an XMP sidecar, got invalid XML"):
        write_xmp(tmp_path / "a.jpg", IMAGE)
    assert sidecar.read_bytes() == b"<x:xmpmeta><unclosed>"
    sidecar.write_bytes(b"<html/>")
    with pytest.raises(DataError, match=r"expected an XMP sidecar .* got <html>; left unchanged"):
        write_xmp(tmp_path / "a.jpg", IMAGE)
    assert sidecar.read_bytes() == b"<html/>"


def test_sidecar_with_entities_is_refused_not_expanded(tmp_path: Path):
    sidecar = tmp_path / "a.jpg.xmp"
    lol = (
        b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>\n'
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">&c;</rdf:RDF></x:xmpmeta>\n'
    )
    sidecar.write_bytes(lol)
    with pytest.raises(DataError, match="expected an XMP sidecar without a DOCTYPE"):
        write_xmp(tmp_path / "a.jpg", IMAGE)
    assert sidecar.read_bytes() == lol


def test_our_regions_leave_the_sidecar_of_the_other_name(tmp_path: Path):
    photo = tmp_path / "a.jpg"
    mixed = tmp_path / "a.xmp"  # an earlier run's photo.xmp, with a region of Lightroom's
    mixed.write_text(LAYOUTS["parse-type-resource-bag"], encoding="utf-8")
    write_xmp(photo, IMAGE, naming=SidecarName.stem)
    assert names(mixed) == ["Alice", "Grandma"]
    only_ours = write_xmp(tmp_path / "b.jpg", IMAGE, naming=SidecarName.stem).path
    done = write_xmp(photo, IMAGE)  # now as photo.jpg.xmp
    assert names(tmp_path / "a.jpg.xmp") == ["Alice"]
    assert names(mixed) == ["Grandma"]  # theirs stays, our stale copy went
    assert "holiday" in mixed.read_text(encoding="utf-8")
    assert done.notes == []
    write_xmp(tmp_path / "b.jpg", IMAGE)
    assert only_ours is not None
    assert not only_ours.exists()  # nothing but ours was in it
    old = tmp_path / "c.xmp"  # as facetag wrote them before photo.jpg.xmp was the default
    old.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        'rdf:about="" xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/" '
        'xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#" '
        'xmlns:facetag="https://github.com/facetag/facetag/ns/1.0/"><mwg-rs:Regions '
        'rdf:parseType="Resource"><mwg-rs:RegionList><rdf:Bag><rdf:li '
        'rdf:parseType="Resource"><mwg-rs:Name>Alice</mwg-rs:Name><mwg-rs:Area '
        'stArea:x="0.3" stArea:y="0.45" stArea:w="0.1" stArea:h="0.4"/>'
        "<facetag:Source>facetag</facetag:Source></rdf:li></rdf:Bag></mwg-rs:RegionList>"
        "</mwg-rs:Regions></rdf:Description></rdf:RDF></x:xmpmeta>",
        encoding="utf-8",
    )
    write_xmp(tmp_path / "c.jpg", IMAGE)
    assert names(tmp_path / "c.jpg.xmp") == ["Alice"]
    assert not old.exists()


def test_unreadable_twin_sidecar_is_a_note_and_ours_is_written(tmp_path: Path):
    (tmp_path / "a.xmp").write_bytes(b"<broken")
    done = write_xmp(tmp_path / "a.jpg", IMAGE)
    assert done.path == tmp_path / "a.jpg.xmp"
    (note,) = done.notes
    assert note.startswith(NOTE)
    assert "a.xmp: expected an XMP sidecar, got invalid XML" in note
    assert (tmp_path / "a.xmp").read_bytes() == b"<broken"


def test_next_run_replaces_our_regions_and_leaves_no_empty_blocks(tmp_path: Path):
    photo = tmp_path / "a.jpg"
    sidecar = write_xmp(photo, IMAGE).path
    assert sidecar is not None
    write_xmp(photo, {**IMAGE, "faces": [face(ALICE, "Alicia")]})  # facetag's new answer
    assert names(sidecar) == ["Alicia"]
    assert "<rdf:li>Alice</rdf:li>" not in sidecar.read_text(encoding="utf-8")
    write_xmp(photo, {**IMAGE, "faces": []})
    text = sidecar.read_text(encoding="utf-8")
    for gone in ("Regions", "RegionInfo", "subject", "hierarchicalSubject", "TagsList", "Keyw"):
        assert gone not in text
    assert read_regions(sidecar, SIZE) == []
