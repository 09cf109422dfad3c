"""Resume for ``facetag tag``: an append-only JSONL manifest of finished photos.

    {"format": "facetag-manifest/1"}                      <- first line
    {"path": "/abs/photo.jpg", "sha256": "...", "key": {...}, "result": {...},
     "xmp": "/abs/photo.xmp" | null, "annotated": "/out/photo.jpg" | null}
    ...

``key`` holds what a result depends on besides the photo: detector and embedder versions,
threshold, gallery fingerprint and crop margin. A photo is done when its latest record has
the photo's current sha256, the current key, and every output asked for now exists.

Paths that are not UTF-8 are kept as ``\\udcXX`` escapes (facetag.fsnames), so a
record names the file it was made from and the manifest stays valid UTF-8 JSON.

A record is appended (one write, flushed and fsynced) only after the photo's other outputs
were written atomically, so after a kill -9 at any moment a photo is either recorded with
all of its outputs or redone. The last line may be torn by the kill: opening the manifest
drops lines that do not parse and rewrites it atomically with the latest record of each
photo, so it never grows duplicates. The JSON and CSV of a run are made from the records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from facetag.atomic import atomic_write, write_problem
from facetag.errors import DataError
from facetag.fsnames import json_text

MANIFEST_FORMAT = "facetag-manifest/1"
DEFAULT_NAME = "facetag-manifest.jsonl"


class Manifest:
    """The finished photos of earlier runs (path -> record) and an appender for new ones."""

    def __init__(self, path: Path, records: dict[str, dict[str, Any]], dropped: int) -> None:
        self.path = path
        self.records = records
        self.dropped = dropped  # torn or unreadable lines dropped when it was opened
        self._fd: int | None = None

    @classmethod
    def open(cls, path: Path) -> Manifest:
        """Read (and compact) the manifest at ``path``, or start an empty one.

        Raises DataError when ``path`` is something else (not ours: left untouched) or
        cannot be written.
        """
        records: dict[str, dict[str, Any]] = {}
        dropped = 0
        if path.exists():
            try:
                lines = path.read_bytes().split(b"\n")
            except OSError as e:
                raise DataError(
                    f"{path}: expected a readable manifest, got "
                    f"{e.strerror or type(e).__name__}; check its permissions"
                ) from None
            if any(lines) and _header(lines[0]) != MANIFEST_FORMAT:
                raise DataError(
                    f"{path}: expected a facetag tagging manifest ({MANIFEST_FORMAT}), got "
                    "another file; left unchanged: pass another --manifest"
                )
            for line in lines[1:]:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
                        raise TypeError("not a record")
                    records[rec["path"]] = rec
                # ValueError: a number of > 4300 digits; RecursionError: absurd nesting
                except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
                    dropped += 1  # a line torn by a kill; its photo is redone
        m = cls(path, records, dropped)
        m.compact()
        return m

    def compact(self) -> None:
        """Rewrite the file atomically: the header and the latest record of each photo."""
        text = (
            json.dumps({"format": MANIFEST_FORMAT})
            + "\n"
            + "".join(json_text(r) + "\n" for r in self.records.values())
        )
        self.close()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, text.encode("utf-8"))
        except OSError as e:
            got = write_problem(
                e, self.path.parent, "check the folder's permissions or pass --manifest"
            )
            raise DataError(
                f"{self.path}: expected a writable place for the manifest, got {got}"
            ) from None

    def is_done(
        self, path: str, sha256: str, key: dict[str, Any], outputs: dict[str, bool]
    ) -> bool:
        """True when ``path`` was finished with this content and key and the outputs asked
        for (``{"xmp": True, "annotated": False}``) are there."""
        rec = self.records.get(path)
        if rec is None or rec.get("sha256") != sha256 or rec.get("key") != key:
            return False
        for name, wanted in outputs.items():
            if not wanted:
                continue
            if name not in rec:
                return False
            where = rec[name]
            if name == "annotated" and not (where and Path(where).is_file()):
                return False
            if name == "xmp" and where and not Path(where).is_file():
                return False
        return True

    def append(self, record: dict[str, Any]) -> None:
        """Add one finished photo: a single write of one line, flushed and fsynced."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        os.write(self._fd, (json_text(record) + "\n").encode("utf-8"))
        os.fsync(self._fd)
        self.records[str(record["path"])] = record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _header(line: bytes) -> str | None:
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc.get("format") if isinstance(doc, dict) else None
