"""The gallery file and `enroll`: round trip, incremental enrolment, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facetag.errors import DataError, ModelError
from facetag.inference.align import WholePhotoDetector
from facetag.inference.enroll import enroll
from facetag.inference.gallery import load_gallery, save_gallery
from facetag.inference.tag import tag_photos
from tests.inference.conftest import FakeDetector, make_models, pattern, save, write_model


def test_gallery_round_trip(tmp_path: Path, model_file: Path, people: Path):
    models = make_models(model_file, WholePhotoDetector())
    r = enroll(people, tmp_path / "g.json", models)
    assert (r.people, r.photos, r.embedded, r.kept) == (2, 2, 2, 0)
    g = load_gallery(tmp_path / "g.json", expect_model=models.embedder.version)
    assert g.names() == ["Alice", "Bob"]
    save_gallery(tmp_path / "g2.json", g)
    g2 = load_gallery(tmp_path / "g2.json")
    assert g2.fingerprint() == g.fingerprint()
    e, e2 = g.people["Alice"][0], g2.people["Alice"][0]
    assert torch.equal(e.embedding, e2.embedding)
    assert e.sha256 == e2.sha256
    assert e.path == "Alice/1.png"
    assert e.box == [0.0, 0.0, 32.0, 32.0]
    assert abs(float(e.embedding.norm()) - 1.0) < 1e-5


def test_enroll_again_reembeds_only_changed_photos(tmp_path: Path, model_file: Path, people: Path):
    models = make_models(model_file, WholePhotoDetector())
    gallery = tmp_path / "g.json"
    enroll(people, gallery, models)
    before = load_gallery(gallery).people["Alice"][0].embedding
    save(people / "Bob" / "1.png", pattern(7))  # changed
    save(people / "Carol" / "1.png", pattern(8))  # new
    save(people / "Alice" / "2.png", pattern(9))  # new
    r = enroll(people, gallery, models)
    assert (r.embedded, r.kept, r.removed, r.people) == (3, 1, 0, 3)
    assert torch.equal(load_gallery(gallery).people["Alice"][0].embedding, before)
    (people / "Alice" / "2.png").unlink()
    r = enroll(people, gallery, models)
    assert (r.embedded, r.kept, r.removed, r.photos) == (0, 3, 1, 3)


def test_enroll_skips_photo_without_face_and_uses_largest(
    tmp_path: Path, model_file: Path, people: Path
):
    lines: list[str] = []
    none = make_models(model_file, FakeDetector([]))
    with pytest.raises(DataError, match="expected at least one photo with a face"):
        enroll(people, tmp_path / "g.json", none, on_message=lines.append)
    assert not (tmp_path / "g.json").exists()
    assert sum("expected a face, got none; skipped" in m for m in lines) == 2
    two = make_models(model_file, FakeDetector([(0, 0, 0.25, 0.25), (0.3, 0.3, 0.9, 0.9)]))
    lines.clear()
    enroll(people, tmp_path / "g.json", two, on_message=lines.append)
    assert sum("2 faces found; enrolling the largest" in m for m in lines) == 2
    assert load_gallery(tmp_path / "g.json").people["Bob"][0].box == [9.6, 9.6, 28.8, 28.8]


def test_enroll_with_another_model_rebuilds(tmp_path: Path, model_file: Path, people: Path):
    gallery = tmp_path / "g.json"
    enroll(people, gallery, make_models(model_file, WholePhotoDetector()))
    other = make_models(write_model(tmp_path / "other.pt", seed=1), WholePhotoDetector())
    lines: list[str] = []
    r = enroll(people, gallery, other, on_message=lines.append)
    assert r.rebuilt
    assert r.embedded == 2
    assert r.kept == 0
    assert "re-embedding every photo" in lines[0]
    assert load_gallery(gallery).model == other.embedder.version


def test_tag_refuses_gallery_of_another_model(tmp_path: Path, model_file: Path, people: Path):
    gallery = tmp_path / "g.json"
    enroll(people, gallery, make_models(model_file, WholePhotoDetector()))
    other = make_models(write_model(tmp_path / "other.pt", seed=1), WholePhotoDetector())
    with pytest.raises(ModelError, match=r"expected a gallery made with model embedder-.*re-enrol"):
        tag_photos([people], gallery, other)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"\x00\xff garbage", "a facetag gallery .*got a file that is not text"),
        (b"{oops", r"a facetag gallery .*got a file that is not valid JSON \(Expecting .*\)"),
        (b'{"format": "other"}', "a facetag gallery .*got format 'other'"),
        (
            b'{"format": "facetag-gallery/1", "model": "m", "people": {"A": [{"path": 1}]}}',
            r'people\["A"\]\[0\]\.path to be a photo path, got 1',
        ),
        (b"[1, 2]", "a facetag gallery .*got another file"),
    ],
)
def test_corrupt_gallery_is_refused_and_left_untouched(
    tmp_path: Path, model_file: Path, people: Path, content: bytes, what: str
):
    gallery = tmp_path / "g.json"
    gallery.write_bytes(content)
    with pytest.raises(DataError, match=f"expected {what}; re-create"):
        enroll(people, gallery, make_models(model_file, WholePhotoDetector()))
    assert gallery.read_bytes() == content


def test_missing_gallery_says_how_to_make_one(tmp_path: Path):
    with pytest.raises(DataError, match=r"no such file; create it with facetag enroll"):
        load_gallery(tmp_path / "nope.json")


def test_people_dir_without_person_folders(tmp_path: Path, model_file: Path):
    save(tmp_path / "flat" / "a.png", pattern(1))
    with pytest.raises(DataError, match=r"expected person folders with photos"):
        enroll(
            tmp_path / "flat",
            tmp_path / "g.json",
            make_models(model_file, WholePhotoDetector()),
            on_message=lambda _: None,
        )
