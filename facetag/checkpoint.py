"""Training checkpoints and model files: atomic writes and a format marker.

A checkpoint is a ``torch.save``d dict of plain data (tensors, numbers, strings, lists,
dicts) that ``torch.load(weights_only=True)`` reads back, so loading a file never runs
pickled code. ``save_checkpoint`` adds the marker ``"facetag": {"format": 1, ...}``;
``load_checkpoint`` refuses any file without it. What goes in the state is the training
loop's choice, e.g.::

    save_checkpoint(run_dir / "last.ckpt", {
        "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "config": config_to_dict(cfg), "run_id": run_id,
    })

Resuming is exact without saving RNG states: each epoch re-seeds from (seed, epoch).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from facetag import __version__
from facetag.atomic import replace_atomically
from facetag.errors import ModelError

FORMAT = 1  # bump when the layout of a checkpoint changes incompatibly
MARKER = "facetag"  # the key holding {"format": FORMAT, "version": facetag version}

# What torch.load(weights_only=True) can rebuild without running pickled code.
_PLAIN_LEAVES = (str, bytes, int, float, bool, type(None), Tensor, torch.dtype, torch.device)

# What torch.load raises on files that are not a torch checkpoint: torch wraps pickle, zip
# and storage parsing, so any of these can come out of arbitrary bytes.
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    EOFError,
    RuntimeError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    UnicodeDecodeError,
)


def save_checkpoint(path: Path | str, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (plus the facetag marker) to ``path`` atomically; returns ``path``.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and
    only then replace ``path`` (``os.replace`` is atomic on POSIX and Windows). A crash or
    kill at any moment leaves either the previous checkpoint or the new one, never a
    truncated file; at worst a stray ``.<name>.*.tmp`` file remains. Parent directories
    are created.
    """
    path = Path(path)
    _check_plain(state, "state")
    payload = {**state, MARKER: {"format": FORMAT, "version": __version__}}
    return replace_atomically(path, lambda f: torch.save(payload, f))


def copy_checkpoint(src: Path | str, dst: Path | str) -> Path:
    """Copy a model file byte for byte to ``dst``, atomically like save_checkpoint
    (``train --out``, ``train-detector --out``). Raises ModelError, one line, when ``dst``
    cannot be written; ``src`` is left where it is."""
    src, dst = Path(src), Path(dst)
    data = src.read_bytes()
    try:
        return replace_atomically(dst, lambda f: f.write(data))
    except OSError as e:
        raise ModelError(
            f"{dst}: expected a writable file, got "
            f"{e.strerror or type(e).__name__}; the model is still at {src}"
        ) from None


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; tensors land on ``map_location``.

    Returns the saved state including the ``"facetag"`` marker dict. Raises ModelError
    for a missing path, a directory, garbage bytes, a torch file that needs unpickling
    code (e.g. a whole pickled nn.Module) or one without the facetag marker.
    """
    path = Path(path)
    not_ours = f"{path}: not a facetag checkpoint; expected a file written by facetag train"
    if not path.exists():
        raise ModelError(f"{path}: no such file; expected a checkpoint written by facetag train")
    if not path.is_file():
        raise ModelError(not_ours)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise ModelError(f"{path}: cannot read the checkpoint; check its permissions") from None
    except _LOAD_ERRORS:
        raise ModelError(not_ours) from None
    marker = state.get(MARKER) if isinstance(state, dict) else None
    if not isinstance(marker, dict) or not isinstance(marker.get("format"), int):
        raise ModelError(not_ours)
    if marker["format"] > FORMAT:
        raise ModelError(
            f"{path}: expected checkpoint format <= {FORMAT}, got {marker['format']} "
            f"(written by facetag {marker.get('version', '?')}); upgrade facetag "
            f"(this is {__version__})"
        )
    return cast(dict[str, Any], state)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse objects that weights_only loading cannot rebuild, naming where they are."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise ValueError(
                    f"save_checkpoint: expected str or int keys, got {key!r} in {where}"
                )
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES):
        raise ValueError(
            f"save_checkpoint: expected plain data (tensors, numbers, str, lists, dicts), "
            f"got {type(obj).__name__} at {where}; store e.g. its state_dict() or a dict"
        )
