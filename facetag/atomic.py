"""Crash-safe file writes: a crash or kill -9 leaves the old file or the new one, never half.

Every file facetag writes that a user keeps (galleries, manifests, sidecars, checkpoints,
model files, crops, downloads, landmark labels) goes through ``replace_atomically``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write through ``write`` to a temporary file beside ``path``, fsync, rename over it.

    os.replace is atomic; the folder is fsynced so the rename survives a power cut. An
    existing file's permission bits are kept (a sidecar the user made); a new file gets
    the umask's; a missing folder is made. Raises OSError (PermissionError for a
    read-only folder) for the caller.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


_SYSTEM = (("proc",), ("sys",))  # the first part of the kernel's own folders


def write_problem(e: OSError, folder: Path, fix: str) -> str:
    """What a failed write into ``folder`` got, and the advice that fits it: "<reason>; <fix>".

    ``fix`` is the caller's advice for the usual case (permissions); a name too long or a
    folder where no file can be made (/proc, /sys) gets advice of its own, not ``fix``.
    """
    reason = e.strerror or type(e).__name__
    if e.errno == errno.ENAMETOOLONG:
        return f"a name too long for the filesystem ({reason}); shorten the name"
    if e.errno == errno.EROFS:
        return f"a read-only filesystem ({reason}); choose a folder on a writable disk"
    system = folder.is_dir() and (
        e.errno == errno.ENOENT
        or (e.errno in (errno.EACCES, errno.EPERM) and folder.resolve().parts[1:2] in _SYSTEM)
    )
    if system:
        return f"a folder where no file can be made ({reason}); choose another folder"
    return f"{reason}; {fix}"


def atomic_write(path: Path, data: bytes) -> Path:
    """``data`` into ``path`` by replace_atomically."""
    return replace_atomically(path, lambda f: f.write(data))


def fsync_dir(folder: Path) -> None:
    """fsync a folder (makes a rename durable); a no-op where folders cannot be opened."""
    # NOTE: directories cannot be opened for fsync on Windows; the rename is still atomic.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
