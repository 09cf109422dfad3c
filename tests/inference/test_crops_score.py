"""Training crops cut like tagging's (cut_crops) and scoring a tag run (score_tags)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from facetag.errors import DataError
from facetag.inference.align import crop_face, face_square
from facetag.inference.crops import cut_crops, largest, person_key, square_crop
from facetag.metrics.names import format_score, read_expected, score_tags
from tests.inference.conftest import FakeDetector, pattern, save


@dataclass(frozen=True)
class _Settings:
    max_side: int = 512


@dataclass
class PadOnlyDetector:
    """Finds the face only when the photo has been padded (a grey border), like a tight
    crop whose face fills the frame; records the sizes it was shown."""

    name: str = "pad-only"
    settings: _Settings = field(default_factory=_Settings)
    seen: list[tuple[int, int]] = field(default_factory=list)

    def detect(self, image: Tensor) -> Tensor:
        _, H, W = image.shape
        self.seen.append((W, H))
        if image[:, 0, 0].tolist() != [128.0, 128.0, 128.0]:
            return torch.zeros((0, 5))
        b = W / 6  # the border cut_crops adds is 0.25 of the photo: W = 1.5 w
        return torch.tensor([[b, b, W - b, H - b, 0.9]])


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "lfw", tmp_path / "celeba"
    save(a / "Halle_Berry" / "1.jpg", pattern(1, 40))
    save(a / "Keanu_Reeves" / "1.jpg", pattern(2, 40))
    save(a / "Tom_Hanks" / "1.jpg", pattern(6, 40))  # LFW N-Z: held out, never cut
    save(b / "Halle_Berry" / "x.png", pattern(3, 40))
    save(b / "7201" / "1.jpg", pattern(4, 40))
    (a / "FILES.csv").write_text("not a person\n")
    return a, b


def test_largest_picks_the_biggest_box_and_none_for_no_box():
    found = torch.tensor([[0, 0, 10, 10, 0.99], [5, 5, 40, 30, 0.8], [0, 0, 20, 20, 0.9]])
    assert largest(found) == pytest.approx([5.0, 5.0, 40.0, 30.0, 0.8])  # its whole row
    assert largest(torch.zeros((0, 5))) is None


def test_person_key_prefixes_numeric_ids_with_their_source():
    assert person_key(Path("/d/celeba"), "7201") == "celeba_7201"
    assert person_key(Path("/d/lfw"), "Tom_Hanks") == "Tom_Hanks"


def test_square_crop_equals_what_tagging_embeds():
    img = Image.fromarray(pattern(5, 64))
    box = [10.0, 12.0, 40.0, 50.0]
    ours = np.asarray(square_crop(img, box, 32, 0.25))  # (32, 32, 3)
    x1, y1, x2, y2 = face_square(box, 0.25)
    assert (x2 - x1, y2 - y1) == (48, 48)
    tagging = crop_face(img, box, (32, 32), 3, 0.25).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, tagging)


def test_cut_crops_merges_people_prefixes_ids_and_records_sources(tmp_path: Path):
    a, b = _sources(tmp_path)
    out = tmp_path / "crops"
    report = cut_crops([a, b], out, FakeDetector([(0.25, 0.25, 0.75, 0.75)]), size=24)
    names = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.png"))
    assert names == [
        "Halle_Berry/celeba__x.png",
        "Halle_Berry/lfw__1.png",
        "Keanu_Reeves/lfw__1.png",
        "celeba_7201/celeba__1.png",
    ]
    assert report.merged == {"Halle_Berry": ["celeba", "lfw"]}
    assert report.per_source == {"lfw": 2, "celeba": 2}
    assert report.people == 3
    assert report.written == 4
    assert not report.missed
    assert Image.open(out / "Keanu_Reeves" / "lfw__1.png").size == (24, 24)
    assert not (out / "Tom_Hanks").exists()


def test_cut_crops_reuses_same_settings_and_prunes_removed_photos(tmp_path: Path):
    a, b = _sources(tmp_path)
    out = tmp_path / "crops"
    det = FakeDetector([(0.25, 0.25, 0.75, 0.75)])
    cut_crops([a, b], out, det, size=24)
    (b / "7201" / "1.jpg").unlink()
    again = cut_crops([a, b], out, det, size=24)
    assert (again.kept, again.written) == (3, 0)
    assert not (out / "celeba_7201").exists()  # its only photo went away
    resized = cut_crops([a, b], out, det, size=20)  # other settings: everything again
    assert (resized.kept, resized.written) == (0, 3)
    assert Image.open(out / "Keanu_Reeves" / "lfw__1.png").size == (20, 20)


def test_cut_crops_pads_tight_crops_and_reports_photos_without_faces(tmp_path: Path):
    src = tmp_path / "glint"
    save(src / "Ann" / "1.png", np.full((40, 40, 3), 200, np.uint8))
    messages: list[str] = []
    det = PadOnlyDetector()
    report = cut_crops([src], tmp_path / "out", det, size=16, on_message=messages.append)
    assert det.seen == [(40, 40), (60, 60)]  # tried as it is, then with a 10-px border
    assert report.padded == 1
    assert report.written == 1
    # The box found in the padded photo maps back to the photo: the face is the photo.
    crop = np.asarray(Image.open(tmp_path / "out" / "Ann" / "glint__1.png"))
    assert crop[8, 8].tolist() == [200, 200, 200]  # the middle is the photo
    assert crop[0, 0].tolist() == [128, 128, 128]  # margin outside the photo is grey
    none = cut_crops([src], tmp_path / "out2", FakeDetector([]), on_message=messages.append)
    assert none.written == 0
    assert none.missed == [str(src / "Ann" / "1.png")]
    assert messages == [f"{src / 'Ann' / '1.png'}: expected a face, got none; left out"]


def test_cut_crops_leaves_out_people_with_too_few_crops(tmp_path: Path):
    a, b = _sources(tmp_path)
    save(a / "Keanu_Reeves" / "2.jpg", pattern(7, 40))
    out = tmp_path / "crops"
    messages: list[str] = []
    det = FakeDetector([(0.25, 0.25, 0.75, 0.75)])
    report = cut_crops([a, b], out, det, size=24, min_photos=2, on_message=messages.append)
    # Halle_Berry has 2 (lfw + celeba), Keanu_Reeves 2; celeba_7201 has 1: left out.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["Halle_Berry", "Keanu_Reeves"]
    assert report.too_few == ["celeba_7201"]
    assert report.people == 2
    assert report.written == 4
    assert report.per_source == {"lfw": 3, "celeba": 1}
    assert messages == ["1 people left out with fewer than 2 crops: celeba_7201"]
    # Run again: the kept crops stay, the person left out is still out.
    again = cut_crops([a, b], out, det, size=24, min_photos=2)
    assert (again.kept, again.written, again.too_few) == (4, 0, ["celeba_7201"])
    assert not (out / "celeba_7201").exists()


def test_cut_crops_refuses_a_missing_source(tmp_path: Path):
    with pytest.raises(
        DataError,
        match=r"nope: expected a folder of person folders .* "
        r"got no such folder; check the path",
    ):
        cut_crops([tmp_path / "nope"], tmp_path / "out", FakeDetector([]))


# --- scoring -------------------------------------------------------------------------


def _expected(tmp_path: Path) -> Path:
    csv = tmp_path / "expected.csv"
    csv.write_text(
        "image,names\ntest/a.jpg,obama\ntest/b.jpg,obama;biden;unknown\ntest/c.jpg,kit\n"
    )
    return csv


def _image(tmp_path: Path, name: str, names: list[str | None]) -> dict:
    return {
        "path": str(tmp_path / "test" / name),
        "faces": [{"name": n, "box": [0, 0, 1, 1]} for n in names],
    }


def test_score_counts_names_not_boxes(tmp_path: Path):
    expected = read_expected(_expected(tmp_path))
    assert expected[str((tmp_path / "test" / "b.jpg").resolve())] == ["obama", "biden", "unknown"]
    images = [
        _image(tmp_path, "a.jpg", ["obama", None]),  # a stray unknown face is harmless
        _image(tmp_path, "b.jpg", ["obama", "kit", None]),  # kit is wrong, biden missed
        _image(tmp_path, "c.jpg", ["kit"]),
        _image(tmp_path, "other.jpg", ["obama"]),  # not in the CSV: not scored
    ]
    score = score_tags(images, expected)
    assert (score.tp, score.given, score.expected) == (3, 4, 4)
    assert score.precision == 0.75
    assert score.recall == 0.75
    b = score.photos[1]
    assert b.wrong == ["kit"]
    assert b.missed == ["biden"]
    assert not b.ok
    text = format_score(score)
    assert "b.jpg  obama, biden, unknown  obama, kit, unknown  wrong: kit; missed: biden" in text
    assert text.endswith("name precision 0.750 (3/4), recall 0.750 (3/4)")


def test_score_perfect_and_untagged_photo(tmp_path: Path):
    expected = read_expected(_expected(tmp_path))
    images = [
        _image(tmp_path, "a.jpg", ["obama"]),
        _image(tmp_path, "b.jpg", ["biden", None, "obama"]),
    ]
    score = score_tags(images, expected)
    assert score.precision == 1.0
    assert score.recall == 3 / 4  # c.jpg was not tagged: kit is missed
    assert score.not_tagged == [str((tmp_path / "test" / "c.jpg").resolve())]
    assert score.to_json()["correct"] == 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "expected a header line 'image,names', got 'an empty file'"),
        ("path,who\na.jpg,x\n", "expected a header line 'image,names', got 'path,who'"),
        ("image,names\na.jpg\n", r"expected.csv:2: expected 'image,name1;name2', got 'a.jpg'"),
    ],
)
def test_read_expected_refuses_malformed_files(tmp_path: Path, text: str, match: str):
    path = tmp_path / "expected.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_expected(path)


DATA = os.environ.get("FACETAG_DATA_DIR", "")


@pytest.mark.skipif(not (Path(DATA) / "johns").is_dir(), reason="needs FACETAG_DATA_DIR")
def test_shipped_detector_finds_every_johns_face(tmp_path: Path):
    from facetag.models.detector import load_detector

    report = cut_crops([Path(DATA) / "johns"], tmp_path / "out", load_detector(None), size=64)
    assert report.summary()["crops"] == 55
    assert not report.missed
    assert report.people == 5
