"""What a tag run writes, in one place: per photo the XMP sidecar, the annotated copy and
the manifest record (in that order: a record means its outputs exist), and at the end the
CSV. The JSON document is the run's return value; the CLI prints it.

Every output folder is checked for writing before the first photo is touched, so a
mistyped path fails in a second, not after an hour of tagging. An output never replaces
what is not ours: ``--csv`` only overwrites a CSV of ours (its header line), never a
photo being tagged, the gallery or the manifest; an annotated copy only overwrites an
annotated copy (writers.ANNOTATED_MARK); the manifest only a manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from facetag.atomic import atomic_write, write_problem
from facetag.data.images import photo_key
from facetag.errors import DataError
from facetag.inference.manifest import DEFAULT_NAME, Manifest
from facetag.inference.writers import (
    CSV_COLUMNS,
    annotate,
    annotated_path,
    write_annotated,
    write_csv,
)
from facetag.inference.xmp import SidecarName, photo_orientation, write_xmp


def check_writable(folder: Path, what: str) -> None:
    """Fail before any work when an output folder cannot be written (one line)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        got = write_problem(e, folder, "check its permissions or choose another")
        raise DataError(f"{folder}: expected a writable folder for {what}, got {got}") from None


def _same(a: Path, b: Path) -> bool:
    return photo_key(a) == photo_key(b) or (a.exists() and b.exists() and a.samefile(b))


def _is_our_csv(path: Path) -> bool:
    """True when ``path`` starts with the header line facetag's CSV has."""
    try:
        with path.open("rb") as f:
            head = f.read(len(",".join(CSV_COLUMNS)) + 2)
    except OSError:
        return False
    return head.split(b"\n", 1)[0].rstrip(b"\r") == ",".join(CSV_COLUMNS).encode()  # \r\n or \n


def cache_dir() -> Path:
    """facetag's folder in the user's cache ($XDG_CACHE_HOME/facetag, ~/.cache/facetag)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facetag"


def manifest_path(
    manifest: Path | None, csv: Path | None, annotate_dir: Path | None, root: Path, gallery: Path
) -> Path:
    """Where the manifest goes: --manifest, else beside --csv, else in --annotate, else in
    the user's cache, named after the photos' folder and the gallery (never the current
    folder: a run with only --xmp or --json must not leave a file where it was started)."""
    if manifest is not None:
        return manifest
    if csv is not None:
        return csv.parent / DEFAULT_NAME
    if annotate_dir is not None:
        return annotate_dir / DEFAULT_NAME
    key = f"{root.resolve()}\n{gallery.resolve()}".encode("utf-8", "surrogateescape")
    return cache_dir() / "manifests" / f"{hashlib.sha256(key).hexdigest()[:24]}.jsonl"


def _index(gallery: Path) -> Path:
    key = str(gallery.resolve()).encode("utf-8", "surrogateescape")
    return cache_dir() / "galleries" / f"{hashlib.sha256(key).hexdigest()[:24]}.json"


def register_manifest(gallery: Path, manifest: Path) -> None:
    """Remember that a tag run on ``gallery`` kept its manifest at ``manifest``, so
    facetag learn finds what facetag said wherever the run's outputs went."""
    index = _index(gallery)
    try:
        known = json.loads(index.read_text()) if index.is_file() else []
    except (OSError, ValueError):
        known = []
    path = str(manifest.resolve())
    if path not in known:
        with contextlib.suppress(OSError):  # a convenience for learn; --manifest still works
            atomic_write(index, json.dumps([*known, path][-50:]).encode())


def manifests_of(gallery: Path) -> list[Path]:
    """The manifests of the tag runs on ``gallery`` (register_manifest), newest first."""
    index = _index(gallery)
    try:
        return [Path(p) for p in reversed(json.loads(index.read_text()))] if index.is_file() else []
    except (OSError, ValueError):
        return []


@dataclass(frozen=True)
class XmpOptions:
    """How sidecars are written (see facetag.inference.xmp); kept in each manifest record,
    so that a run with other options writes the sidecars again."""

    unknown: bool = False  # faces nobody was matched to become regions without a name
    naming: SidecarName = SidecarName.ext  # photo.jpg.xmp or photo.xmp

    def to_json(self) -> dict[str, Any]:
        return {"unknown": self.unknown, "naming": self.naming.value}


class TagOutputs:
    """The files a tag run writes; ``problem`` gets each output that fails (one line),
    ``message`` each note that is not a failure (a name kept in a sidecar)."""

    def __init__(
        self,
        *,
        root: Path,
        csv: Path | None,
        xmp: XmpOptions | None,
        annotate_dir: Path | None,
        manifest: Manifest | None,
        problem: Callable[[Path, str], None],
        message: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.root, self.csv, self.xmp, self.annotate_dir = root, csv, xmp, annotate_dir
        self.manifest, self.problem, self.message = manifest, problem, message

    @classmethod
    def check(
        cls,
        csv: Path | None,
        annotate_dir: Path | None,
        root: Path,
        *,
        photos: list[Path] | None = None,
        gallery: Path | None = None,
    ) -> None:
        """Refuse unusable output places before any work (DataError, one line): a folder
        that cannot be written, and a --csv that would replace a photo, the gallery or any
        file that is not a CSV of ours."""
        if csv is not None:
            if csv.is_dir():
                raise DataError(f"--csv {csv}: expected a file name, got a folder; name a file")
            if csv.exists() or os.path.lexists(csv):
                clash = next((p for p in photos or [] if _same(p, csv)), None)
                if clash is not None or (gallery is not None and _same(gallery, csv)):
                    what = "a photo being tagged" if clash is not None else "the gallery"
                    raise DataError(
                        f"--csv {csv}: expected a new file or a CSV of facetag's, got {what}; "
                        "left unchanged: pass another --csv"
                    )
                if not _is_our_csv(csv):
                    raise DataError(
                        f"--csv {csv}: expected a new file or a CSV of facetag's (header "
                        f"{','.join(CSV_COLUMNS)}), got another file; left unchanged: pass "
                        "another --csv"
                    )
            check_writable(csv.parent, "the CSV")
        if annotate_dir is not None:
            if annotate_dir.resolve() == root:
                raise DataError(
                    f"--annotate {annotate_dir}: expected a folder other than the "
                    "photos' own, got the same; choose another folder"
                )
            check_writable(annotate_dir, "annotated copies")

    @staticmethod
    def check_manifest(where: Path, csv: Path | None, photos: list[Path], gallery: Path) -> None:
        """The manifest may not be the CSV, the gallery or a photo (Manifest.open refuses
        any other file that is not a manifest)."""
        for other, what in ((csv, "the --csv file"), (gallery, "the gallery")):
            if other is not None and _same(where, other):
                raise DataError(
                    f"--manifest {where}: expected a file of its own, got {what}; pass "
                    "another --manifest"
                )
        if any(_same(where, p) for p in photos):
            raise DataError(
                f"--manifest {where}: expected a file of its own, got a photo being tagged; "
                "left unchanged: pass another --manifest"
            )

    def photo(
        self, abs_path: str, record: dict[str, Any], image: Image.Image | None, scale: float
    ) -> None:
        """One photo's sidecar and annotated copy, then its manifest record."""
        result = record["result"]
        path = Path(result["path"])
        if self.xmp is not None:
            try:
                done = write_xmp(
                    path,
                    result,
                    orientation=photo_orientation(path),
                    naming=self.xmp.naming,
                    unknown=self.xmp.unknown,
                )
                record["xmp"] = str(done.path.resolve()) if done.path else None
                record["xmp_options"] = self.xmp.to_json()
                for note in done.notes:
                    self.message(note)
            except DataError as e:
                self.problem(path, str(e))
        if self.annotate_dir is not None and image is not None:
            out = annotated_path(self.annotate_dir, Path(abs_path).relative_to(self.root))
            try:
                write_annotated(out, annotate(image, result, scale))
                record["annotated"] = str(out.resolve())
            except DataError as e:
                self.problem(path, str(e))
        if self.manifest is not None:
            self.manifest.append(record)

    def finish(self, images: list[dict[str, Any]]) -> None:
        """The CSV of the whole run (this run's photos and the resumed ones)."""
        if self.csv is None:
            return
        try:
            write_csv(self.csv, images)
        except OSError as e:
            got = write_problem(e, self.csv.parent, "check its folder's permissions")
            raise DataError(f"{self.csv}: expected a writable file, got {got}") from None
