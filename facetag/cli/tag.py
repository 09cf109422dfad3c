"""``facetag enroll``, ``facetag tag`` and ``facetag bench tag``."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from facetag.cli._app import app, bench_app
from facetag.cli._common import Device, DeviceOpt, JsonOpt, distance, echo, fail, model_ref
from facetag.cli.progress import ProgressBar
from facetag.errors import DataError, FacetagError
from facetag.inference.xmp import NOTE, SidecarName

EmbedderOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="Embedder: a model.pt, runs:/... or models:/... (default: the shipped one)."
    ),
]
FaceDetectorOpt = Annotated[
    str | None,
    typer.Option(
        "--detector",
        help="Detector: a checkpoint, runs:/..., models:/..., or 'none' "
        "when each photo is already a face crop (default: the shipped one).",
    ),
]
TagBatchOpt = Annotated[int, typer.Option(min=1, help="Faces per embedding batch.")]
WorkersOpt = Annotated[int, typer.Option(min=0, help="Photo-decoding processes (0: none).")]


def _load(model: str | None, detector: str | None, device: Device, threshold: float | None) -> Any:
    from facetag.inference.models import load_models

    ref = model_ref(model, calibrated=True)
    models = load_models(ref, model_ref(detector), device.value, threshold)
    typer.echo(f"device: {models.device}", err=True)
    return models


def load_for_gallery(
    gallery: Path,
    model: str | None,
    detector: str | None,
    device: Device,
    threshold: float | None = None,
    must_exist: bool = True,
) -> Any:
    """The models for a run on ``gallery``: without --model, the embedder facetag tune
    made for it (the gallery's model_file) when there is one, else the shipped one."""
    from facetag.inference.gallery import load_gallery

    if model is None and (must_exist or gallery.exists()):
        tuned = load_gallery(gallery).model_file
        if tuned:
            model = tuned
    return _load(model, detector, device, threshold)


def _say(bar: ProgressBar) -> Callable[[str], None]:
    """Lines of a tag run: problems through the bar (red, counted), notes in yellow."""

    def say(line: str) -> None:
        if line.startswith(NOTE):
            bar.console.print(line, style="yellow", markup=False)
        else:
            bar.message(line)

    return say


@app.command()
def enroll(
    people_dir: Annotated[Path, typer.Argument(help="PEOPLE_DIR/<person>/*.jpg, whole photos.")],
    gallery: Annotated[Path, typer.Option(dir_okay=False, help="Gallery file to write.")],
    model: EmbedderOpt = None,
    detector: FaceDetectorOpt = None,
    device: DeviceOpt = Device.auto,
    batch_size: TagBatchOpt = 64,
    workers: WorkersOpt = 0,
) -> None:
    """Enrol the people of PEOPLE_DIR; enrolling again re-embeds only changed photos."""
    from facetag.inference.enroll import enroll as enroll_people
    from facetag.inference.enroll import require_folder

    try:
        require_folder(people_dir)
        models = _load(model, detector, device, None)
        with ProgressBar("warning") as bar:
            r = enroll_people(
                people_dir,
                gallery,
                models,
                batch_size=batch_size,
                workers=workers,
                on_message=bar.message,
                progress=bar.update,
            )
    except FacetagError as e:
        raise fail(e) from None
    echo(
        f"{r.gallery}: {r.people} people, {r.photos} photos ({r.embedded} embedded, "
        f"{r.kept} unchanged, {r.removed} removed, {r.skipped} skipped), model "
        f"{r.model} on {r.device}" + (f"; {r.not_read}" if r.not_read else "")
    )


# Long only in its options (Typer reads them from the signature); the body parses,
# makes one library call and prints.
@app.command()
def tag(
    photos: Annotated[list[Path], typer.Argument(help="Photos or folders of photos.")],
    gallery: Annotated[Path, typer.Option(dir_okay=False, help="From facetag enroll.")],
    recursive: Annotated[bool, typer.Option(help="Look in sub-folders too.")] = False,
    as_json: JsonOpt = False,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="Print one JSON line per photo as it finishes.")
    ] = False,
    plain: Annotated[
        bool,
        typer.Option(
            "--plain", help="Print path,name per face as each photo finishes (for pipes)."
        ),
    ] = False,
    csv: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Write a CSV here; - prints it.")
    ] = None,
    xmp: Annotated[
        bool, typer.Option(help="Write face regions and people keywords to XMP sidecars.")
    ] = False,
    xmp_unknown: Annotated[
        bool, typer.Option(help="Also write unknown faces, as regions without a name (--xmp).")
    ] = False,
    sidecar_name: Annotated[
        SidecarName, typer.Option(help="Sidecar name: digiKam's and Immich's, or Lightroom's.")
    ] = SidecarName.ext,
    annotate: Annotated[
        Path | None, typer.Option(file_okay=False, help="Write annotated copies here.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(callback=distance, help="Cosine distance to name a face.")
    ] = None,
    device: DeviceOpt = Device.auto,
    batch_size: TagBatchOpt = 64,
    workers: WorkersOpt = 0,
    model: EmbedderOpt = None,
    detector: FaceDetectorOpt = None,
    manifest: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Resume file [beside --csv/--annotate].")
    ] = None,
    expected: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="CSV image,names to score against (expected.csv)."),
    ] = None,
) -> None:
    """Name the faces in PHOTOS; rerunning skips finished photos. Exit 1 if any failed."""
    from facetag.data.images import require_paths
    from facetag.inference.tag import TagOptions, tag_photos
    from facetag.inference.writers import csv_text, format_tags, to_json
    from facetag.metrics.names import format_score

    csv_out = csv is not None and str(csv) == "-"
    stdout = [
        n
        for n, on in (
            ("--json", as_json),
            ("--jsonl", jsonl),
            ("--plain", plain),
            ("--csv -", csv_out),
        )
        if on
    ]
    if len(stdout) > 1:
        raise fail(
            DataError(
                f"{' and '.join(stdout)}: expected one output on stdout, got {len(stdout)}; "
                "keep one (write the CSV to a file with --csv FILE)"
            )
        )
    options = TagOptions(
        recursive=recursive,
        batch_size=batch_size,
        workers=workers,
        csv=None if csv_out else csv,
        xmp=xmp or xmp_unknown,
        xmp_unknown=xmp_unknown,
        sidecar_name=sidecar_name,
        annotate=annotate,
        manifest=manifest,
        expected=expected,
    )
    try:
        require_paths(photos)  # before the models' seconds of loading
        models = load_for_gallery(gallery, model, detector, device, threshold)
        with ProgressBar() as bar:
            run = tag_photos(
                photos,
                gallery,
                models,
                options,
                on_message=_say(bar),
                progress=bar.update,
                on_photo=_json_line if jsonl else _plain_lines if plain else None,
            )
    except FacetagError as e:
        raise fail(e) from None
    if as_json:
        typer.echo(to_json(run.doc))
    elif csv_out:
        _stdout(csv_text(run.doc["images"]))
    elif not (jsonl or plain):
        echo(format_tags(run.doc))
    if run.score is not None and not as_json:
        echo(format_score(run.score), err=bool(stdout))
    if run.not_read:
        echo(run.not_read, err=True)
    if run.failed:
        raise typer.Exit(code=1)


def _stdout(text: str) -> None:
    """``text`` on stdout now, file names that are not UTF-8 as their own bytes (the bytes
    that open the photo, as in write_csv)."""
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stdout.buffer.flush()


def _json_line(result: dict[str, Any]) -> None:
    """tag --jsonl: one photo's result as one JSON line, flushed as it finishes."""
    from facetag.fsnames import json_text

    _stdout(json_text(result) + "\n")


def _plain_lines(result: dict[str, Any]) -> None:
    """tag --plain: face_recognition's output, ``path,name`` per face (unknown_person),
    ``path,no_persons_found`` for a photo without faces; a path holding a comma or a quote
    is quoted as in a CSV. A photo that could not be read has its error on stderr only."""
    import csv as csvlib
    import io

    if "error" in result:
        return
    buf = io.StringIO()
    w = csvlib.writer(buf, lineterminator="\n")
    names = [f["name"] or "unknown_person" for f in result["faces"]] or ["no_persons_found"]
    for name in names:
        w.writerow([result["path"], name])
    _stdout(buf.getvalue())


@app.command()
def embed(
    photos: Annotated[list[Path], typer.Argument(help="Photos or folders of photos.")],
    recursive: Annotated[bool, typer.Option(help="Look in sub-folders too.")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = Device.auto,
    batch_size: TagBatchOpt = 64,
    workers: WorkersOpt = 0,
    model: EmbedderOpt = None,
    detector: FaceDetectorOpt = None,
) -> None:
    """Each face's box, landmarks and L2-normalised embedding, with the model id."""
    from facetag.data.images import require_paths
    from facetag.inference.embed import embed_photos

    try:
        require_paths(photos)
        models = _load(model, detector, device, None)
        with ProgressBar() as bar:
            doc, failed = embed_photos(
                photos,
                models,
                recursive=recursive,
                batch_size=batch_size,
                workers=workers,
                on_message=bar.message,
                progress=bar.update,
            )
    except FacetagError as e:
        raise fail(e) from None
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        for im in doc["images"]:
            echo(
                f"{im['path']}: {len(im['faces'])} faces, {doc['embedding_dim']}-d "
                f"embeddings of {doc['model']['embedder']} (--json prints them)"
            )
    if failed:
        raise typer.Exit(code=1)


def format_bench_tag(r: dict[str, Any]) -> str:
    return (
        f"tag on {r['device']} ({r['torch_threads']} threads, {r['workers']} workers): "
        f"{r['photos_per_s']:.2f} photos/s over {r['photos']} photos "
        f"({r['distinct_photos']} distinct), {r['faces_per_photo']} faces/photo\n"
        f"peak memory {r['peak_rss_mb']:.0f} MiB (after the first pass "
        f"{r['peak_rss_mb_first_pass']:.0f} MiB)"
    )


@bench_app.command("tag")
def bench_tag_cmd(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Photos.")],
    gallery: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Default: 8 random people.")
    ] = None,
    device: DeviceOpt = Device.auto,
    batch_size: TagBatchOpt = 64,
    workers: WorkersOpt = 0,
    repeats: Annotated[int, typer.Option(min=1, help="Passes over the folder.")] = 2,
    model: EmbedderOpt = None,
    detector: FaceDetectorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Photos/s of facetag tag end to end over FOLDER (decode, detect, embed, match)."""
    from facetag.bench.photos import bench_tag

    try:
        models = _load(model, detector, device, 0.5)
        with tempfile.TemporaryDirectory(prefix="facetag-bench-") as scratch:
            r = bench_tag(
                folder,
                models,
                gallery_path=gallery,
                batch_size=batch_size,
                workers=workers,
                repeats=repeats,
                scratch=Path(scratch),
            )
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(json.dumps(r, indent=2) if as_json else format_bench_tag(r))
