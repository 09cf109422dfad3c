"""What every command module shares: the device choice, common options, the one-line
error exit, flag-to-override conversion and --model / --detector resolution."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from facetag.errors import FacetagError
from facetag.fsnames import printable
from facetag.models.io import ModelRef


class Device(str, Enum):
    auto = "auto"  # cuda when available; the device actually used is always reported
    cpu = "cpu"
    cuda = "cuda"


DeviceOpt = Annotated[Device, typer.Option(help="Where to run (auto: CUDA when available).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def fail(e: FacetagError) -> typer.Exit:
    """Print ``e`` as one red line on stderr; raise the result (exit code 1)."""
    typer.secho(f"error: {printable(str(e))}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def report_error(message: str) -> None:
    """A problem with one input while the others go on: one red line on stderr."""
    typer.secho(f"error: {printable(message)}", fg=typer.colors.RED, err=True)


def echo(text: str, err: bool = False) -> None:
    """typer.echo for text that may hold file names that are not UTF-8 (fsnames)."""
    typer.echo(printable(text), err=err)


def flag_overrides(**flags: object) -> dict[str, object]:
    """The training flags that were given, as config overrides (paths and enums as text)."""
    out: dict[str, object] = {}
    for key, value in flags.items():
        if value is None:
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out


def model_ref(spec: str | None, *, calibrated: bool = False) -> ModelRef:
    """A --model / --detector spec as a local file (ModelError, one line, if missing).

    None: the shipped file; ``none``: no detector. A local checkpoint file is used as it
    is; MLflow URIs and model folders go through the tracking store (importing MLflow
    only then), with the threshold facetag evaluate stored when ``calibrated``.
    """
    if spec is None:
        return ModelRef()
    if spec == "none":
        return ModelRef(spec="none")
    if not spec.startswith(("runs:/", "models:/")) and Path(spec).is_file():
        return ModelRef(Path(spec), spec)
    from facetag.training.tracking import resolve_model

    return resolve_model(spec, calibrated=calibrated)


def positive(value: float | None) -> float | None:
    if value is not None and not value > 0:  # NaN fails too
        raise typer.BadParameter(f"expected a value > 0, got {value}")
    return value


def probability(value: float | None) -> float | None:
    if value is not None and not 0 <= value <= 1:
        raise typer.BadParameter(f"expected a probability in [0, 1], got {value}")
    return value


def distance(value: float | None) -> float | None:
    if value is not None and not 0 < value < 2:
        raise typer.BadParameter(f"expected a cosine distance in (0, 2), got {value}")
    return value
