"""`tag_photos` end to end with a fake detector: naming, outputs, resume, bad inputs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from facetag.errors import DataError
from facetag.inference.align import WholePhotoDetector
from facetag.inference.enroll import enroll
from facetag.inference.gallery import load_gallery
from facetag.inference.manifest import Manifest
from facetag.inference.tag import TagOptions, tag_photos
from facetag.inference.xmp import NOTE, SidecarName, read_regions
from tests.inference.conftest import (
    FakeDetector,
    make_models,
    pattern,
    save,
    side_by_side,
)

HALVES = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]  # two faces, side by side


@pytest.fixture
def gallery(tmp_path: Path, model_file: Path, people: Path) -> Path:
    enroll(people, tmp_path / "g.json", make_models(model_file, WholePhotoDetector()))
    return tmp_path / "g.json"


def two_face_models(model_file: Path):
    return make_models(model_file, FakeDetector(HALVES))


def write_library(folder: Path, n: int) -> list[Path]:
    """n photos of two faces: Alice + Bob, Bob + a stranger, ..."""
    pairs = [(1, 2), (2, 5), (6, 1), (7, 8)]
    return [
        save(folder / f"{k:02d}.png", side_by_side(*(pattern(s) for s in pairs[k % 4])))
        for k in range(n)
    ]


def test_two_faces_are_named_jointly(tmp_path: Path, model_file: Path, gallery: Path):
    photos = write_library(tmp_path / "lib", 4)
    save(tmp_path / "lib" / "twins.png", side_by_side(pattern(1), pattern(1)))
    run = tag_photos(
        [tmp_path / "lib"], gallery, two_face_models(model_file), TagOptions(margin=0.0)
    )
    names = {Path(im["path"]).name: [f["name"] for f in im["faces"]] for im in run.doc["images"]}
    assert names == {
        "00.png": ["Alice", "Bob"],
        "01.png": ["Bob", None],
        "02.png": [None, "Alice"],
        "03.png": [None, None],
        "twins.png": names["twins.png"],
    }
    assert sorted(map(str, names["twins.png"])) == ["Alice", "None"]  # one Alice, never two
    assert run.doc["device"] == "cpu"
    m = run.doc["model"]
    assert m["detector"] == "fake-detector"
    assert m["run_ids"]["embedder"] == "run123"
    assert m["threshold"] == 1e-3
    face = run.doc["images"][0]["faces"][1]
    assert face["box"] == [32.0, 0.0, 64.0, 32.0]
    assert 0.0 <= face["confidence"] <= 1.0
    assert len(photos) == 4


def test_outputs_csv_xmp_annotated(tmp_path: Path, model_file: Path, gallery: Path):
    write_library(tmp_path / "lib", 2)
    opts = TagOptions(
        margin=0.0, csv=tmp_path / "out" / "tags.csv", xmp=True, annotate=tmp_path / "annotated"
    )
    run = tag_photos([tmp_path / "lib"], gallery, two_face_models(model_file), opts)
    assert run.failed == 0
    rows = list(csv.DictReader((tmp_path / "out" / "tags.csv").open()))
    assert [r["name"] for r in rows] == ["Alice", "Bob", "Bob", ""]
    regions = read_regions(tmp_path / "lib" / "00.png.xmp", (64, 32))
    assert sorted(str(r.name) for r in regions) == ["Alice", "Bob"]
    assert [r.name for r in read_regions(tmp_path / "lib" / "01.png.xmp", (64, 32))] == ["Bob"]
    assert (tmp_path / "annotated" / "00.png.jpg").is_file()
    assert (tmp_path / "out" / "facetag-manifest.jsonl").is_file()


def records(manifest: Path) -> list[dict]:
    lines = manifest.read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


def test_resume_after_abort_and_torn_line(tmp_path: Path, model_file: Path, gallery: Path):
    write_library(tmp_path / "lib", 6)
    opts = TagOptions(margin=0.0, batch_size=1, csv=tmp_path / "tags.csv", xmp=True)
    models = two_face_models(model_file)

    class Killed(Exception):
        pass

    def die_after_three(p):
        if p.done == 3:
            raise Killed

    with pytest.raises(Killed):
        tag_photos([tmp_path / "lib"], gallery, models, opts, progress=die_after_three)
    manifest = tmp_path / "facetag-manifest.jsonl"
    assert len(records(manifest)) == 3
    with manifest.open("ab") as f:
        f.write(b'{"path": "' + str(tmp_path / "lib" / "03.png").encode() + b'", "sha2')
    run = tag_photos([tmp_path / "lib"], gallery, models, opts)
    assert (run.tagged, run.resumed) == (3, 3)
    paths = [im["path"] for im in run.doc["images"]]
    assert paths == sorted(set(paths))
    assert len(paths) == 6
    rows = list(csv.DictReader((tmp_path / "tags.csv").open()))
    assert len(rows) == 12
    recs = records(manifest)
    assert sorted(r["path"] for r in recs) == sorted({r["path"] for r in recs})
    assert len(recs) == 6
    # Changed content, then a changed threshold: only what changed is redone.
    save(tmp_path / "lib" / "05.png", side_by_side(pattern(2), pattern(1)))
    run = tag_photos([tmp_path / "lib"], gallery, models, opts)
    assert (run.tagged, run.resumed) == (1, 5)
    assert [f["name"] for f in run.doc["images"][5]["faces"]] == ["Bob", "Alice"]
    models.threshold = 2e-3
    run = tag_photos([tmp_path / "lib"], gallery, models, opts)
    assert (run.tagged, run.resumed) == (6, 0)


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from facetag.inference.tag import TagOptions, tag_photos
from tests.inference.conftest import FakeDetector, make_models

class Slow(FakeDetector):
    def detect(self, image):
        time.sleep(0.15)
        return super().detect(image)

models = make_models(Path({model!r}), Slow({halves!r}))
tag_photos([Path({lib!r})], Path({gallery!r}), models,
           TagOptions(margin=0.0, batch_size=1, csv=Path({csv!r}), xmp=True))
"""


def test_kill_9_then_rerun_gives_complete_output(tmp_path: Path, model_file: Path, gallery: Path):
    write_library(tmp_path / "lib", 12)
    csv_path = tmp_path / "tags.csv"
    script = KILL_SCRIPT.format(
        root=str(Path(__file__).parents[2]),
        model=str(model_file),
        halves=HALVES,
        lib=str(tmp_path / "lib"),
        gallery=str(gallery),
        csv=str(csv_path),
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    manifest = tmp_path / "facetag-manifest.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not csv_path.exists()  # written only at the end
    run = tag_photos(
        [tmp_path / "lib"],
        gallery,
        two_face_models(model_file),
        TagOptions(margin=0.0, csv=csv_path, xmp=True),
    )
    assert run.resumed >= 3
    assert run.tagged + run.resumed == 12
    rows = list(csv.DictReader(csv_path.open()))
    assert sorted({r["path"] for r in rows}) == sorted(
        str(tmp_path / "lib" / f"{k:02d}.png") for k in range(12)
    )
    assert len(rows) == 24
    for k in range(12):
        sidecar = tmp_path / "lib" / f"{k:02d}.png.xmp"
        if k % 4 == 3:
            assert not sidecar.exists()  # nobody known in it
        else:
            regions = read_regions(sidecar, (64, 32))  # parses: never half written
            assert len(regions) == len({r.name for r in regions})


def test_bad_photos_give_one_line_each_and_the_run_goes_on(
    tmp_path: Path, model_file: Path, gallery: Path
):
    lib = tmp_path / "lib"
    write_library(lib, 1)
    good = (lib / "00.png").read_bytes()
    (lib / "truncated.png").write_bytes(good[: len(good) // 2])
    (lib / "text.jpg").write_text("not an image")
    (lib / "empty.jpg").write_bytes(b"")
    (lib / "01.png.xmp").mkdir()  # a sidecar that cannot be read
    save(lib / "01.png", side_by_side(pattern(1), pattern(2)))
    lines: list[str] = []
    run = tag_photos(
        [lib],
        gallery,
        two_face_models(model_file),
        TagOptions(margin=0.0, xmp=True, manifest=tmp_path / "m.jsonl"),
        on_message=lines.append,
    )
    assert run.failed == 4
    assert len(lines) == 4
    assert all("\n" not in line for line in lines)
    assert sum("01.png.xmp: expected a readable XMP sidecar" in line for line in lines) == 1
    assert sum("truncated" in line for line in lines) == 1
    assert sum("not one" in line for line in lines) == 1
    assert sum("empty file" in line for line in lines) == 1
    assert [Path(im["path"]).name for im in run.doc["images"]] == ["00.png", "01.png"]
    assert len(run.doc["errors"]) == 4


def test_workers_decode_the_same_results(tmp_path: Path, model_file: Path, gallery: Path):
    write_library(tmp_path / "lib", 5)
    models = two_face_models(model_file)
    a = tag_photos([tmp_path / "lib"], gallery, models, TagOptions(margin=0.0, resume=False))
    b = tag_photos(
        [tmp_path / "lib"],
        gallery,
        models,
        TagOptions(margin=0.0, resume=False, workers=2, batch_size=3),
    )
    assert a.doc["images"] == b.doc["images"]


def test_unwritable_output_folder_fails_before_any_work(
    tmp_path: Path, model_file: Path, gallery: Path
):
    write_library(tmp_path / "lib", 1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"expected a writable folder for annotated copies"):
        tag_photos(
            [tmp_path / "lib"],
            gallery,
            two_face_models(model_file),
            TagOptions(annotate=tmp_path / "file" / "out"),
        )
    with pytest.raises(DataError, match=r"expected a folder other than the photos' own"):
        tag_photos(
            [tmp_path / "lib"],
            gallery,
            two_face_models(model_file),
            TagOptions(annotate=tmp_path / "lib"),
        )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path: Path, model_file: Path, gallery: Path):
    write_library(tmp_path / "lib", 1)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(DataError, match=r"out: expected a writable folder for the CSV"):
            tag_photos(
                [tmp_path / "lib"],
                gallery,
                two_face_models(model_file),
                TagOptions(csv=out / "t.csv"),
            )
    finally:
        out.chmod(0o700)


def test_manifest_that_is_not_ours_is_left_untouched(
    tmp_path: Path, model_file: Path, gallery: Path
):
    write_library(tmp_path / "lib", 1)
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    with pytest.raises(DataError, match=r"expected a facetag tagging manifest"):
        tag_photos(
            [tmp_path / "lib"], gallery, two_face_models(model_file), TagOptions(manifest=other)
        )
    assert other.read_text() == "my notes\n"
    assert Manifest.open(tmp_path / "new.jsonl").records == {}
    assert load_gallery(gallery).photos() == 2


def test_manifest_without_output_folder_goes_to_the_cache_not_the_current_folder(
    tmp_path: Path, model_file: Path, gallery: Path, monkeypatch: pytest.MonkeyPatch
):
    write_library(tmp_path / "lib", 2)
    monkeypatch.chdir(tmp_path / "lib")
    first = tag_photos([tmp_path / "lib"], gallery, two_face_models(model_file))
    assert not list(Path.cwd().glob("*.jsonl"))  # nothing left where the run was started
    assert first.manifest is not None
    assert Path(os.environ["XDG_CACHE_HOME"]) in first.manifest.parents
    again = tag_photos([tmp_path / "lib"], gallery, two_face_models(model_file))
    assert (again.manifest, again.resumed, again.tagged) == (first.manifest, 2, 0)


def test_progress_rate_counts_only_photos_tagged_in_this_run(
    tmp_path: Path, model_file: Path, gallery: Path
):
    write_library(tmp_path / "lib", 4)
    opts = TagOptions(csv=tmp_path / "tags.csv")
    tag_photos([tmp_path / "lib"], gallery, two_face_models(model_file), opts)
    write_library(tmp_path / "lib", 5)  # one new photo, four finished ones
    seen = []
    tag_photos([tmp_path / "lib"], gallery, two_face_models(model_file), opts, progress=seen.append)
    assert [p.done for p in seen] == [1, 2, 3, 4, 5]
    assert all(p.figures["photos/s"] == 0.0 for p in seen[:4])  # resumed: no rate at all
    assert 0 < seen[-1].figures["photos/s"] < 1e4  # one photo's real rate, not 5 / ~0 s


def test_rotated_photo_gets_regions_on_its_stored_image(
    tmp_path: Path, model_file: Path, gallery: Path
):
    shown = side_by_side(pattern(1), pattern(2))  # Alice | Bob, 64x32 as displayed
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # 32x64 in the file
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise, as a phone held upright writes
    (tmp_path / "lib").mkdir()
    stored.save(tmp_path / "lib" / "phone.png", exif=exif)
    run = tag_photos(
        [tmp_path / "lib"], gallery, two_face_models(model_file), TagOptions(margin=0.0, xmp=True)
    )
    assert [f["name"] for f in run.doc["images"][0]["faces"]] == ["Alice", "Bob"]
    sidecar = tmp_path / "lib" / "phone.png.xmp"
    text = sidecar.read_text(encoding="utf-8")
    assert "<stDim:w>32</stDim:w>" in text  # the stored width
    assert "<stDim:h>64</stDim:h>" in text
    regions = {r.name: r.box for r in read_regions(sidecar, (64, 32), orientation=6)}
    assert regions["Alice"] == pytest.approx((0.0, 0.0, 32.0, 32.0))
    assert regions["Bob"] == pytest.approx((32.0, 0.0, 64.0, 32.0))
    # Alice is the left half as shown: the bottom half of the stored image (x = 0.5 of 32,
    # y = 0.75 of 64, as MWG's centre and size).
    assert 'stArea:x="0.5" stArea:y="0.75" stArea:w="1" stArea:h="0.5"' in text


def test_name_kept_in_a_sidecar_is_a_note_not_a_failure(
    tmp_path: Path, model_file: Path, gallery: Path
):
    write_library(tmp_path / "lib", 1)  # 00.png: Alice | Bob
    theirs = tmp_path / "lib" / "00.png.xmp"
    theirs.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        'xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/" '
        'xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#"><mwg-rs:Regions '
        'rdf:parseType="Resource"><mwg-rs:RegionList><rdf:Seq><rdf:li '
        'rdf:parseType="Resource"><mwg-rs:Name>Grandma</mwg-rs:Name><mwg-rs:Area '
        'stArea:x="0.25" stArea:y="0.5" stArea:w="0.5" stArea:h="1"/></rdf:li></rdf:Seq>'
        "</mwg-rs:RegionList></mwg-rs:Regions></rdf:Description></rdf:RDF></x:xmpmeta>",
        encoding="utf-8",
    )
    lines: list[str] = []
    run = tag_photos(
        [tmp_path / "lib"],
        gallery,
        two_face_models(model_file),
        TagOptions(margin=0.0, xmp=True),
        on_message=lines.append,
    )
    assert run.failed == 0
    (line,) = lines
    assert line.startswith(NOTE)
    assert "kept 'Grandma' from 00.png.xmp" in line
    assert "facetag says 'Alice'" in line
    assert sorted(str(r.name) for r in read_regions(theirs, (64, 32))) == ["Bob", "Grandma"]


def test_other_sidecar_options_write_the_sidecars_again(
    tmp_path: Path, model_file: Path, gallery: Path
):
    write_library(tmp_path / "lib", 2)  # 01.png: Bob and a stranger
    models = two_face_models(model_file)
    first = tag_photos([tmp_path / "lib"], gallery, models, TagOptions(margin=0.0, xmp=True))
    assert first.tagged == 2
    assert [r.name for r in read_regions(tmp_path / "lib" / "01.png.xmp", (64, 32))] == ["Bob"]
    opts = TagOptions(margin=0.0, xmp=True, xmp_unknown=True, sidecar_name=SidecarName.stem)
    again = tag_photos([tmp_path / "lib"], gallery, models, opts)
    assert (again.tagged, again.resumed) == (2, 0)
    regions = read_regions(tmp_path / "lib" / "01.xmp", (64, 32))
    assert [r.name for r in regions] == ["Bob", None]
    assert not (tmp_path / "lib" / "01.png.xmp").exists()  # only ours, gone: no stale copy
    third = tag_photos([tmp_path / "lib"], gallery, models, opts)
    assert (third.tagged, third.resumed) == (0, 2)
