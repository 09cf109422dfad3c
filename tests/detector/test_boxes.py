"""Box files: WIDER text format and CSV read into the same FaceBoxes; photo-level splits."""

import pytest

from facetag.data.boxes import FaceBox, read_boxes, split_images
from facetag.errors import DataError

WIDER = """a/one.jpg
2
10 20 30 40 0 0 0 0 0 0
50 60 5 6 2 0 0 1 0 0
a/empty.jpg
0
0 0 0 0 0 0 0 0 0 0
b/two.jpg
1
1 2 3 4 0 0 0 0 0 0
"""


def test_read_boxes_wider_format(tmp_path):
    f = tmp_path / "gt.txt"
    f.write_text(WIDER)
    boxes = read_boxes(f)
    assert list(boxes) == ["a/one.jpg", "a/empty.jpg", "b/two.jpg"]
    assert boxes["a/one.jpg"] == [FaceBox(10, 20, 30, 40), FaceBox(50, 60, 5, 6, invalid=True)]
    assert boxes["a/empty.jpg"] == []
    assert boxes["b/two.jpg"][0].xyxy == (1, 2, 4, 6)


def test_read_boxes_wider_count_zero_without_zero_line(tmp_path):
    f = tmp_path / "gt.txt"
    f.write_text("x.jpg\n0\ny.jpg\n1\n1 1 2 2\n")
    assert read_boxes(f) == {"x.jpg": [], "y.jpg": [FaceBox(1, 1, 2, 2)]}


def test_read_boxes_csv_matches_wider(tmp_path):
    f = tmp_path / "gt.txt"
    f.write_text(WIDER)
    c = tmp_path / "boxes.csv"
    c.write_text(
        "image,x,y,w,h,blur,expression,illumination,invalid,occlusion,pose\n"
        "a/one.jpg,10,20,30,40,0,0,0,0,0,0\n"
        "a/one.jpg,50,60,5,6,2,0,0,1,0,0\n"
        "a/empty.jpg,,,,,,,,,,\n"
        "b/two.jpg,1,2,3,4,0,0,0,0,0,0\n"
    )
    assert read_boxes(c) == read_boxes(f)


def test_read_boxes_dlib_style_csv(tmp_path):
    c = tmp_path / "boxes.csv"
    c.write_text("split,image,x,y,w,h\ntrain,p.jpg,1,2,3,4\ntest,q.jpg,5,6,7,8\n")
    assert read_boxes(c) == {"p.jpg": [FaceBox(1, 2, 3, 4)], "q.jpg": [FaceBox(5, 6, 7, 8)]}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("gt.txt", "a.jpg\nmany\n", r"gt.txt:2: expected the number of faces"),
        ("gt.txt", "a.jpg\n1\n1 2 3\n", r"gt.txt:3: expected 'x y w h"),
        ("gt.txt", "a.jpg\n1\n1 2 x 4\n", r"gt.txt:3: expected a number, got 'x'"),
        ("gt.txt", "a.jpg\n1\n1 2 -3 4\n", r"expected a box width and height >= 0"),
        ("gt.txt", "a.jpg\n2\n1 2 3 4\n", r"expected 2 face lines for 'a.jpg', got 1"),
        ("b.csv", "file,x,y\n", r"expected CSV columns image, x, y, w, h .*missing image, w, h"),
        ("b.csv", "image,x,y,w,h\n", r"expected at least one image"),
    ],
)
def test_read_boxes_rejects_malformed_files(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataError, match=message):
        read_boxes(f)


def test_read_boxes_missing_and_binary(tmp_path):
    with pytest.raises(DataError, match="no such box file"):
        read_boxes(tmp_path / "nope.txt")
    b = tmp_path / "b.txt"
    b.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="expected a text box file"):
        read_boxes(b)


def test_split_images_is_by_photo_seeded_and_disjoint():
    names = [f"img{i}.jpg" for i in range(100)]
    train, val = split_images(names, 0.2, seed=3)
    assert len(val) == 20
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(names)
    assert split_images(list(reversed(names)), 0.2, seed=3) == (train, val)
    assert split_images(names, 0.2, seed=4)[1] != val
