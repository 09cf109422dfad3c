"""Robust image loading: every way a photo can be bad becomes one DataError line.

Everything that reads a photo (datasets, the detector, tagging) goes through `load_image`,
so a library of real photos behaves the same everywhere: EXIF orientation is applied,
16-bit, CMYK, palette and alpha images become plain 8-bit L or RGB, the image is fully
decoded so a truncated file fails here rather than deep inside training, and huge images
(or decompression bombs) are refused by a pixel limit we control, not by a Pillow warning.
"""

import hashlib
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)
from torch import Tensor

from facetag.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".gif", ".bmp", ".webp")

# 100 megapixels: a 12000x8000 camera photo still loads (~300 MB as RGB), a 20000x20000
# decompression bomb (a tiny PNG of one colour) does not.
DEFAULT_MAX_PIXELS = 100_000_000

# Pillow formats we open. Restricting them keeps Pillow's rarer decoders away from user
# files (the JPEG opener also returns MPO, the multi-picture JPEGs many phones write).
# Image.open with formats= does not load plugins itself, hence the imports above.
_PLUGINS = (
    BmpImagePlugin,
    GifImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    WebPImagePlugin,
)
_FORMATS = ("JPEG", "PNG", "PPM", "GIF", "BMP", "WEBP")
_KINDS = "jpg, jpeg, png, pgm, gif, bmp or webp"

# What a broken file raises inside Pillow's decoders besides OSError ("image file is
# truncated", "broken data stream"): PNG raises SyntaxError for bad chunks, zlib.error for
# a bad deflate stream, struct.error/EOFError for short headers, ValueError for chunks
# larger than PngImagePlugin.MAX_TEXT_CHUNK.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

_ORIENTATION_TAG = 0x0112
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


def load_image(
    path: Path | str,
    mode: str | None = "RGB",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> Image.Image:
    """Open, fully decode and normalise one image.

    mode "RGB" or "L" converts to that mode; None keeps the image's own kind: "L" for grey
    sources (L, 1, 16-bit, LA, a palette of greys) and "RGB" for everything else. Alpha is
    composited on white; 16-bit values are scaled to 8 bits (v * 255 / 65535); CMYK and
    palette images are converted; EXIF orientation is applied, so (W, H) is the size as
    the photo is meant to be seen.

    max_pixels refuses images whose stored W*H is larger (checked from the header, before
    decoding). max_side, if given, shrinks the image (aspect kept) so that its longer side
    is at most max_side; JPEGs are then decoded at 1/2, 1/4 or 1/8 scale directly, which
    makes a 100-megapixel photo cheap to open for a detector.

    Raises DataError (one line naming the file and the fix) for a missing, empty,
    unreadable, non-image, truncated or too large file.
    """
    if mode not in (None, "L", "RGB"):
        raise ValueError(f"load_image: expected mode 'RGB', 'L' or None, got {mode!r}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"load_image: expected max_side >= 1 or None, got {max_side}")
    return _load_sized(Path(path), mode, max_pixels, max_side)[0]


def _load_sized(
    p: Path, mode: str | None, max_pixels: int, max_side: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    """(the loaded image, its displayed (W, H) before any shrinking)."""
    with warnings.catch_warnings():
        # NOTE: Pillow warns about what we handle ourselves (bombs above ~89 Mpx, palette
        # transparency, odd EXIF, malformed MPO); a library of photos must not spray them.
        warnings.simplefilter("ignore")
        return _load(p, mode, max_pixels, max_side)


def _load(
    p: Path, mode: str | None, max_pixels: int, max_side: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    img = _open(p, max_pixels)
    try:
        stored = img.size  # before draft() shrinks it
        if max_side is not None and max(img.size) > max_side:
            W, H = img.size
            scale = max_side / max(W, H)
            # draft() only ever picks a scale whose result is at least the size asked for.
            img.draft(None, (max(1, round(W * scale)), max(1, round(H * scale))))
        try:
            img.load()
        except _DECODE_ERRORS as e:
            raise DataError(
                f"{p}: expected a complete image, got a truncated or corrupt "
                f"{img.format or 'image'} file ({_reason(e)}); "
                "re-copy it from the original or delete it"
            ) from None
        out = _apply_exif_orientation(img)
        out = _to_8bit(out, p)
        if max_side is not None and max(out.size) > max_side:
            W, H = out.size
            scale = max_side / max(W, H)
            out = out.resize(
                (max(1, round(W * scale)), max(1, round(H * scale))), Image.Resampling.BILINEAR
            )
        if mode is not None and out.mode != mode:
            out = out.convert(mode)
        # Read after load(): a PNG may keep its EXIF chunk after the image data.
        W, H = stored[::-1] if _orientation(img) in (5, 6, 7, 8) else stored
        # img is closed below; hand back pixels that outlive it.
        return (img.copy() if out is img else out), (W, H)
    finally:
        img.close()


@dataclass
class Photo:
    """A decoded RGB photo: pixels as loaded (at most max_side), sizes as displayed."""

    path: Path
    pixels: Tensor  # uint8 (h, w, 3), the loaded (maybe shrunk) photo
    width: int  # displayed W (EXIF rotation applied), what boxes in outputs refer to
    height: int  # displayed H
    scale: float  # loaded / displayed
    sha256: str = ""  # of the file's bytes, when the caller hashed it

    def chw(self) -> Tensor:
        """The pixels as float (3, h, w) in 0..255: what the detector takes."""
        return self.pixels.permute(2, 0, 1).float()

    def image(self) -> Image.Image:
        """The loaded pixels as a PIL RGB image (shares no memory with ``pixels``)."""
        return Image.fromarray(self.pixels.numpy(), mode="RGB")


def decode_photo(path: Path, max_side: int | None = None, *, sha256: str = "") -> Photo:
    """Decode one photo as RGB, at most ``max_side`` px on its longer side (see load_image).

    The one photo decoder of facetag: detection, enrolment, tagging, training crops and
    detector training all read photos through it. Raises DataError (one line).
    """
    img, (W, H) = _load_sized(Path(path), "RGB", DEFAULT_MAX_PIXELS, max_side)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (h, w, 3)
    return Photo(Path(path), pixels, W, H, img.size[0] / W, sha256)


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes; DataError (one line) when it cannot be read."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise DataError(
            f"{path}: expected a readable file, got {reason}; check the path and its permissions"
        ) from None
    return h.hexdigest()


def image_size(path: Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(W, H) of an image as it is meant to be seen (EXIF rotation applied), from its header.

    Nothing is decoded, so this is cheap but does not detect truncated files: use
    load_image for that. Raises the same DataError lines as load_image for files that
    are missing, empty, not images or larger than max_pixels.
    """
    p = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in load_image
        img = _open(p, max_pixels)
    try:
        W, H = img.size
        # Orientations 5-8 rotate by 90 or 270 degrees, which swaps width and height.
        if _orientation(img) in (5, 6, 7, 8):
            W, H = H, W
        return W, H
    finally:
        img.close()


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension is one of IMAGE_EXTENSIONS (any case)."""
    return (
        not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def find_images(
    paths: Iterable[Path | str],
    recursive: bool = False,
    *,
    on_problem: Callable[[Path, str], None] | None = None,
) -> list[Path]:
    """Image files named by `paths` (files or folders), sorted and without duplicates.

    A file is taken as it is (load_image will say if it is not an image); a folder
    contributes its image files (IMAGE_EXTENSIONS, hidden files skipped), and those of its
    sub-folders when recursive. A folder with no images is reported through
    on_problem(path, message) and skipped, so the others still run; a missing path, or no
    images at all, raises DataError.
    """
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            images = [
                f for f in path.glob(pattern) if is_image_file(f) and not _hidden_below(f, path)
            ]
            if not images and on_problem is not None:
                where = "or its sub-folders " if recursive else ""
                hint = "" if recursive else "; pass --recursive to look in sub-folders"
                on_problem(
                    path,
                    f"{path}: expected image files ({_KINDS}) in it {where}, got none{hint}",
                )
            found.update(images)
        else:
            raise DataError(
                f"{path}: expected an image file or a folder, got no such path; check the path"
            )
    if not found:
        names = ", ".join(str(p) for p in paths)
        raise DataError(
            f"{names}: expected image files ({_KINDS}), got none; "
            "check the paths (pass --recursive for nested folders)"
        )
    # Sort by the path's text so the order is the same on every filesystem.
    return sorted(found, key=lambda f: f.as_posix())


def _hidden_below(path: Path, root: Path) -> bool:
    """True when a folder between root and path is hidden (".thumbnails/x.jpg")."""
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


def _open(p: Path, max_pixels: int) -> Image.Image:
    """Image.open with every failure turned into a DataError line; checks the pixel limit."""
    try:
        size_bytes = p.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{p}: expected an image file, got no such file; check the path") from None
    except OSError as e:
        raise DataError(
            f"{p}: expected a readable file, got {_reason(e)}; check the path and its permissions"
        ) from None
    if p.is_dir():
        raise DataError(f"{p}: expected an image file, got a folder; pass the images inside it")
    if size_bytes == 0:
        raise DataError(
            f"{p}: expected an image, got an empty file (0 bytes); "
            "re-copy it from the original or delete it"
        )
    # NOTE: Pillow raises above 2 * Image.MAX_IMAGE_PIXELS (~179 Mpx) whatever max_pixels
    # says; that becomes the same DataError as our own check below.
    try:
        img = Image.open(p, formats=_FORMATS)
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        got = f"{int(m.group(1)):,} pixels" if m else "more"
        raise DataError(_too_large(p, max_pixels, got)) from None
    except UnidentifiedImageError:
        raise DataError(
            f"{p}: expected an image ({_KINDS}), got a file that is not one; "
            "delete it or move it out of the folder"
        ) from None
    except PermissionError as e:
        raise DataError(
            f"{p}: expected a readable file, got {_reason(e)}; check its permissions"
        ) from None
    except _DECODE_ERRORS as e:
        raise DataError(
            f"{p}: expected a readable image, got a corrupt header "
            f"({_reason(e)}); re-copy it from the original or delete it"
        ) from None
    W, H = img.size
    pixels = W * H
    if pixels > max_pixels:
        img.close()
        raise DataError(_too_large(p, max_pixels, f"{W}x{H} = {pixels:,} pixels"))
    return img


def _too_large(p: Path, max_pixels: int, got: str) -> str:
    return (
        f"{p}: expected at most {max_pixels:,} pixels, got {got} (a huge photo or a "
        "decompression bomb); shrink the image or raise the pixel limit"
    )


def _reason(e: BaseException) -> str:
    """An exception as a short single-line reason."""
    text = (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip()
    return " ".join(text.split())


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 from the header only (1 when absent or unreadable)."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
        value = exif.get(_ORIENTATION_TAG, 1)
    except (*_DECODE_ERRORS, KeyError, TypeError, IndexError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the camera's EXIF orientation says; the pixels themselves are fine."""
    try:
        out = ImageOps.exif_transpose(img)
    except (*_DECODE_ERRORS, KeyError, TypeError, IndexError):
        # NOTE: a damaged EXIF block does not make the pixels unusable; keep them unrotated.
        return img
    return img if out is None else out


def _to_8bit(img: Image.Image, p: Path) -> Image.Image:
    """Any decoded image -> "L" (grey sources) or "RGB" (the rest), alpha on white."""
    m = img.mode
    if m in ("L", "RGB"):
        return img
    if m == "1":
        return img.convert("L")
    if m == "I" or m.startswith("I;16"):
        # 16-bit PNG/PGM. Pillow's own convert("L") clips at 255 instead of scaling.
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))
    if m == "P":
        if "transparency" in img.info:
            return _on_white(img.convert("RGBA"), grey=_grey_palette(img))
        return img.convert("L" if _grey_palette(img) else "RGB")
    if m in _ALPHA_MODES:
        return _on_white(img.convert("RGBA"), grey=m in _GREY_MODES)
    try:
        return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX ...
    except ValueError as e:
        raise DataError(
            f"{p}: expected a grey or colour image, got mode {m} ({_reason(e)}); "
            "convert it to 8-bit RGB or grey"
        ) from None


def _on_white(rgba: Image.Image, grey: bool) -> Image.Image:
    """Composite an RGBA image over a white background: transparent becomes white."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out = Image.alpha_composite(white, rgba).convert("RGB")
    return out.convert("L") if grey else out


def _grey_palette(img: Image.Image) -> bool:
    """True when every palette entry has R == G == B (GIFs saved from grey images)."""
    pal = img.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
