"""``facetag data info|fetch|crops``: look at, download and prepare face datasets."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from facetag.cli._app import data_app
from facetag.cli._common import JsonOpt, fail, model_ref
from facetag.cli.progress import ProgressBar
from facetag.errors import FacetagError


@data_app.command("info")
def data_info(
    path: Annotated[Path, typer.Argument(help="A folder of person folders: PATH/<person>/*.jpg")],
) -> None:
    """People, images, image sizes and problems found in a person-folder dataset."""
    from facetag.data.folders import format_info, info

    try:
        report = info(path)
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(format_info(report))


class FetchName(str, Enum):
    olivetti = "olivetti"
    lfw = "lfw"


@data_app.command("fetch")
def data_fetch(
    name: Annotated[FetchName, typer.Argument(help="Which dataset to download.")],
    to: Annotated[Path, typer.Option(help="Where to write the person folders.")] = Path("data"),
) -> None:
    """Download a public face dataset (needs the internet) as person folders."""
    from facetag.data.fetch import fetch

    try:
        out = fetch(name.value, to)
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(str(out))


def format_crops(summary: dict[str, object], merged: dict[str, list[str]]) -> str:
    joined = ", ".join(f"{k} ({' + '.join(v)})" for k, v in merged.items()) or "none"
    return (
        f"{summary['crops']} crops of {summary['people']} people in {summary['out']} "
        f"({summary['written']} new, {summary['kept']} kept); no face found in "
        f"{summary['no_face']} photos; merged: {joined}"
    )


@data_app.command("crops")
def data_crops(
    sources: Annotated[list[Path], typer.Argument(help="Folders of person folders.")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Where the crops go.")],
    size: Annotated[int, typer.Option(min=16, help="Side of the saved crops, px.")] = 112,
    detector: Annotated[
        str | None, typer.Option(help="Detector (default: the shipped one).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Cut the face of every photo the way tagging does, into OUT/<person>/ for training.

    People with the same folder name in two sources are merged into one person.
    """
    from facetag.inference.crops import cut_crops
    from facetag.inference.models import open_detector

    try:
        det = open_detector(model_ref(detector), "cpu")
        with ProgressBar("warning") as bar:
            report = cut_crops(
                sources, out, det, size=size, on_message=bar.message, progress=bar.update
            )
    except FacetagError as e:
        raise fail(e) from None
    summary = report.summary()
    typer.echo(json.dumps(summary, indent=2) if as_json else format_crops(summary, report.merged))
