"""The facetag command line (Typer): a module per command group, each command parsing
its options, making one library call and printing a ``format_*`` of the result.

    _app.py       the Typer apps (facetag, bench, data)
    _common.py    device choice, shared options, errors, --model resolution
    progress.py   the only progress bar (rich.progress)
    layers.py     gradcheck, bench train|infer
    data.py       data info|fetch|crops
    train.py      train, sweep, evaluate, export, ui
    detector.py   train-detector, detect, evaluate-detector, bench detect
    tag.py        enroll, tag, bench tag
    models.py     import dlib, bench embed
    learn.py      learn, cluster, name (the tagger learns from its user)
"""

from __future__ import annotations

from typing import Annotated

import typer

from facetag import __version__
from facetag.cli import data, detector, layers, learn, models, tag, train
from facetag.cli._app import app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"facetag {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """Find the faces in your photos and name the people you know."""


__all__ = ["app", "data", "detector", "layers", "learn", "models", "tag", "train"]
