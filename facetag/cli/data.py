"""``facetag data info|fetch|crops``: look at, download and prepare face datasets."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from facetag.cli._app import data_app
from facetag.cli._common import JsonOpt, fail, model_ref
from facetag.cli.progress import ProgressBar
from facetag.errors import FacetagError

if TYPE_CHECKING:
    from facetag.inference.crops import CropReport


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
    wider = "wider"
    demo = "demo"


@data_app.command("fetch")
def data_fetch(
    name: Annotated[FetchName, typer.Argument(help="Which dataset to download.")],
    to: Annotated[Path, typer.Option(help="Where to write the person folders.")] = Path("data"),
    max_images: Annotated[
        int, typer.Option(min=0, help="wider: a sample of this many photos (0 = all 12,880).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="wider: the seed that picks the sample.")] = 0,
) -> None:
    """Download a public face dataset (needs the internet) as person folders; demo: what
    make demo needs on a machine without the face data (WIDER FACE photos, LFW people,
    face_recognition's test photos). FACETAG_FETCH_MIRROR=DIR reads the archives from DIR."""
    from facetag.data.fetch import fetch

    try:
        out = fetch(name.value, to, max_images=max_images, seed=seed)
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(str(out))


def format_crops(report: CropReport) -> str:
    summary = report.summary()
    joined = ", ".join(f"{k} ({' + '.join(v)})" for k, v in report.merged.items()) or "none"
    few = len(report.too_few)
    return (
        f"{summary['crops']} crops of {summary['people']} people in {summary['out']} "
        f"({summary['written']} new, {summary['kept']} kept); no face found in "
        f"{summary['no_face']} photos; merged: {joined}"
        + (f"; {few} people with too few crops left out" if few else "")
    )


@data_app.command("crops")
def data_crops(
    sources: Annotated[list[Path], typer.Argument(help="Folders of person folders.")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Where the crops go.")],
    size: Annotated[int, typer.Option(min=16, help="Side of the saved crops, px.")] = 112,
    aligned: Annotated[
        bool, typer.Option(help="Landmark-aligned chips, as for the dlib-resnet (use --size 150).")
    ] = False,
    detector: Annotated[
        str | None, typer.Option(help="Detector (default: the shipped one).")
    ] = None,
    min_photos: Annotated[
        int,
        typer.Option(min=1, help="Leave out people with fewer crops (a split needs 2 each)."),
    ] = 1,
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
                sources,
                out,
                det,
                size=size,
                aligned=aligned,
                min_photos=min_photos,
                on_message=bar.message,
                progress=bar.update,
            )
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(json.dumps(report.summary(), indent=2) if as_json else format_crops(report))


@data_app.command("landmarks")
def data_landmarks(
    root: Annotated[Path, typer.Argument(help="The face data folder (FACETAG_DATA_DIR).")],
    out: Annotated[Path, typer.Option(dir_okay=False, help="The landmarks file to write.")] = (
        Path("data/landmarks.json")
    ),
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="Folders of ROOT to label (repeatable) [the five below]."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Five teacher landmarks for every face of 40 px and more, for training the ONet.

    Labels wider_train, lfw (people A-M only: N-Z are held out), celeba, glint_celebs
    and johns with MTCNN (facenet-pytorch) and dlib's 5-point predictor; training only.
    """
    from facetag.training.teachers import label_landmarks

    try:
        with ProgressBar("warning") as bar:
            kw = {"sets": tuple(sets)} if sets else {}
            r = label_landmarks(root, out, progress=bar.update, **kw)
    except FacetagError as e:
        raise fail(e) from None
    summary = {
        "out": str(r.out),
        "photos": r.photos,
        "faces": r.faces,
        "per_set": r.per_set,
        "dropped": r.dropped,
    }
    typer.echo(
        json.dumps(summary, indent=2)
        if as_json
        else (
            f"{r.out}: {r.faces} faces in {r.photos} photos "
            f"({', '.join(f'{k} {v}' for k, v in r.per_set.items())}); {r.dropped} left out "
            "(the teachers disagreed or found no face)"
        )
    )
