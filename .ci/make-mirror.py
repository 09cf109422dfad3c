"""Build a FACETAG_FETCH_MIRROR folder from our local copy of the face data, for CI.

CI is offline, but `make demo` on a machine without the face data downloads what it
needs (facetag data fetch demo). This packs the local copy's subsets of LFW and WIDER
FACE into archives laid out like the published ones, under their upstream names, with a
SHA256SUMS file for them (a mirror of a subset: fetch checks these sums instead of the
publisher's). face_recognition's source distribution comes from PyPI itself (pip
download, beside this script), so its sha256 is the published one.

    python .ci/make-mirror.py ../shared/data OUT
"""

import hashlib
import sys
import tarfile
import zipfile
from pathlib import Path


def main(shared: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    built = []
    lfw = out / "lfw-funneled.tgz"
    with tarfile.open(lfw, "w:gz", compresslevel=1) as tar:
        for photo in sorted((shared / "lfw").glob("*/*.jpg")):
            tar.add(photo, arcname=f"lfw_funneled/{photo.parent.name}/{photo.name}")
    built.append(lfw)
    wider = shared / "wider_train"
    images = out / "WIDER_train.zip"
    with zipfile.ZipFile(images, "w", zipfile.ZIP_STORED) as z:
        for photo in sorted((wider / "images").glob("*/*.jpg")):
            z.write(photo, f"WIDER_train/images/{photo.parent.name}/{photo.name}")
    built.append(images)
    split = out / "wider_face_split.zip"
    with zipfile.ZipFile(split, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(
            wider / "wider_face_train_bbx_gt.txt", "wider_face_split/wider_face_train_bbx_gt.txt"
        )
    built.append(split)
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in built)
    (out / "SHA256SUMS").write_text(sums)
    print(f"mirror: {out} ({', '.join(p.name for p in built)})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
