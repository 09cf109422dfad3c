"""Outputs of `tag`: JSON/CSV shape, XMP sidecars (merge, invalid, exiftool), annotated."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from facetag.errors import DataError
from facetag.inference.writers import (
    CSV_COLUMNS,
    annotate,
    csv_text,
    read_regions,
    sidecar_path,
    write_xmp,
)

IMAGE = {
    "path": "p/a.jpg",
    "width": 400,
    "height": 200,
    "faces": [
        {
            "box": [100.0, 50.0, 140.0, 130.0],
            "score": 0.9,
            "name": "Alice",
            "distance": 0.1,
            "confidence": 0.8,
        },
        {
            "box": [300.0, 20.0, 350.0, 80.0],
            "score": 0.8,
            "name": None,
            "distance": 0.9,
            "confidence": 0.6,
        },
    ],
}

FOREIGN = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="4">
   <dc:subject><rdf:Bag><rdf:li>holiday</rdf:li></rdf:Bag></dc:subject>
  </rdf:Description>
  <rdf:Description rdf:about=""
    xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/"
    xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#">
   <mwg-rs:Regions rdf:parseType="Resource">
    <mwg-rs:RegionList><rdf:Bag>
     <rdf:li rdf:parseType="Resource"><mwg-rs:Name>Grandma</mwg-rs:Name>
      <mwg-rs:Type>Face</mwg-rs:Type>
      <mwg-rs:Area stArea:x="0.1" stArea:y="0.1" stArea:w="0.05" stArea:h="0.05"
        stArea:unit="normalized"/></rdf:li>
    </rdf:Bag></mwg-rs:RegionList>
   </mwg-rs:Regions>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def test_csv_has_one_row_per_face():
    rows = list(csv.reader(io.StringIO(csv_text([IMAGE, {**IMAGE, "faces": []}]))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[1] == ["p/a.jpg", "100.0", "50.0", "140.0", "130.0", "0.9", "Alice", "0.1", "0.8"]
    assert rows[2][6] == ""  # unknown
    assert len(rows) == 3


def test_xmp_regions_are_named_faces_normalised(tmp_path: Path):
    photo = tmp_path / "a.jpg"
    sidecar = write_xmp(photo, IMAGE)
    assert sidecar == tmp_path / "a.xmp"
    assert not photo.exists()  # the photo itself is never written
    (r,) = read_regions(sidecar)
    assert r == {"name": "Alice", "x": 0.3, "y": 0.45, "w": 0.1, "h": 0.4}


def test_xmp_without_named_faces_writes_nothing(tmp_path: Path):
    assert write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": IMAGE["faces"][1:]}) is None
    assert not (tmp_path / "a.xmp").exists()


def test_xmp_merge_keeps_foreign_content_and_replaces_ours(tmp_path: Path):
    sidecar = tmp_path / "a.jpg.xmp"  # digiKam naming: used because it exists
    sidecar.write_text(FOREIGN, encoding="utf-8")
    assert sidecar_path(tmp_path / "a.jpg") == sidecar
    write_xmp(tmp_path / "a.jpg", IMAGE)
    renamed = {**IMAGE, "faces": [{**IMAGE["faces"][0], "name": "Alicia"}]}
    write_xmp(tmp_path / "a.jpg", renamed)  # a second run replaces our region, no duplicate
    text = sidecar.read_text(encoding="utf-8")
    assert 'xmp:Rating="4"' in text
    assert "<rdf:li>holiday</rdf:li>" in text
    assert sorted(r["name"] for r in read_regions(sidecar)) == ["Alicia", "Grandma"]


def test_photos_sharing_a_stem_get_a_sidecar_each(tmp_path: Path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("notes")  # not an image: no clash
    assert sidecar_path(tmp_path / "a.jpg") == tmp_path / "a.jpg.xmp"
    assert sidecar_path(tmp_path / "a.png") == tmp_path / "a.png.xmp"
    assert sidecar_path(tmp_path / "b.jpg") == tmp_path / "b.xmp"
    write_xmp(tmp_path / "a.jpg", IMAGE)
    other = {**IMAGE, "faces": [{**IMAGE["faces"][0], "name": "Bob"}]}
    write_xmp(tmp_path / "a.png", other)
    assert [r["name"] for r in read_regions(tmp_path / "a.jpg.xmp")] == ["Alice"]
    assert [r["name"] for r in read_regions(tmp_path / "a.png.xmp")] == ["Bob"]
    assert not (tmp_path / "a.xmp").exists()


def test_regions_block_goes_when_no_named_face_is_left(tmp_path: Path):
    sidecar = tmp_path / "a.jpg.xmp"
    sidecar.write_text(FOREIGN, encoding="utf-8")
    foreign = read_regions(sidecar)
    write_xmp(tmp_path / "a.jpg", IMAGE)
    write_xmp(tmp_path / "a.jpg", {**IMAGE, "faces": IMAGE["faces"][1:]})  # Alice gone
    assert read_regions(sidecar) == foreign  # someone else's regions stay
    alone = tmp_path / "b.xmp"
    write_xmp(tmp_path / "b.jpg", IMAGE)
    write_xmp(tmp_path / "b.jpg", {**IMAGE, "faces": IMAGE["faces"][1:]})
    text = alone.read_text(encoding="utf-8")
    assert "Regions" not in text
    assert "RegionList" not in text
    assert read_regions(alone) == []


def test_invalid_sidecar_is_reported_and_left_untouched(tmp_path: Path):
    sidecar = tmp_path / "a.xmp"
    sidecar.write_bytes(b"<x:xmpmeta><unclosed>")
    with pytest.raises(DataError, match=r"a\.xmp: expected an XMP sidecar, got invalid XML"):
        write_xmp(tmp_path / "a.jpg", IMAGE)
    assert sidecar.read_bytes() == b"<x:xmpmeta><unclosed>"
    sidecar.write_bytes(b"<html/>")
    with pytest.raises(DataError, match=r"expected an XMP sidecar .* got <html>; left unchanged"):
        write_xmp(tmp_path / "a.jpg", IMAGE)
    assert sidecar.read_bytes() == b"<html/>"


def test_annotate_draws_boxes():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    out = annotate(img, IMAGE, scale=0.5)
    assert out.size == (200, 100)
    assert out.getpixel((50, 45)) != (0, 0, 0)  # Alice's left edge at x = 100 * 0.5
    assert img.getpixel((50, 45)) == (0, 0, 0)  # the input is not drawn on


def test_json_of_tag_is_detect_json_plus_names():
    from facetag.inference.writers import to_json

    doc = json.loads(to_json({"device": "cpu", "model": {}, "images": [IMAGE]}))
    assert set(doc["images"][0]["faces"][0]) == {"box", "score", "name", "distance", "confidence"}


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed")
def test_exiftool_reads_our_regions(tmp_path: Path):
    sidecar = tmp_path / "a.xmp"
    sidecar.write_text(FOREIGN, encoding="utf-8")
    two = {**IMAGE, "faces": [IMAGE["faces"][0], {**IMAGE["faces"][1], "name": "Bob"}]}
    write_xmp(tmp_path / "a.jpg", two)
    out = subprocess.run(
        ["exiftool", "-j", "-struct", "-XMP:all", str(sidecar)],
        capture_output=True,
        text=True,
        check=True,
    )
    (info,) = json.loads(out.stdout)
    region = info["RegionInfo"]
    assert region["AppliedToDimensions"] == {"W": 400, "H": 200, "Unit": "pixel"}
    by_name = {r["Name"]: r["Area"] for r in region["RegionList"]}
    assert set(by_name) == {"Grandma", "Alice", "Bob"}
    assert by_name["Alice"] == {"X": 0.3, "Y": 0.45, "W": 0.1, "H": 0.4, "Unit": "normalized"}
    assert by_name["Bob"] == {"X": 0.8125, "Y": 0.25, "W": 0.125, "H": 0.3, "Unit": "normalized"}
    assert info["Rating"] == 4
    assert info["Subject"] == ["holiday"]
