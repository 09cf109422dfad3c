"""Download public face sets and write them out as person folders.

    olivetti -> <to>/olivetti/s1..s40/1..10.png   (scikit-learn's Olivetti faces, 64x64 grey)
    lfw      -> <to>/lfw/<Name>/<Name>_NNNN.jpg   (LFW, funneled, 250x250 colour)

Downloads are cached in <to>/.cache. Every image is written to a temporary name and
renamed into place, so an interrupted fetch never leaves a half-written image behind;
running it again finishes the job. Offline, fetch fails with one line that says how to
point facetag at a local copy instead.
"""

import hashlib
import io
import os
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.request import urlopen

import numpy as np
from PIL import Image

from facetag.atomic import atomic_write
from facetag.errors import DataError

Progress = Callable[[int, int], None]  # (done, total)

NAMES = ("olivetti", "lfw")


@dataclass(frozen=True)
class Remote:
    filename: str
    url: str
    sha256: str


# The LFW "funneled" archive on the figshare mirror that scikit-learn downloads from
# (sklearn.datasets._lfw.FUNNELED_ARCHIVE). NOTE: the original UMass site is gone, and
# torchvision >= 0.22's LFWPeople refuses download=True for that reason.
LFW_FUNNELED = Remote(
    filename="lfw-funneled.tgz",
    url="https://ndownloader.figshare.com/files/5976015",
    sha256="b47c8422c8cded889dc5a13418c4bc2abbda121092b3533a83306f90d900100a",
)

_LOCAL_COPY = {"olivetti": "../shared/data/orl", "lfw": "../shared/data/lfw"}


def fetch(
    name: str,
    to: Path | str,
    *,
    min_images: int = 2,
    on_progress: Progress | None = None,
) -> Path:
    """Download data set `name` ("olivetti" or "lfw") into <to>/<name>/<person>/ files.

    Returns the written root (<to>/<name>). For lfw only people with at least
    min_images photos are written (a person with one photo cannot be split into train
    and test; LFW has 5749 people, 1680 of them with two or more). on_progress(done,
    total) is called as the download and the writing advance. Raises DataError with a
    one-line fix when the download fails (offline, say) or the data is damaged.
    """
    to = Path(to)
    if name == "olivetti":
        return _fetch_olivetti(to, on_progress)
    elif name == "lfw":
        if min_images < 1:
            raise ValueError(f"fetch: expected min_images >= 1, got {min_images}")
        return _fetch_lfw(to, min_images, on_progress)
    else:
        raise ValueError(f"fetch: expected name 'olivetti' or 'lfw', got {name!r}")


def _fetch_olivetti(to: Path, on_progress: Progress | None) -> Path:
    try:
        from sklearn.datasets import fetch_olivetti_faces  # heavy; only this command needs it
    except ImportError:
        raise DataError(
            "fetch olivetti: expected scikit-learn to be installed, got "
            "ImportError; pip install scikit-learn"
        ) from None
    cache = to / ".cache" / "sklearn"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        bunch = fetch_olivetti_faces(data_home=str(cache), download_if_missing=True)
    except OSError as e:  # URLError, HTTPError, socket timeouts and resets are OSErrors
        raise DataError(_offline_message("olivetti", e)) from None
    images = np.asarray(bunch.images)  # (400, 64, 64) float in [0, 1]
    target = np.asarray(bunch.target)  # (400,) person index 0..39
    if images.ndim != 3 or target.shape != images.shape[:1]:
        raise DataError(
            f"fetch olivetti: expected images (N, H, W) and N targets, got "
            f"{images.shape} and {target.shape}; delete {cache} and retry"
        )
    out = to / "olivetti"
    seen: Counter[int] = Counter()
    order = np.argsort(target, kind="stable")  # person by person, in the source's order
    for done, i in enumerate(order, start=1):
        person = int(target[i])
        seen[person] += 1
        pixels = np.clip(np.rint(images[i] * 255.0), 0, 255).astype(np.uint8)  # (H, W)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        # s1..s40 and 1..10 like the AT&T/ORL release this set comes from.
        _write_atomic(out / f"s{person + 1}" / f"{seen[person]}.png", buf.getvalue(), "olivetti")
        if on_progress is not None:
            on_progress(done, len(order))
    return out


def _fetch_lfw(to: Path, min_images: int, on_progress: Progress | None) -> Path:
    cache = to / ".cache"
    archive = cache / LFW_FUNNELED.filename
    if not archive.exists() or _sha256(archive) != LFW_FUNNELED.sha256:
        _download(LFW_FUNNELED, archive, "lfw", on_progress)
    out = to / "lfw"
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [(m, _person_file(m)) for m in tar.getmembers()]
            jpgs = [(m, pf) for m, pf in members if pf is not None]
            per_person = Counter(person for _, (person, _) in jpgs)
            keep = [(m, pf) for m, pf in jpgs if per_person[pf[0]] >= min_images]
            for done, (m, (person, filename)) in enumerate(keep, start=1):
                f = tar.extractfile(m)  # never None: _person_file keeps regular files only
                assert f is not None
                _write_atomic(out / person / filename, f.read(), "lfw")
                if on_progress is not None:
                    on_progress(done, len(keep))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"fetch lfw: expected a readable archive at {archive}, got "
            f"{_reason(e)}; delete it and run fetch again"
        ) from None
    if not keep:
        raise DataError(
            f"fetch lfw: expected people with at least {min_images} photos in "
            f"{archive}, got none; delete it and run fetch again"
        )
    return out


def _person_file(m: tarfile.TarInfo) -> tuple[str, str] | None:
    """("Name", "Name_0001.jpg") for an archive entry <top>/<Name>/<file>.jpg, else None.

    Entries are read by name and written by us, never extracted, so a hostile archive
    cannot write outside the target folder ("..", absolute paths and links are skipped).
    """
    parts = PurePosixPath(m.name).parts
    if not m.isfile() or len(parts) != 3 or not parts[2].lower().endswith(".jpg"):
        return None
    person, filename = parts[1], parts[2]
    if any(p in ("", ".", "..") or p.startswith(".") for p in (person, filename)):
        return None
    return person, filename


def _download(remote: Remote, dest: Path, name: str, on_progress: Progress | None) -> None:
    """Stream remote.url to dest, checking its sha256; dest appears only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        with urlopen(remote.url, timeout=60) as resp, part.open("wb") as f:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total)
    except OSError as e:  # URLError, HTTPError, socket timeouts and resets are OSErrors
        part.unlink(missing_ok=True)
        raise DataError(_offline_message(name, e)) from None
    if h.hexdigest() != remote.sha256:
        part.unlink(missing_ok=True)
        raise DataError(
            f"fetch {name}: expected sha256 {remote.sha256[:12]}... for "
            f"{remote.url}, got {h.hexdigest()[:12]}...; the download was damaged "
            f"or the mirror changed: retry, or put {remote.filename} in {dest.parent}"
        )
    os.replace(part, dest)


def _offline_message(name: str, e: BaseException) -> str:
    reason = " ".join(str(getattr(e, "reason", None) or e).split()) or type(e).__name__
    local = _LOCAL_COPY[name]
    return (
        f"fetch {name}: cannot download ({reason}; no network?); point facetag at a "
        f"local copy instead, e.g. --data {local} or FACETAG_DATA_DIR=../shared/data"
    )


def _write_atomic(path: Path, data: bytes, name: str) -> None:
    """Write to a temporary sibling, then rename: readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as e:
        # A DataError is not an OSError, so the archive handler in _fetch_lfw does not
        # blame the archive for a full disk.
        raise DataError(
            f"fetch {name}: expected to write {path}, got {_reason(e)}; free "
            "some disk space or choose another --to folder"
        ) from None


def _reason(e: BaseException) -> str:
    text = str(getattr(e, "strerror", None) or e) or type(e).__name__
    return " ".join(text.split())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
