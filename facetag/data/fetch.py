"""Download public face sets and write them out as person folders.

    olivetti -> <to>/olivetti/s1..s40/1..10.png   (scikit-learn's Olivetti faces, 64x64 grey)
    lfw      -> <to>/lfw/<Name>/<Name>_NNNN.jpg   (LFW, funneled, 250x250 colour)
    wider    -> <to>/wider_train/images/<event>/*.jpg and wider_face_train_bbx_gt.txt
                (WIDER FACE train split, every photo or a seeded sample of them)
    demo     -> <to>/ what ``make demo`` needs on a machine without our data
                (facetag.data.demo_data)

Downloads are cached in <to>/.cache and checked against the digest their publisher lists.
Every file is written to a temporary name and renamed into place, so an interrupted fetch
never leaves a half-written image behind; running it again finishes the job. Offline,
fetch fails with one line that says how to point facetag at a local copy instead.

``FACETAG_FETCH_MIRROR=DIR`` takes the archives from DIR (under their upstream file
names) instead of the internet: for machines behind a firewall and for CI, which is
offline. A mirror may hold a subset of a set (CI's is built from our local copy); its
``SHA256SUMS`` file (``sha256sum`` format) then lists the digests to expect, and files it
does not list must match the publisher's.
"""

import hashlib
import io
import os
import random
import shutil
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.request import urlopen

import numpy as np
from PIL import Image

from facetag.atomic import atomic_write
from facetag.data.boxes import wider_records
from facetag.errors import DataError

Progress = Callable[[int, int], None]  # (done, total)

NAMES = ("olivetti", "lfw", "wider", "demo")
MIRROR_ENV = "FACETAG_FETCH_MIRROR"


@dataclass(frozen=True)
class Remote:
    filename: str
    urls: tuple[str, ...]  # tried in turn
    digest: str  # "sha256:<hex>" or "md5:<hex>": what the publisher lists


# The LFW "funneled" archive on the figshare mirror that scikit-learn downloads from
# (sklearn.datasets._lfw.FUNNELED_ARCHIVE). NOTE: the original UMass site is gone, and
# torchvision >= 0.22's LFWPeople refuses download=True for that reason.
LFW_FUNNELED = Remote(
    filename="lfw-funneled.tgz",
    urls=("https://ndownloader.figshare.com/files/5976015",),
    digest="sha256:b47c8422c8cded889dc5a13418c4bc2abbda121092b3533a83306f90d900100a",
)
# WIDER FACE (Yang et al. 2016; non-commercial research use). The official links are a
# Google Drive file (id 15hGDLhsx8bLgLcIRD5DhYt5iBxnjNF1M, behind a confirmation page) and
# the authors' site; these are plain-HTTPS copies of the same files, checked against the
# md5 sums torchvision.datasets.WIDERFace pins for the originals.
WIDER_TRAIN = Remote(
    filename="WIDER_train.zip",
    urls=(
        "https://huggingface.co/datasets/CUHK-CSE/wider_face/resolve/main/data/WIDER_train.zip",
        "https://dataset.bj.bcebos.com/wider_face/WIDER_train.zip",
    ),
    digest="md5:3fedf70df600953d25982bcd13d91ba2",
)
WIDER_SPLIT = Remote(
    filename="wider_face_split.zip",
    urls=(
        "http://shuoyang1213.me/WIDERFACE/support/bbx_annotation/wider_face_split.zip",
        "https://huggingface.co/datasets/CUHK-CSE/wider_face/resolve/main/data/wider_face_split.zip",
    ),
    digest="md5:0e3767bcf0e326556d407bf5bff5d27c",
)
WIDER_GT = "wider_face_split/wider_face_train_bbx_gt.txt"

_LOCAL_COPY = {
    "olivetti": "../shared/data/orl",
    "lfw": "../shared/data/lfw",
    "wider": "../shared/data/wider_train",
    "demo": "../shared/data",
}


def fetch(
    name: str,
    to: Path | str,
    *,
    min_images: int = 2,
    max_images: int = 0,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> Path:
    """Download data set `name` (one of NAMES) into <to>/<name>/ files.

    Returns the written root. For lfw only people with at least min_images photos are
    written (a person with one photo cannot be split into train and test; LFW has 5749
    people, 1680 of them with two or more). For wider, max_images > 0 writes a sample of
    that many photos chosen with `seed` (0 = all 12,880). on_progress(done, total) is
    called as the download and the writing advance. Raises DataError with a one-line fix
    when the download fails (offline, say) or the data is damaged.
    """
    to = Path(to)
    if name == "olivetti":
        return _fetch_olivetti(to, on_progress)
    elif name == "lfw":
        if min_images < 1:
            raise ValueError(f"fetch: expected min_images >= 1, got {min_images}")
        return _fetch_lfw(to, min_images, on_progress)
    elif name == "wider":
        if max_images < 0:
            raise ValueError(f"fetch: expected max_images >= 0, got {max_images}")
        return fetch_wider(to, max_images, seed, on_progress)
    elif name == "demo":
        from facetag.data.demo_data import fetch_demo

        return fetch_demo(to, on_progress)
    else:
        expected = ", ".join(repr(n) for n in NAMES)
        raise ValueError(f"fetch: expected name {expected}, got {name!r}")


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
        write_file(out / f"s{person + 1}" / f"{seen[person]}.png", buf.getvalue(), "olivetti")
        if on_progress is not None:
            on_progress(done, len(order))
    return out


def _fetch_lfw(to: Path, min_images: int, on_progress: Progress | None) -> Path:
    archive = obtain(LFW_FUNNELED, to / ".cache", "lfw", on_progress)
    out = to / "lfw"
    people = lfw_people(archive, "lfw")
    keep = {m: out / person / PurePosixPath(m.name).name
            for person, photos in people.items() if len(photos) >= min_images
            for m in photos}  # fmt: skip
    if not keep:
        raise DataError(
            f"fetch lfw: expected people with at least {min_images} photos in "
            f"{archive}, got none; delete it and run fetch again"
        )
    write_members(archive, keep, "lfw", on_progress)
    return out


def archive_files(archive: Path, name: str) -> list[tarfile.TarInfo]:
    """The regular files of a .tar.gz, listed without extracting anything."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            return [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise damaged(name, archive, e) from None


def lfw_people(archive: Path, name: str) -> dict[str, list[tarfile.TarInfo]]:
    """{person: their photo entries, by file name} of an LFW archive, read without extracting."""
    people: dict[str, list[tarfile.TarInfo]] = {}
    for m in archive_files(archive, name):
        pf = _person_file(m)
        if pf is not None:
            people.setdefault(pf[0], []).append(m)
    return {p: sorted(ms, key=lambda m: m.name) for p, ms in sorted(people.items())}


def write_members(
    archive: Path,
    dest: dict[tarfile.TarInfo, Path],
    name: str,
    on_progress: Progress | None = None,
) -> None:
    """Write the chosen entries of a .tar.gz to their paths, in archive order (one pass)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for done, m in enumerate(sorted(dest, key=lambda m: m.offset), start=1):
                f = tar.extractfile(m)  # never None: callers pass regular files only
                assert f is not None
                write_file(dest[m], f.read(), name)
                if on_progress is not None:
                    on_progress(done, len(dest))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise damaged(name, archive, e) from None


def damaged(name: str, archive: Path, e: BaseException) -> DataError:
    return DataError(
        f"fetch {name}: expected a readable archive at {archive}, got "
        f"{_reason(e)}; delete it and run fetch again"
    )


def _person_file(m: tarfile.TarInfo) -> tuple[str, str] | None:
    """("Name", "Name_0001.jpg") for an archive entry <top>/<Name>/<file>.jpg, else None.

    Entries are read by name and written by us, never extracted, so a hostile archive
    cannot write outside the target folder ("..", absolute paths and links are skipped).
    """
    parts = PurePosixPath(m.name).parts
    if not m.isfile() or len(parts) != 3 or not parts[2].lower().endswith(".jpg"):
        return None
    person, filename = parts[1], parts[2]
    if not (_safe(person) and _safe(filename)):
        return None
    return person, filename


def _safe(part: str) -> bool:
    return part not in ("", ".", "..") and not part.startswith(".") and "\\" not in part


def fetch_wider(to: Path, max_images: int, seed: int, on_progress: Progress | None) -> Path:
    """WIDER FACE train photos and their boxes as <to>/wider_train (the layout of our copy).

    With max_images > 0, a sample of that many photos chosen with `seed` from those the box
    file lists; the box file written lists exactly the photos written, and is written last,
    so an interrupted fetch is finished by running it again.
    """
    cache = to / ".cache"
    images_zip = obtain(WIDER_TRAIN, cache, "wider", on_progress)
    split_zip = obtain(WIDER_SPLIT, cache, "wider", on_progress)
    try:
        with zipfile.ZipFile(split_zip) as z:
            text = z.read(WIDER_GT).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, OSError) as e:
        raise DataError(
            f"fetch wider: expected {WIDER_GT} in {split_zip}, got {_reason(e)}; delete "
            "it and run fetch again"
        ) from None
    gt = cache / "wider_face_train_bbx_gt.txt"
    records = {image: block for image, _, block in wider_records(gt, text)}
    out = to / "wider_train"
    try:
        with zipfile.ZipFile(images_zip) as z:
            members = {
                n.removeprefix("WIDER_train/images/"): n
                for n in z.namelist()
                if n.startswith("WIDER_train/images/") and not n.endswith("/")
            }
            names = sorted(n for n in records if n in members and _safe_relative(n))
            if not names:
                raise DataError(
                    f"fetch wider: expected the photos {WIDER_GT} names in {images_zip}, "
                    "found none; delete both and run fetch again"
                )
            if 0 < max_images < len(names):
                names = sorted(random.Random(seed).sample(names, max_images))
            for done, n in enumerate(names, start=1):
                write_file(out / "images" / n, z.read(members[n]), "wider")
                if on_progress is not None:
                    on_progress(done, len(names))
    except (zipfile.BadZipFile, zlib.error, OSError) as e:
        raise damaged("wider", images_zip, e) from None
    box_text = "".join(records[n] for n in names)
    write_file(out / "wider_face_train_bbx_gt.txt", box_text.encode(), "wider")
    return out


def _safe_relative(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return len(parts) == 2 and all(_safe(p) for p in parts) and name.lower().endswith(".jpg")


def obtain(remote: Remote, cache: Path, name: str, on_progress: Progress | None) -> Path:
    """The verified archive in `cache`: kept if already there, else from the mirror
    (FACETAG_FETCH_MIRROR) or downloaded from remote.urls in turn."""
    archive = cache / remote.filename
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    expected = _mirror_digest(Path(mirror), remote) if mirror else remote.digest
    if archive.exists() and _digest(archive, expected) == expected:
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    if mirror:
        source = Path(mirror) / remote.filename
        try:
            shutil.copyfile(source, part)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise DataError(
                f"fetch {name}: expected {remote.filename} in the mirror {mirror} "
                f"({MIRROR_ENV}), got {_reason(e)}; put it there or unset {MIRROR_ENV}"
            ) from None
        where = str(source)
    else:
        where = _download(remote, part, name, on_progress)
    got = _digest(part, expected)
    if got != expected:
        part.unlink(missing_ok=True)
        algo, want = expected.split(":", 1)
        raise DataError(
            f"fetch {name}: expected {algo} {want[:12]}... for {where}, got "
            f"{got.split(':', 1)[1][:12]}...; the download was damaged or the mirror "
            f"changed: retry, or put {remote.filename} in {cache}"
        )
    os.replace(part, archive)
    return archive


def _mirror_digest(mirror: Path, remote: Remote) -> str:
    """The digest a mirror's SHA256SUMS lists for remote.filename, else the publisher's."""
    try:
        lines = (mirror / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return remote.digest
    for line in lines:
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == remote.filename:
            return f"sha256:{fields[0].lower()}"
    return remote.digest


def _download(remote: Remote, part: Path, name: str, on_progress: Progress | None) -> str:
    """Stream the first of remote.urls that answers to `part`; returns that URL."""
    error: BaseException | None = None
    for url in remote.urls:
        try:
            with urlopen(url, timeout=60) as resp, part.open("wb") as f:
                total = int(resp.headers.get("Content-Length") or 0)
                done = 0
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, total)
            return url
        except OSError as e:  # URLError, HTTPError, socket timeouts and resets are OSErrors
            part.unlink(missing_ok=True)
            error = e
    assert error is not None
    raise DataError(_offline_message(name, error, f"{remote.filename} in {part.parent}"))


def _offline_message(name: str, e: BaseException, put_file: str = "") -> str:
    reason = " ".join(str(getattr(e, "reason", None) or e).split()) or type(e).__name__
    local = _LOCAL_COPY[name]
    put = f" (or put {put_file})" if put_file else ""
    return (
        f"fetch {name}: cannot download ({reason}; no network?); point facetag at a "
        f"local copy instead, e.g. --data {local} or FACETAG_DATA_DIR=../shared/data{put}"
    )


def write_file(path: Path, data: bytes, name: str) -> None:
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


def _digest(path: Path, like: str) -> str:
    """ "<algo>:<hex>" of a file, with the algorithm of `like` ("sha256:..." or "md5:...")."""
    algo = like.split(":", 1)[0]
    h = hashlib.new(algo)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{algo}:{h.hexdigest()}"
