"""``facetag learn``, ``facetag cluster``, ``facetag name`` and ``facetag tune``: the tagger
learns from its user."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from facetag.cli._app import app
from facetag.cli._common import Device, DeviceOpt, JsonOpt, distance, fail
from facetag.cli.progress import ProgressBar
from facetag.cli.tag import EmbedderOpt, FaceDetectorOpt, WorkersOpt, load_for_gallery
from facetag.errors import FacetagError


class Trainable(str, Enum):
    head = "head"  # the embedding layer; the rest of the network stays as it was
    all = "all"


GalleryOpt = Annotated[Path, typer.Option(dir_okay=False, help="The gallery file (enroll).")]


@app.command()
def learn(
    photos: Annotated[list[Path], typer.Argument(help="Photos or folders of photos.")],
    gallery: GalleryOpt,
    from_xmp: Annotated[bool, typer.Option(help="Read names from the photos' sidecars.")] = False,
    from_csv: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="facetag's CSV, edited.")
    ] = None,
    recursive: Annotated[bool, typer.Option(help="Look in sub-folders too.")] = False,
    manifest: Annotated[
        Path | None, typer.Option(dir_okay=False, help="The tag run's resume file [as tag's].")
    ] = None,
    device: DeviceOpt = Device.auto,
    model: EmbedderOpt = None,
    detector: FaceDetectorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add the names users fixed (sidecars, CSV) to the gallery: confirmed faces join their
    person, deleted or renamed ones are remembered as "not this person"."""
    from facetag.inference.learn import learn as run_learn

    try:
        models = load_for_gallery(gallery, model, detector, device)
        with ProgressBar("warning") as bar:
            r = run_learn(
                photos,
                gallery,
                models,
                from_xmp=from_xmp,
                from_csv=from_csv,
                manifest=manifest,
                recursive=recursive,
                on_message=bar.message,
                progress=bar.update,
            )
    except FacetagError as e:
        raise fail(e) from None
    out = {
        "gallery": str(r.gallery),
        "photos": r.photos,
        "confirmed": r.confirmed,
        "moved": r.moved,
        "rejected": r.rejected,
        "new_people": r.new_people,
        "problems": r.problems,
    }
    typer.echo(
        json.dumps(out, indent=2)
        if as_json
        else (
            f"{r.gallery}: {r.confirmed} faces confirmed ({r.moved} moved to another person, "
            f"new people: {', '.join(r.new_people) or 'none'}), {r.rejected} remembered as not "
            f"the person tagged, from {r.photos} photos; {r.problems} problems"
        )
    )


def format_clusters(doc: dict[str, Any], run: Any) -> str:
    lines = []
    for im in doc["images"]:
        named = [f["name"] or f["cluster"] or "?" for f in im["faces"]]
        lines.append(f"{im['path']}: {', '.join(named) or 'no faces'}")
    lines.append(
        f"{run.unknown_faces} unknown faces in {run.clusters} clusters "
        f"({run.new_clusters} new); name one with facetag name CLUSTER_ID NAME"
    )
    return "\n".join(lines)


@app.command()
def cluster(
    photos: Annotated[list[Path], typer.Argument(help="Photos or folders of photos.")],
    gallery: GalleryOpt,
    recursive: Annotated[bool, typer.Option(help="Look in sub-folders too.")] = False,
    max_distance: Annotated[
        float | None,
        typer.Option(
            "--distance",
            callback=distance,
            help="Cosine distance within which faces group [0.7 x the model's threshold].",
        ),
    ] = None,
    annotate: Annotated[
        Path | None, typer.Option(file_okay=False, help="A contact sheet per cluster here.")
    ] = None,
    csv: Annotated[Path | None, typer.Option(dir_okay=False, help="Write a CSV here.")] = None,
    device: DeviceOpt = Device.auto,
    workers: WorkersOpt = 0,
    model: EmbedderOpt = None,
    detector: FaceDetectorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Group the faces no enrolled person matched, with ids that stay when the library grows."""
    from facetag.inference.cluster import cluster_photos
    from facetag.inference.writers import to_json, write_csv

    try:
        models = load_for_gallery(gallery, model, detector, device, must_exist=False)
        with ProgressBar() as bar:
            run = cluster_photos(
                photos,
                gallery,
                models,
                distance=max_distance,
                recursive=recursive,
                annotate=annotate,
                workers=workers,
                on_message=bar.message,
                progress=bar.update,
            )
        if csv is not None:
            write_csv(csv, run.doc["images"])
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(to_json(run.doc) if as_json else format_clusters(run.doc, run))
    if run.failed:
        raise typer.Exit(code=1)


@app.command()
def name(
    cluster_id: Annotated[str, typer.Argument(help="A cluster id from facetag cluster (c3).")],
    person: Annotated[str, typer.Argument(help="The person's name.")],
    gallery: GalleryOpt,
    as_json: JsonOpt = False,
) -> None:
    """Enrol the faces of a cluster as PERSON (new or already enrolled)."""
    from facetag.inference.cluster import name_cluster

    try:
        r = name_cluster(gallery, cluster_id, person)
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(
        json.dumps(r, indent=2)
        if as_json
        else (
            f"{r['gallery']}: {r['faces']} faces of {r['cluster']} are now {r['person']} "
            f"({r['photos']} photos)"
        )
    )


@app.command()
def tune(
    gallery: GalleryOpt,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the confirmed faces.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (a trained net: small).")] = 3e-5,
    trainable: Annotated[
        Trainable, typer.Option(help="head: the embedding layer only; all: the whole network.")
    ] = Trainable.head,
    distill_weight: Annotated[
        float, typer.Option(min=0.0, help="Pull towards the starting network (0: off).")
    ] = 10.0,
    device: DeviceOpt = Device.auto,
    model: EmbedderOpt = None,
    detector: FaceDetectorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the embedder on the gallery's confirmed faces (MLflow), re-embed the
    gallery with it; tag, learn and cluster then use the tuned model."""
    from facetag.tune import TuneSettings, check_line
    from facetag.tune import tune as run_tune

    try:
        models = load_for_gallery(gallery, model, detector, device)
        settings = TuneSettings(
            epochs=epochs, lr=lr, distill_weight=distill_weight, trainable=trainable.value
        )
        with ProgressBar("warning") as bar:
            r = run_tune(gallery, models, settings, on_message=bar.message, progress=bar.update)
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(
        json.dumps(r, indent=2)
        if as_json
        else (
            f"{r['gallery']}: tuned {r['started_from']} on {r['faces']} faces of {r['people']} "
            f"people -> {r['model']} ({r['model_file']}, MLflow run {r['run_id']})\n"
            + (
                f"adopted: {check_line(r['check'])}"
                if r["adopted"]
                else f"kept {r['started_from']}: {check_line(r['check'])} (the tuned model "
                "is not better, so tag, learn and cluster go on with the old one)"
            )
        )
    )
