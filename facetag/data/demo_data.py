"""``facetag data fetch demo``: what ``make demo`` needs, on a machine without our data.

    <to>/wider_train/   1,000 WIDER FACE train photos (seed 0) and their boxes: the
                        detector's training photos
    <to>/lfw/           60 LFW people A-M with 8 photos or more (seed 0), their first 8:
                        the ResNet's fine-tuning chips and the detector's face crops
    <to>/knn_examples/  the tagging test, in the layout of face_recognition's knn example:
        train/obama/obama.jpg, train/biden/biden.jpg   face_recognition 1.3.0's test photos
        train/<Name>/<Name>_0001.jpg, _0002.jpg        4 LFW people N-Z (seed 0)
        test/obama2.jpg ... 32bit.png                  Obama again: partial faces, an RGBA PNG
        test/<Name>_0003.jpg, _0004.jpg                the same 4 people, other photos
        test/<Name>_0001.jpg                           2 more people N-Z: strangers, "unknown"
        expected.csv                                   image,names (written last)
    <to>/SOURCES.txt    where each part came from, its digest and licence

The people tagged from LFW start with N-Z: held out from every training, here too (lfw/
holds people A-M only). face_recognition's photos arrive with its source distribution on
PyPI (MIT licence), so they are there wherever pip works.
"""

from __future__ import annotations

import csv
import io
import os
import random
import tarfile
from pathlib import Path

from facetag.data.fetch import (
    LFW_FUNNELED,
    MIRROR_ENV,
    WIDER_SPLIT,
    WIDER_TRAIN,
    Progress,
    Remote,
    archive_files,
    fetch_wider,
    lfw_people,
    obtain,
    write_file,
    write_members,
)
from facetag.data.folders import held_out
from facetag.errors import DataError

FACE_RECOGNITION_SDIST = Remote(
    filename="face_recognition-1.3.0.tar.gz",
    urls=(
        "https://files.pythonhosted.org/packages/6c/49/"
        "75dda409b94841f01cbbc34114c9b67ec618265084e4d12d37ab838f4fd3/"
        "face_recognition-1.3.0.tar.gz",
    ),
    digest="sha256:5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
)
_SDIST_PHOTOS = "face_recognition-1.3.0/tests/test_images/"
# file in the source distribution -> (where it goes, who is in it)
SDIST_LAYOUT = {
    "obama.jpg": ("train/obama/obama.jpg", "obama"),
    "biden.jpg": ("train/biden/biden.jpg", "biden"),
    "obama2.jpg": ("test/obama2.jpg", "obama"),
    "obama3.jpg": ("test/obama3.jpg", "obama"),
    "obama_partial_face.jpg": ("test/obama_partial_face.jpg", "obama"),
    "obama_partial_face2.jpg": ("test/obama_partial_face2.jpg", "obama"),
    "32bit.png": ("test/32bit.png", "obama"),
}
WIDER_PHOTOS = 1000  # of 12,880: about as many as our local copy holds (931)
TRAIN_PEOPLE = 60  # LFW A-M people for training: ~480 photos, like johns + glint_celebs
TRAIN_PHOTOS = 8  # the first 8 of each, as in our local copy of LFW
KNOWN, STRANGERS = 4, 2  # LFW N-Z people enrolled with 2 photos, and not enrolled
SEED = 0


def fetch_demo(to: Path, on_progress: Progress | None = None) -> Path:
    """Write the demo's folders under `to` (see the module docstring); returns `to`."""
    cache = to / ".cache"
    lfw = obtain(LFW_FUNNELED, cache, "demo", on_progress)
    sdist = obtain(FACE_RECOGNITION_SDIST, cache, "demo", on_progress)
    knn = to / "knn_examples"
    expected: dict[str, list[str]] = {}

    people = lfw_people(lfw, "demo")
    rng = random.Random(SEED)
    train = [p for p, ms in people.items() if not held_out("lfw", p) and len(ms) >= TRAIN_PHOTOS]
    held = [p for p, ms in people.items() if held_out("lfw", p) and len(ms) >= 4]
    if not train or len(held) < KNOWN + STRANGERS:
        raise DataError(
            f"fetch demo: expected LFW people A-M with {TRAIN_PHOTOS} photos and "
            f"{KNOWN + STRANGERS} people N-Z with 4 in {lfw}, got {len(train)} and "
            f"{len(held)}; delete it and run fetch again"
        )
    chosen = rng.sample(held, KNOWN + STRANGERS)
    dest: dict[tarfile.TarInfo, Path] = {}
    for person in sorted(rng.sample(train, min(TRAIN_PEOPLE, len(train)))):
        for m in people[person][:TRAIN_PHOTOS]:
            dest[m] = to / "lfw" / person / Path(m.name).name
    for k, person in enumerate(chosen):
        theirs = people[person]
        if k < KNOWN:
            for m in theirs[:2]:
                dest[m] = knn / "train" / person / Path(m.name).name
            tests = theirs[2:4]
        else:
            tests = theirs[:1]
        for m in tests:
            dest[m] = knn / "test" / Path(m.name).name
            expected[f"test/{Path(m.name).name}"] = [person if k < KNOWN else "unknown"]
    write_members(lfw, dest, "demo", on_progress)

    photos = {m.name.removeprefix(_SDIST_PHOTOS): m for m in archive_files(sdist, "demo")}
    missing = sorted(set(SDIST_LAYOUT) - set(photos))
    if missing:
        raise DataError(
            f"fetch demo: expected {', '.join(missing)} in {sdist}, got no such entries; "
            "delete it and run fetch again"
        )
    write_members(sdist, {photos[f]: knn / where for f, (where, _) in SDIST_LAYOUT.items()}, "demo")
    for where, person in SDIST_LAYOUT.values():
        if where.startswith("test/"):
            expected[where] = [person]

    fetch_wider(to, WIDER_PHOTOS, SEED, on_progress)
    write_file(to / "SOURCES.txt", _sources().encode(), "demo")
    buf = io.StringIO()
    rows = csv.writer(buf, lineterminator="\n")
    rows.writerow(["image", "names"])
    rows.writerows([image, ";".join(names)] for image, names in sorted(expected.items()))
    write_file(knn / "expected.csv", buf.getvalue().encode(), "demo")
    return to


def _sources() -> str:
    def line(remote: Remote, what: str) -> str:
        return f"{remote.filename}\t{remote.urls[0]}\t{remote.digest}\t{what}\n"

    mirror = os.environ.get(MIRROR_ENV, "").strip()
    via = f"# read from the mirror {mirror} ({MIRROR_ENV}), not the URLs\n" if mirror else ""
    return (
        "# What facetag data fetch demo wrote, from where (archive, first URL, digest, licence)\n"
        + via
        + line(LFW_FUNNELED, "LFW (Huang et al. 2007): lfw/ and the LFW people in knn_examples/")
        + line(FACE_RECOGNITION_SDIST, "face_recognition 1.3.0 (MIT): the obama and biden photos")
        + line(WIDER_TRAIN, "WIDER FACE (Yang et al. 2016; non-commercial research use)")
        + line(WIDER_SPLIT, "WIDER FACE boxes: wider_train/wider_face_train_bbx_gt.txt")
    )
