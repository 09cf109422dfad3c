"""``facetag train-detector``, ``detect``, ``evaluate-detector`` and ``bench detect``."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from facetag.cli._app import app, bench_app
from facetag.cli._common import (
    Device,
    DeviceOpt,
    JsonOpt,
    echo,
    fail,
    flag_overrides,
    model_ref,
    positive,
    probability,
    report_error,
)
from facetag.cli.progress import ProgressBar
from facetag.errors import FacetagError

ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Detector: a checkpoint path, runs:/... or models:/facetag-detector@"
        "champion (default: the shipped weights)."
    ),
]


class Peer(str, Enum):
    mtcnn = "mtcnn"  # facenet-pytorch's MTCNN (pip install --no-deps facenet-pytorch)


MinFaceOpt = Annotated[
    float | None, typer.Option(callback=positive, help="Smallest face to find, px high [20].")
]


def format_trained(d: dict[str, Any]) -> str:
    return (
        f"val AP50 {d['val_ap50']:.4f} (faces >= 32 px {d['val_ap50_32']:.4f}), recall at "
        f"1 FP/image {d['val_recall_at_1fp']:.4f} on {d['val_images']} photos, "
        f"{d['seconds']:.0f} s on {d['device']}\nrun id {d['run_id']}  model {d['model_path']}"
    )


@app.command("train-detector")
def train_detector_cmd(
    config: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A TOML config.")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Data root (wider_train/, nonface/).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs per stage.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=2, help="Patches per step.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, sampling and init.")] = None,
    device: Annotated[Device | None, typer.Option(help="auto: CUDA when available.")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue this MLflow run id.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the model file here.")] = None,
    landmarks: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Teacher landmarks (facetag data landmarks)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the face detector cascade; metrics and model go to MLflow."""
    from facetag.training.detector_train import train_detector

    overrides = flag_overrides(
        data=data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device
    )
    if landmarks is not None:
        overrides["data.landmarks"] = str(landmarks)
    try:
        with ProgressBar() as bar:
            r = train_detector(config, overrides, resume=resume, progress=bar.update, out=out)
    except FacetagError as e:
        raise fail(e) from None
    d = r.as_dict()
    typer.echo(json.dumps(d, indent=2) if as_json else format_trained(d))


def format_detections(doc: dict[str, Any]) -> str:
    lines = []
    for image in doc["images"]:
        n, W, H = len(image["faces"]), image["width"], image["height"]
        lines.append(f"{image['path']}: {n} faces ({W}x{H})")
        for f in image["faces"]:
            lines.append("  " + " ".join(f"{v:.0f}" for v in f["box"]) + f"  {f['score']:.3f}")
    return "\n".join(lines)


@app.command()
def detect(
    paths: Annotated[list[Path], typer.Argument(help="Photos or folders of photos.")],
    recursive: Annotated[bool, typer.Option(help="Look in sub-folders too.")] = False,
    as_json: JsonOpt = False,
    min_face: MinFaceOpt = None,
    threshold: Annotated[
        float | None, typer.Option(callback=probability, help="Face score to report [0.8].")
    ] = None,
    device: DeviceOpt = Device.auto,
    model: ModelOpt = None,
) -> None:
    """Find the faces in PATHS; a photo that fails is reported and the others go on."""
    from facetag.inference.detect import detect_paths

    try:
        doc, failed = detect_paths(
            paths,
            recursive=recursive,
            min_face=min_face,
            threshold=threshold,
            device=device.value,
            model=model_ref(model),
            on_error=report_error,
        )
    except FacetagError as e:
        raise fail(e) from None
    text = json.dumps(doc, indent=2) if as_json else format_detections(doc)
    if text:
        echo(text)
    if failed:
        raise typer.Exit(code=1)


@app.command("evaluate-detector")
def evaluate_detector_cmd(
    boxes: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="WIDER .txt or CSV.")],
    images: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Photos root.")],
    model: ModelOpt = None,
    min_face: MinFaceOpt = None,
    device: DeviceOpt = Device.auto,
    landmarks: Annotated[
        list[Path] | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="dlib XML with 68-point faces (repeatable): also score the five landmarks.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score the detector: AP at IoU 0.5 (all faces, faces >= 32 px), recall at 1 FP/image,
    and with --landmarks the five-landmark error over the outer-eye distance."""
    from facetag.training.evaluate_detector import evaluate_boxes

    try:
        ref = model_ref(model)
        r = evaluate_boxes(
            boxes,
            images,
            device=device.value,
            model=ref,
            min_face=min_face,
            on_error=report_error,
            landmark_files=landmarks or (),
        )
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(
        json.dumps(r, indent=2)
        if as_json
        else (
            f"AP50 {r['ap50']:.4f}  AP50 (faces >= 32 px) {r['ap50_32']:.4f}  recall at 1 FP/image "
            f"{r['recall_at_1fp']:.4f}\nat the default face score {r['threshold']:g}: "
            f"{r['false_positives_at_threshold']} false positives, recall "
            f"{r['recall_at_threshold']:.4f}\n{r['faces']} faces in {r['images']} photos, "
            f"model {r['model']['detector']} on {r['device']}"
            + (
                f"\nlandmark error {r['landmark_error']:.4f} of the outer-eye distance over "
                f"{r['landmark_faces']} faces ({r['landmark_missed']} not found)"
                if "landmark_error" in r
                else ""
            )
        )
    )
    if r["failed_images"]:
        raise typer.Exit(code=1)


@bench_app.command("detect")
def bench_detect_cmd(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Photos.")],
    device: DeviceOpt = Device.auto,
    model: ModelOpt = None,
    repeats: Annotated[int, typer.Option(min=1, help="Passes over the folder.")] = 3,
    min_face: MinFaceOpt = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads (default: torch's, one per core).")
    ] = None,
    against: Annotated[
        Peer | None, typer.Option(help="Also time this peer on the same photos, same run.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Photos/s and peak memory of the detector over FOLDER (decoding included)."""
    from facetag.bench.photos import bench_detect

    try:
        r = bench_detect(
            folder,
            device=device.value,
            model=model_ref(model),
            repeats=repeats,
            min_face=min_face,
            threads=threads,
            against=against.value if against else None,
        )
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(
        json.dumps(r, indent=2)
        if as_json
        else (
            f"detect on {r['device']} ({r['torch_threads']} threads): {r['photos_per_s']:.2f} "
            f"photos/s over {r['photos']} photos ({r['distinct_photos']} distinct), "
            f"{r['faces_per_photo']} faces/photo\npeak memory {r['peak_rss_mb']:.0f} MiB "
            f"(after the first pass {r['peak_rss_mb_first_pass']:.0f} MiB)"
            + (
                f"\nMTCNN (facenet-pytorch) {r['mtcnn']['photos_per_s']:.2f} photos/s, "
                f"{r['mtcnn']['faces_per_photo']} faces/photo; ours/MTCNN "
                f"{r['mtcnn']['ratio']:.2f}x"
                if "mtcnn" in r
                else ""
            )
        )
    )
