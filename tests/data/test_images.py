"""load_image / image_size / find_images on generated files of every kind we promise to read."""

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facetag.data.images import (
    IMAGE_EXTENSIONS,
    decode_photo,
    find_images,
    image_size,
    is_image_file,
    load_image,
)
from facetag.errors import DataError

ORIENTATION = 0x0112


def _gradient(W: int, H: int, mode: str) -> Image.Image:
    """A deterministic image whose pixels differ across the frame (lossless formats)."""
    y, x = np.mgrid[0:H, 0:W]
    grey = ((x * 7 + y * 13) % 256).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(grey)
    rgb = np.stack([grey, 255 - grey, (grey // 2).astype(np.uint8)], axis=-1)
    return Image.fromarray(rgb)


@pytest.mark.parametrize(
    ("name", "src_mode", "own_mode"),
    [
        ("grey.png", "L", "L"),
        ("colour.png", "RGB", "RGB"),
        ("grey.pgm", "L", "L"),
        ("colour.bmp", "RGB", "RGB"),
        ("grey.bmp", "L", "L"),
        ("colour.webp", "RGB", "RGB"),
    ],
)
def test_load_image_lossless_formats_keep_pixels(tmp_path, name, src_mode, own_mode):
    src = _gradient(9, 6, src_mode)
    path = tmp_path / name
    src.save(path, lossless=True) if name.endswith(".webp") else src.save(path)
    img = load_image(path, mode=None)
    assert img.mode == own_mode
    assert img.size == (9, 6)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(src))
    assert load_image(path, mode="RGB").mode == "RGB"
    assert load_image(path, mode="L").mode == "L"


def test_load_image_jpeg_grey_and_colour(tmp_path):
    Image.new("L", (16, 8), 90).save(tmp_path / "g.jpg")
    Image.new("RGB", (16, 8), (200, 30, 40)).save(tmp_path / "c.JPEG")
    grey = load_image(tmp_path / "g.jpg", mode=None)
    colour = load_image(tmp_path / "c.JPEG", mode=None)
    assert (grey.mode, grey.size) == ("L", (16, 8))
    assert abs(int(np.asarray(grey).mean()) - 90) <= 2
    assert colour.mode == "RGB"
    assert np.allclose(np.asarray(colour).reshape(-1, 3).mean(0), (200, 30, 40), atol=4)
    rgb_from_grey = np.asarray(load_image(tmp_path / "g.jpg", mode="RGB"))
    assert rgb_from_grey.shape == (8, 16, 3)
    assert (rgb_from_grey[..., 0] == rgb_from_grey[..., 2]).all()


def test_load_image_gif_palette_grey_and_colour(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "grey.gif")  # stored as a palette of greys
    Image.new("RGB", (5, 4), (255, 0, 0)).save(tmp_path / "red.gif")
    grey = load_image(tmp_path / "grey.gif", mode=None)
    red = load_image(tmp_path / "red.gif", mode=None)
    assert grey.mode == "L"
    assert (np.asarray(grey) == 77).all()
    assert red.mode == "RGB"
    assert tuple(np.asarray(red)[0, 0]) == (255, 0, 0)


def _exif_jpeg(path: Path, orientation: int) -> None:
    """A 32x16 (W x H) JPEG stored with a black left half and a white right half."""
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, 16:] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)


def test_load_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, orientation=6)  # 6: shown rotated 90 degrees clockwise
    img = np.asarray(load_image(path, mode="L"))
    # Clockwise by 90: the stored left half (black) ends up on top.
    assert img.shape == (32, 16)  # (H, W) as displayed
    assert img[:12].mean() < 20
    assert img[20:].mean() > 235
    assert image_size(path) == (16, 32)


def test_image_size_without_orientation_is_the_stored_size(tmp_path):
    path = tmp_path / "upright.jpg"
    _exif_jpeg(path, orientation=1)
    assert image_size(path) == (32, 16)
    assert np.asarray(load_image(path, mode="L"))[:, :12].mean() < 20


def test_load_image_damaged_exif_keeps_the_pixels_and_warns_nothing(tmp_path):
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, 16:] = 255
    path = tmp_path / "odd.jpg"
    # A TIFF header whose first IFD offset points far past the block: Pillow's
    # "Corrupt EXIF data" territory.
    Image.fromarray(stored).save(path, exif=b"Exif\x00\x00II*\x00\xff\xff\x00\x00garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = np.asarray(load_image(path, mode="L"))  # stored orientation, and still readable
        assert image_size(path) == (32, 16)
    assert img.shape == (16, 32)
    assert img[:, :12].mean() < 20


def test_png_exif_after_the_image_data_is_applied(tmp_path):
    """A PNG may carry its eXIf chunk after IDAT: the size and pixels are still rotated."""
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, 16:] = 255
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG")
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    body = exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body))
    data = buf.getvalue()
    iend = data.rindex(b"IEND") - 4
    path = tmp_path / "late.png"
    path.write_bytes(data[:iend] + chunk + data[iend:])
    img = np.asarray(load_image(path, mode="L"))
    assert img.shape == (32, 16)  # displayed (H, W)
    assert img[:12].mean() < 20  # the stored left half is on top
    photo = decode_photo(path)
    assert (photo.width, photo.height) == (16, 32)


@pytest.mark.parametrize("name", ["deep.png", "deep.pgm"])
def test_load_image_16bit_scales_to_8bit(tmp_path, name):
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)  # (1, 4)
    Image.fromarray(values).save(tmp_path / name)
    img = load_image(tmp_path / name, mode=None)
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), [[0, 128, 255, 4]])


def test_load_image_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red ink
    img = load_image(tmp_path / "cmyk.jpg", mode=None)
    assert img.mode == "RGB"
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 240
    assert g < 15
    assert b < 15


def test_load_image_palette_transparency_composites_on_white(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 128, 0])  # index 0 red (transparent), 1 green
    pal.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    pal.save(tmp_path / "pal.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's palette-transparency warning must not leak
        img = np.asarray(load_image(tmp_path / "pal.png", mode=None))
    assert tuple(img[0, 0]) == (255, 255, 255)
    assert tuple(img[0, 3]) == (0, 128, 0)


def test_load_image_alpha_composites_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0] = (0, 0, 255, 255)  # opaque blue row
    rgba[1] = (0, 0, 255, 0)  # fully transparent row
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    la = np.array([[[10, 255], [10, 0]]], dtype=np.uint8)  # (1, 2, 2): grey + alpha
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    colour = np.asarray(load_image(tmp_path / "rgba.png", mode=None))
    grey = load_image(tmp_path / "la.png", mode=None)
    assert tuple(colour[0, 0]) == (0, 0, 255)
    assert tuple(colour[1, 0]) == (255, 255, 255)
    assert grey.mode == "L"
    np.testing.assert_array_equal(np.asarray(grey), [[10, 255]])


def test_load_image_truncated_jpeg_raises_data_error(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: expected a complete image, got a truncated"):
        load_image(path)


def test_load_image_text_file_named_jpg_raises_data_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture\n")
    with pytest.raises(DataError, match=r"notes\.jpg: expected an image .*got a file that is not"):
        load_image(path)


def test_load_image_empty_missing_and_folder_raise_data_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: expected an image, got an empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(DataError, match=r"gone\.png: expected an image file, got no such file"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(DataError, match="got a folder"):
        load_image(tmp_path)


def test_load_image_rejects_images_over_max_pixels(tmp_path):
    Image.new("L", (100, 60), 0).save(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"expected at most 5,000 pixels, got 100x60 = 6,000"):
        load_image(tmp_path / "big.png", max_pixels=5_000)
    with pytest.raises(DataError, match="at most 5,000 pixels"):
        image_size(tmp_path / "big.png", max_pixels=5_000)
    assert load_image(tmp_path / "big.png", max_pixels=6_000).size == (100, 60)


def _png_claiming(path: Path, W: int, H: int) -> None:
    """A tiny PNG whose header claims W x H pixels: a decompression bomb's signature."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # IHDR follows the 8-byte signature: length (4), "IHDR" (4), width (4), height (4) ...
    data[16:24] = struct.pack(">II", W, H)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_load_image_decompression_bomb_is_a_data_error_not_a_warning(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 20_000, 20_000)  # above Pillow's own 2 x 89 Mpx error limit
    big = tmp_path / "big.png"
    _png_claiming(big, 11_000, 10_000)  # above Pillow's warning limit, below its error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"bomb\.png: expected at most 100,000,000 pixels"):
            load_image(bomb)
        with pytest.raises(DataError, match=r"got 11000x10000 = 110,000,000 pixels"):
            load_image(big)
        assert image_size(big, max_pixels=200_000_000) == (11_000, 10_000)


def test_load_image_max_side_shrinks_keeping_aspect(tmp_path):
    Image.new("RGB", (400, 200), (10, 20, 30)).save(tmp_path / "wide.jpg")
    img = load_image(tmp_path / "wide.jpg", max_side=100)
    assert img.size == (100, 50)
    assert load_image(tmp_path / "wide.jpg", max_side=1000).size == (400, 200)


def test_load_image_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="load_image: expected mode"):
        load_image(tmp_path / "x.png", mode="CMYK")


def test_find_images_sorted_filtered_and_recursive(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    (d / ".thumbs").mkdir()
    for name in ["b.jpg", "A.PNG", "c.webp", ".hidden.jpg", "notes.txt"]:
        (d / name).write_bytes(b"x")
    (d / "sub" / "d.jpeg").write_bytes(b"x")
    (d / ".thumbs" / "t.jpg").write_bytes(b"x")
    assert [p.name for p in find_images([d])] == ["A.PNG", "b.jpg", "c.webp"]
    deep = find_images([d], recursive=True)
    assert [p.relative_to(d).as_posix() for p in deep] == ["A.PNG", "b.jpg", "c.webp", "sub/d.jpeg"]
    # An explicit file is kept as given, and duplicates collapse.
    assert find_images([d / "notes.txt", d / "b.jpg", d]) == [
        d / "A.PNG",
        d / "b.jpg",
        d / "c.webp",
        d / "notes.txt",
    ]


def test_find_images_reports_empty_folder_and_goes_on(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.jpg").write_bytes(b"x")
    problems: list[tuple[Path, str]] = []
    found = find_images(
        [tmp_path / "empty", tmp_path / "full"], on_problem=lambda p, m: problems.append((p, m))
    )
    assert found == [tmp_path / "full" / "a.jpg"]
    assert len(problems) == 1
    assert problems[0][0] == tmp_path / "empty"
    assert "expected image files" in problems[0][1]
    assert "got none" in problems[0][1]


def test_find_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="got none"):
        find_images([tmp_path / "empty"])
    with pytest.raises(DataError, match=r"missing: expected an image file or a folder"):
        find_images([tmp_path / "missing"])


def test_is_image_file_matches_extensions_in_any_case(tmp_path):
    assert {".jpg", ".png", ".webp", ".tif", ".tiff", ".heic", ".dng"} <= set(IMAGE_EXTENSIONS)
    for name, expected in [("a.JPG", True), ("b.Gif", True), ("c.psd", False), (".d.png", False)]:
        (tmp_path / name).write_bytes(b"x")
        assert is_image_file(tmp_path / name) is expected
