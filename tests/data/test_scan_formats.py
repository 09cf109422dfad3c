"""Formats people shoot (TIFF, HEIC, WebP, camera raw) and scans that skip nothing silently."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facetag.data.images import (
    decode_photo,
    file_kind,
    find_images,
    is_image_file,
    load_image,
    scan_photos,
)
from facetag.errors import DataError


def _picture(W: int = 48, H: int = 32) -> np.ndarray:
    """(H, W, 3) uint8: left half dark red, right half light blue, easy to check after a
    lossy codec."""
    out = np.zeros((H, W, 3), dtype=np.uint8)
    out[:, : W // 2] = (150, 20, 20)
    out[:, W // 2 :] = (100, 180, 240)
    return out


def _close_to(img: Image.Image, expected: np.ndarray, atol: int = 12) -> None:
    got = np.asarray(img.convert("RGB")).astype(int)
    assert got.shape == expected.shape
    # Away from the edge between the halves, where lossy codecs blur.
    W = expected.shape[1]
    for cols in (slice(0, W // 2 - 4), slice(W // 2 + 4, W)):
        mean = got[:, cols].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(mean, expected[:, cols].reshape(-1, 3).mean(0), atol=atol)


def test_tiff_multipage_reads_the_first_page(tmp_path: Path):
    first = Image.fromarray(_picture())
    second = Image.new("RGB", (48, 32), (0, 255, 0))
    first.save(tmp_path / "scan.tif", save_all=True, append_images=[second], compression="tiff_lzw")
    _close_to(load_image(tmp_path / "scan.tif"), _picture(), atol=0)


def test_tiff_16bit_and_orientation_tag(tmp_path: Path):
    values = np.array([[0, 65535, 257 * 100]], dtype=np.uint16)  # (1, 3)
    Image.fromarray(values).save(tmp_path / "deep.tiff")
    np.testing.assert_array_equal(
        np.asarray(load_image(tmp_path / "deep.tiff", None)), [[0, 255, 100]]
    )
    rot = Image.fromarray(_picture())
    exif = rot.getexif()
    exif[0x0112] = 6  # TIFF keeps the orientation as a tag of its own IFD
    rot.save(tmp_path / "rot.tif", exif=exif)
    assert decode_photo(tmp_path / "rot.tif").pixels.shape == (48, 32, 3)


def test_heic_and_webp_are_read(tmp_path: Path):
    Image.fromarray(_picture()).save(tmp_path / "phone.HEIC", quality=95)
    Image.fromarray(_picture()).save(tmp_path / "web.webp", quality=95)
    _close_to(load_image(tmp_path / "phone.HEIC"), _picture())
    _close_to(load_image(tmp_path / "web.webp"), _picture())
    assert is_image_file(tmp_path / "phone.HEIC")


def write_dng(path: Path, H: int = 64, W: int = 96, level: int = 3000) -> Path:
    """A minimal uncompressed Bayer (RGGB) DNG, without a preview, of a flat grey scene."""
    import tifffile

    raw = np.full((H, W), level, dtype=np.uint16)
    tags = [
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern RGGB
        (50717, "H", 1, 4095, True),  # WhiteLevel
        (50721, "d", 9, (1, 0, 0, 0, 1, 0, 0, 0, 1), True),  # ColorMatrix1
        (50728, "d", 3, (1, 1, 1), True),  # AsShotNeutral
        (254, "I", 1, 0, True),  # NewSubfileType: the main image
    ]
    tifffile.imwrite(path, raw, photometric=32803, extratags=tags, metadata=None)
    return path


def test_camera_raw_without_preview_is_demosaiced_at_half_size(tmp_path: Path):
    photo = decode_photo(write_dng(tmp_path / "cam.DNG"))
    assert (photo.width, photo.height) == (48, 32)  # LibRaw's half-size decode
    assert photo.pixels.float().std() < 3  # a flat scene stays flat
    assert photo.pixels.float().mean() > 40


def test_raw_extension_on_a_non_raw_file_is_one_line(tmp_path: Path):
    (tmp_path / "fake.nef").write_bytes(b"not a raw file at all" * 10)
    with pytest.raises(DataError, match=r"fake\.nef: expected an image .* got a file that is not"):
        load_image(tmp_path / "fake.nef")


def test_large_16bit_png_is_reduced_before_any_full_size_copy(tmp_path: Path):
    """A 16-bit grey photo 4x over max_side: the result matches a plain resize of the 8-bit
    scaled pixels (box-reduced first, so memory stays near the decoded pixels)."""
    y, x = np.mgrid[0:800, 0:1200]
    values = ((x * 50 + y * 20) % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    photo = decode_photo(tmp_path / "deep.png", max_side=300)
    assert (photo.width, photo.height) == (1200, 800)
    assert photo.pixels.shape == (200, 300, 3)
    eight = ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.float64)
    expected = eight.reshape(200, 4, 300, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(photo.pixels[..., 0].numpy(), expected, atol=1.0)


def test_large_rgba_png_is_reduced_then_composited(tmp_path: Path):
    rgba = np.zeros((400, 600, 4), dtype=np.uint8)
    rgba[..., 2] = 255
    rgba[:200, :, 3] = 255  # top half opaque blue, bottom transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    pixels = decode_photo(tmp_path / "alpha.png", max_side=150).pixels.numpy()
    assert pixels.shape == (100, 150, 3)
    assert tuple(pixels[10, 10]) == (0, 0, 255)
    assert tuple(pixels[90, 10]) == (255, 255, 255)


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """Every kind of entry a photo library holds besides photos."""
    lib = tmp_path / "lib"
    lib.mkdir()
    Image.fromarray(_picture()).save(lib / "good.jpg")
    os.mkfifo(lib / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(lib / "sock.jpg"))
    sock.close()
    (lib / "folder.jpg").mkdir()
    (lib / "dangling.jpg").symlink_to(lib / "gone.jpg")
    (lib / "loop.jpg").symlink_to(lib / "loop.jpg")
    (lib / "zero.jpg").symlink_to("/dev/zero")
    (lib / "null.png").symlink_to("/dev/null")
    (lib / "link.jpg").symlink_to(lib / "good.jpg")
    (lib / "linked-folder").symlink_to(lib / "sub")
    (lib / "sub").mkdir()
    Image.fromarray(_picture()).save(lib / "sub" / "deep.png")
    (lib / "clip.mov").write_bytes(b"x")
    (lib / "layers.psd").write_bytes(b"x")
    (lib / "good.xmp").write_text("<x/>")
    (lib / ".DS_Store").write_bytes(b"x")
    return lib


def test_scan_reports_every_odd_entry_once_and_counts_the_rest(odd_folder: Path):
    scan = scan_photos([odd_folder], recursive=True)
    assert [p.name for p in scan.photos] == ["good.jpg", "link.jpg", "deep.png"]
    assert scan.photos[1] == odd_folder / "link.jpg"  # under its own path, not its target's
    lines = {p.name: m for p, m in scan.problems}
    assert sorted(lines) == [
        "dangling.jpg",
        "linked-folder",
        "loop.jpg",
        "null.png",
        "pipe.jpg",
        "sock.jpg",
        "zero.jpg",
    ]
    assert "a named pipe (FIFO)" in lines["pipe.jpg"]
    assert "a socket" in lines["sock.jpg"]
    assert "a link to nothing" in lines["dangling.jpg"]
    assert "a symlink loop" in lines["loop.jpg"]
    assert "a device" in lines["zero.jpg"]
    assert "a device" in lines["null.png"]
    assert "not followed" in lines["linked-folder"]
    assert all("\n" not in m and m.startswith(str(p)) for p, m in scan.problems)
    assert dict(scan.unread) == {".mov": 1, ".psd": 1}  # .xmp sidecars are the photos'
    assert scan.hidden == 1
    assert scan.summary() == (
        "not read: 2 files of kinds facetag does not read (.mov 1, .psd 1), "
        "1 hidden files or folders"
    )
    flat = scan_photos([odd_folder])
    assert "folder.jpg" in {p.name for p, _ in flat.problems}  # a folder named like a photo
    assert [p.name for p in flat.photos] == ["good.jpg", "link.jpg"]


def test_decoding_a_fifo_or_device_never_blocks(odd_folder: Path):
    for name, kind in [("pipe.jpg", "a named pipe"), ("zero.jpg", "a device")]:
        with pytest.raises(DataError, match=kind):
            load_image(odd_folder / name)
    assert file_kind(odd_folder / "missing.jpg")[0] == "missing"


def test_unreadable_folder_is_reported(odd_folder: Path, monkeypatch: pytest.MonkeyPatch):
    real = os.scandir

    def scandir(path):  # root reads any folder: make sub/ unreadable the only way we can
        if Path(path).name == "sub":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_photos([odd_folder], recursive=True)
    (line,) = [m for p, m in scan.problems if p.name == "sub"]
    assert line == (
        f"{odd_folder / 'sub'}: expected a readable folder, got Permission denied; "
        "skipped: check its permissions"
    )


def test_one_bad_argument_is_one_line(tmp_path: Path):
    os.mkfifo(tmp_path / "p.jpg")
    (tmp_path / "d.jpg").mkdir()
    problems: list[str] = []
    with pytest.raises(DataError) as e:
        find_images([tmp_path / "p.jpg"], on_problem=lambda p, m: problems.append(m))
    assert (
        str(e.value)
        == f"{tmp_path / 'p.jpg'}: expected an image file or a folder, got a named pipe (FIFO)"
    )
    with pytest.raises(DataError, match=r"d\.jpg: expected image files .* got none"):
        find_images([tmp_path / "d.jpg"], on_problem=lambda p, m: problems.append(m))
    assert problems == []  # the error itself is the one line


def test_output_folder_inside_the_tree_is_not_scanned(odd_folder: Path):
    out = odd_folder / "sub"
    scan = scan_photos([odd_folder], recursive=True, exclude=[out])
    assert "deep.png" not in {p.name for p in scan.photos}
    assert scan.excluded == [out]
