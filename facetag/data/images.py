"""Robust image loading: every way a photo can be bad becomes one DataError line.

Everything that reads a photo (datasets, the detector, tagging) goes through `load_image`,
so a library of real photos behaves the same everywhere: EXIF orientation is applied,
16-bit, CMYK, palette and alpha images become plain 8-bit L or RGB, the image is fully
decoded so a truncated file fails here rather than deep inside training, and huge images
(or decompression bombs) are refused by a pixel limit we control, not by a Pillow warning.
"""

import errno
import hashlib
import io
import os
import re
import stat
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)
from torch import Tensor

from facetag.errors import DataError

try:  # HEIC/HEIF (iPhones since 2017, many Android phones): libheif through pillow-heif
    import pillow_heif

    pillow_heif.register_heif_opener()
    _HEIF: tuple[str, ...] = ("HEIF",)
except ImportError:  # NOTE: a dependency; without it .heic files are counted as unread
    _HEIF = ()

# Camera raw files: their embedded JPEG preview (or LibRaw's half-size decode) via rawpy.
RAW_EXTENSIONS = (".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".orf", ".rw2", ".raf", ".pef")
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".pgm",
    ".gif",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    *((".heic", ".heif") if _HEIF else ()),
    *RAW_EXTENSIONS,
)

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
    TiffImagePlugin,
    WebPImagePlugin,
)
_FORMATS = ("JPEG", "PNG", "PPM", "GIF", "BMP", "WEBP", "TIFF", *_HEIF)
_KINDS = "jpg, png, webp, tif, " + ("heic, " if _HEIF else "") + "gif, bmp, pgm or camera raw"

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
        # Read after load(): a PNG may keep its EXIF chunk after the image data.
        orientation = _orientation(img)
        out = _to_8bit(img, p, max_side)
        out = _transpose(out, orientation)
        if max_side is not None and max(out.size) > max_side:
            W, H = out.size
            scale = max_side / max(W, H)
            out = out.resize(
                (max(1, round(W * scale)), max(1, round(H * scale))), Image.Resampling.BILINEAR
            )
        if mode is not None and out.mode != mode:
            out = out.convert(mode)
        W, H = stored[::-1] if orientation in (5, 6, 7, 8) else stored
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
    """True for a visible regular file (or a link to one) with an IMAGE_EXTENSIONS
    extension (any case). A FIFO, socket, device or folder named x.jpg is not one."""
    return (
        not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and file_kind(path)[0] == "file"
    )


def photo_key(path: Path) -> str:
    """A photo's absolute path as it was found: its folder resolved, its own name kept, so a
    link to a photo is a photo of its own (manifests and galleries key on this)."""
    return os.path.join(os.path.realpath(path.parent), path.name)


def file_kind(path: Path) -> tuple[str, os.stat_result | None]:
    """("file" | "folder" | "missing" | what else it is, in words; its stat, links followed).

    "missing" only when nothing is there at all; a link to nothing or a link loop says so.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (
            "a link to nothing (its target is gone)" if os.path.lexists(path) else "missing"
        ), None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop", None
        if e.errno == errno.ENAMETOOLONG:
            return "a name too long for this system", None
        return f"a file that cannot be read ({_reason(e)})", None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "file", st
    if stat.S_ISDIR(mode):
        return "folder", st
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)", st
    if stat.S_ISSOCK(mode):
        return "a socket", st
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device (such as a link to /dev/zero)", st
    return "a special file", st


@dataclass
class Scan:
    """What a scan of photo paths found: the photos, each problem (one line), and counts of
    what it left out on purpose, for the run's summary."""

    photos: list[Path] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    unread: Counter[str] = field(default_factory=Counter)  # extension -> files not read
    hidden: int = 0  # hidden files and folders (".thumbnails", ".DS_Store")
    excluded: list[Path] = field(default_factory=list)  # output folders not scanned

    def summary(self) -> str:
        """'' or e.g. "not read: 3 files of other kinds (.mov 2, .psd 1), 4 hidden"."""
        parts = []
        n = sum(self.unread.values())
        if n:
            kinds = ", ".join(
                f"{ext or 'no extension'} {k}" for ext, k in self.unread.most_common(5)
            )
            more = ", ..." if len(self.unread) > 5 else ""
            parts.append(f"{n} files of kinds facetag does not read ({kinds}{more})")
        if self.hidden:
            parts.append(f"{self.hidden} hidden files or folders")
        return ("not read: " + ", ".join(parts)) if parts else ""

    def counts(self) -> dict[str, Any]:
        """The summary as JSON: {"unread": {".mov": 2}, "hidden": 4}."""
        return {"unread": dict(sorted(self.unread.items())), "hidden": self.hidden}


# Files beside photos that are theirs (sidecars), not photos of a kind we do not read.
_SIDECARS = frozenset({".xmp"})


def scan_photos(
    paths: Iterable[Path | str], recursive: bool = False, *, exclude: Iterable[Path] = ()
) -> Scan:
    """The photos named by ``paths`` (files or folders), sorted, each once, under the path it
    was found at (a link to a photo is tagged under the link's own name).

    A file argument is taken as it is (load_image says if it is not an image); a folder
    gives its image files (IMAGE_EXTENSIONS), and its sub-folders' when recursive. Nothing
    is skipped silently: a FIFO, socket, device, dangling or looping link, a folder named
    like a photo, a link to a folder (not followed, so no loop is walked) and an unreadable
    folder each get a problem line; hidden files and files of other kinds are counted.
    Folders in ``exclude`` (our own output folders) are not scanned. A path that does not
    exist raises DataError.
    """
    scan = Scan()
    skip = {os.path.abspath(p) for p in exclude}
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        kind, _ = file_kind(path)
        if kind == "file":
            found.add(path)
        elif kind == "folder":
            before = len(found)
            _walk(path, recursive, scan, found, skip)
            if len(found) == before:
                where = "or its sub-folders " if recursive else ""
                hint = "" if recursive else "; pass --recursive to look in sub-folders"
                scan.problems.append(
                    (path, f"{path}: expected image files ({_KINDS}) in it {where}, got none{hint}")
                )
        elif kind == "missing":
            raise DataError(
                f"{path}: expected an image file or a folder, got no such path; check the path"
            )
        else:
            scan.problems.append((path, f"{path}: expected an image file or a folder, got {kind}"))
    # Sort by the path's bytes so the order is the same on every filesystem.
    scan.photos = sorted(found, key=lambda f: os.fsencode(f))
    return scan


def _walk(folder: Path, recursive: bool, scan: Scan, found: set[Path], skip: set[str]) -> None:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
    except OSError as e:
        scan.problems.append(
            (
                folder,
                f"{folder}: expected a readable folder, got {_reason(e)}; skipped: check its "
                "permissions",
            )
        )
        return
    for entry in entries:
        path = folder / entry.name
        if entry.name.startswith("."):
            scan.hidden += 1
            continue
        ext = path.suffix.lower()
        kind, _ = file_kind(path)
        if kind == "file":
            if ext in IMAGE_EXTENSIONS:
                found.add(path)
            elif ext not in _SIDECARS:
                scan.unread[ext] += 1
        elif kind == "folder":
            if os.path.abspath(path) in skip:
                scan.excluded.append(path)
            elif entry.is_symlink():
                scan.problems.append(
                    (path, f"{path}: a link to a folder; not followed (pass its target to tag it)")
                )
            elif recursive:
                _walk(path, recursive, scan, found, skip)
            elif ext in IMAGE_EXTENSIONS:
                scan.problems.append(
                    (
                        path,
                        f"{path}: expected an image file, got a folder named like one; skipped "
                        "(pass --recursive to look inside)",
                    )
                )
        else:
            scan.problems.append((path, f"{path}: expected an image file, got {kind}; skipped"))


def find_images(
    paths: Iterable[Path | str],
    recursive: bool = False,
    *,
    on_problem: Callable[[Path, str], None] | None = None,
    exclude: Iterable[Path] = (),
) -> list[Path]:
    """scan_photos' photos, with its problems passed to on_problem (see scan_problems)."""
    paths = list(paths)
    return scan_problems(scan_photos(paths, recursive, exclude=exclude), paths, on_problem)


def scan_problems(
    scan: Scan, paths: Iterable[Path | str], on_problem: Callable[[Path, str], None] | None
) -> list[Path]:
    """A scan's photos; each problem goes to on_problem(path, message) and the others go
    on. No photo at all raises DataError: the one problem's line when there was exactly one
    (a single bad argument is one line, not two), else a line of its own."""
    if not scan.photos and len(scan.problems) == 1:
        raise DataError(scan.problems[0][1])
    if on_problem is not None:
        for path, message in scan.problems:
            on_problem(path, message)
    if not scan.photos:
        names = ", ".join(str(p) for p in paths)
        raise DataError(
            f"{names}: expected image files ({_KINDS}), got none; "
            "check the paths (pass --recursive for nested folders)"
        )
    return scan.photos


def require_paths(paths: Iterable[Path | str]) -> None:
    """DataError (one line) for the first path where nothing exists: a cheap check the CLI
    makes before it spends seconds loading models."""
    for raw in paths:
        if file_kind(Path(raw))[0] == "missing":
            raise DataError(
                f"{raw}: expected an image file or a folder, got no such path; check the path"
            )


def _open(p: Path, max_pixels: int) -> Image.Image:
    """Image.open with every failure turned into a DataError line; checks the pixel limit.

    Only regular files are opened (a FIFO would block, /dev/zero never ends); camera raw
    files give their embedded JPEG preview, or LibRaw's half-size decode without one.
    """
    kind, st = file_kind(p)
    if kind == "folder":
        raise DataError(f"{p}: expected an image file, got a folder; pass the images inside it")
    if kind == "missing":
        raise DataError(f"{p}: expected an image file, got no such file; check the path")
    if kind != "file":
        raise DataError(f"{p}: expected an image file, got {kind}; skipped")
    assert st is not None
    if st.st_size == 0:
        raise DataError(
            f"{p}: expected an image, got an empty file (0 bytes); "
            "re-copy it from the original or delete it"
        )
    # NOTE: Pillow raises above 2 * Image.MAX_IMAGE_PIXELS (~179 Mpx) whatever max_pixels
    # says; that becomes the same DataError as our own check below.
    try:
        img: Image.Image
        if p.suffix.lower() in RAW_EXTENSIONS:
            img = _open_raw(p)
        else:
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


# LibRaw's flip (rawpy sizes.flip) as the EXIF orientation that shows the photo upright.
_RAW_FLIP = {3: 3, 5: 8, 6: 6}


def _open_raw(p: Path) -> Image.Image:
    """A camera raw file as a PIL image: the embedded JPEG preview (what the camera showed,
    full size on most cameras), else LibRaw's half-size demosaic. OSError when LibRaw
    cannot read it (turned into a DataError line by _open)."""
    try:
        import rawpy
    except ImportError:
        raise UnidentifiedImageError(f"{p}: rawpy is not installed") from None
    try:
        with rawpy.imread(str(p)) as raw:
            flip = _RAW_FLIP.get(raw.sizes.flip, 1)
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
                img = Image.open(io.BytesIO(bytes(thumb.data)), formats=("JPEG",))
                if flip != 1 and _orientation(img) == 1:
                    _set_orientation(img, flip)
                return img
            pixels = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
    except rawpy.LibRawFileUnsupportedError:
        raise UnidentifiedImageError(f"{p}: not a raw file LibRaw reads") from None
    except rawpy.LibRawError as e:
        raise OSError(f"LibRaw: {e}") from None
    return Image.fromarray(np.ascontiguousarray(pixels))  # (H, W, 3) uint8, already upright


def _set_orientation(img: Image.Image, orientation: int) -> None:
    exif = img.getexif()
    exif[_ORIENTATION_TAG] = orientation
    img.info["exif"] = exif.tobytes()


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
    """EXIF orientation 1-8 (1 when absent or unreadable): JPEG/PNG/WebP/HEIF EXIF blocks
    and TIFF's own tag alike (Image.getexif reads both)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except (*_DECODE_ERRORS, KeyError, TypeError, IndexError):
        return 1  # NOTE: a damaged EXIF block does not make the pixels unusable
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# What each EXIF orientation asks for to show the photo upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    """Rotate/flip as the camera's EXIF orientation says."""
    method = _TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _to_8bit(img: Image.Image, p: Path, max_side: int | None = None) -> Image.Image:
    """Any decoded image -> "L" (grey sources) or "RGB" (the rest), alpha on white.

    With max_side, a photo more than twice that size is box-reduced by an integer factor
    (at least max_side px remain) before or while it is converted, in bands of rows: no
    full-size copy of a 100-megapixel photo is made, so decoding one costs its decoded
    pixels plus a small image.
    """
    f = max(1, max(img.size) // max_side) if max_side is not None else 1
    m = img.mode
    if m in ("L", "RGB"):
        return _reduced(img, f)
    if m == "1":
        return _banded(img, f, lambda band: band.convert("L"))
    if m == "I" or m.startswith("I;16"):
        # 16-bit PNG/PGM/TIFF. Pillow's own convert("L") clips at 255 instead of scaling.
        return _banded(img, f, _grey16_to_8bit)
    if m == "P":
        grey = _grey_palette(img)
        if "transparency" in img.info:
            return _on_white(_banded(img, f, lambda band: band.convert("RGBA")), grey=grey)
        return _banded(img, f, lambda band: band.convert("L" if grey else "RGB"))
    if m in _ALPHA_MODES:
        rgba = _reduced(img, f) if m == "RGBA" else _banded(img, f, lambda b: b.convert("RGBA"))
        return _on_white(rgba, grey=m in _GREY_MODES)
    try:
        if m == "CMYK":  # reduce() averages CMYK too: shrink before converting
            return _reduced(img, f).convert("RGB")
        return _banded(img, f, lambda band: band.convert("RGB"))  # YCbCr, LAB, HSV, F ...
    except ValueError as e:
        raise DataError(
            f"{p}: expected a grey or colour image, got mode {m} ({_reason(e)}); "
            "convert it to 8-bit RGB or grey"
        ) from None


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    """img box-averaged over factor x factor blocks (itself when factor < 2)."""
    return img.reduce(factor) if factor >= 2 else img


_BAND_ROWS = 128  # rows converted at once: ~5 MB of uint32 for a 10,000 px wide 16-bit photo


def _banded(
    img: Image.Image, factor: int, convert: Callable[[Image.Image], Image.Image]
) -> Image.Image:
    """convert(img) box-reduced by ``factor``, done in bands of rows (a multiple of factor
    high, so the blocks are those of one whole-image reduce): only a band is ever held
    converted at full size. With factor < 2, convert(img) itself."""
    if factor < 2:
        return convert(img)
    W, H = img.size
    rows = factor * max(1, _BAND_ROWS // factor)
    parts = [
        convert(img.crop((0, y, W, min(H, y + rows)))).reduce(factor) for y in range(0, H, rows)
    ]
    out = Image.new(parts[0].mode, (parts[0].width, sum(part.height for part in parts)))
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height
    return out


def _grey16_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, or I holding 0..65535) -> L by v * 255 / 65535, rounded."""
    W, H = img.size
    out = np.empty((H, W), dtype=np.uint8)
    for y0 in range(0, H, _BAND_ROWS):
        band = np.asarray(img.crop((0, y0, W, min(H, y0 + _BAND_ROWS))))
        # 65535 * 255 + 32767 < 2**32: uint32 holds the sum (a quarter of int64's memory)
        v = np.clip(band, 0, 65535).astype(np.uint32)
        out[y0 : y0 + band.shape[0]] = (v * 255 + 32767) // 65535
    return Image.fromarray(out)


def _on_white(rgba: Image.Image, grey: bool) -> Image.Image:
    """Composite an RGBA image over a white background: transparent becomes white."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out = Image.alpha_composite(white, rgba).convert("RGB")
    return out.convert("L") if grey else out


def _grey_palette(img: Image.Image) -> bool:
    """True when every palette entry has R == G == B (GIFs saved from grey images)."""
    pal = img.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
