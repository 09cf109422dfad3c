"""What a tag run writes, in one place: per photo the XMP sidecar, the annotated copy and
the manifest record (in that order: a record means its outputs exist), and at the end the
CSV. The JSON document is the run's return value; the CLI prints it.

Every output folder is checked for writing before the first photo is touched, so a
mistyped path fails in a second, not after an hour of tagging.
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

from facetag.atomic import atomic_write
from facetag.errors import DataError
from facetag.inference.manifest import DEFAULT_NAME, Manifest
from facetag.inference.writers import annotate, annotated_path, write_annotated, write_csv
from facetag.inference.xmp import SidecarName, photo_orientation, write_xmp


def check_writable(folder: Path, what: str) -> None:
    """Fail before any work when an output folder cannot be written (one line)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DataError(
            f"{folder}: expected a writable folder for {what}, got "
            f"{e.strerror or type(e).__name__}; check its permissions or choose another"
        ) from None


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
    def check(cls, csv: Path | None, annotate_dir: Path | None, root: Path) -> None:
        """Refuse unusable output places before any work (DataError, one line)."""
        if csv is not None:
            check_writable(csv.parent, "the CSV")
        if annotate_dir is not None:
            if annotate_dir.resolve() == root:
                raise DataError(
                    f"--annotate {annotate_dir}: expected a folder other than the "
                    "photos' own, got the same; choose another folder"
                )
            check_writable(annotate_dir, "annotated copies")

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
            raise DataError(
                f"{self.csv}: expected a writable file, got "
                f"{e.strerror or type(e).__name__}; check its folder"
            ) from None
