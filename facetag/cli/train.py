"""``facetag train``, ``sweep``, ``evaluate``, ``export`` and ``ui``: the embedder's
training, tracked in MLflow."""

from __future__ import annotations

import contextlib
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from facetag.cli._app import app
from facetag.cli._common import Device, DeviceOpt, JsonOpt, fail, flag_overrides, model_ref
from facetag.cli.progress import ProgressBar
from facetag.errors import FacetagError

ConfigOpt = Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="A TOML config.")]
EpochsOpt = Annotated[int | None, typer.Option(min=1, help="Passes over the data.")]


@app.command()
def train(
    config: ConfigOpt = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (person folders).")] = None,
    epochs: EpochsOpt = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per step.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, init and order.")] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Train/test split: 5/5 (images per person) or a fraction, e.g. 0.8."),
    ] = None,
    device: Annotated[Device | None, typer.Option(help="auto: CUDA when available.")] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue the run with this MLflow run id.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Also copy the model file here.")
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Start from this model file (fine-tune)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the face-embedding network; metrics and model go to MLflow."""
    from facetag.training.runner import run_training

    overrides = flag_overrides(
        data=data,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        init=init.resolve() if init else None,
    )
    if split is not None:
        overrides["data.split"] = split
    try:
        with ProgressBar() as bar:
            result = run_training(
                config, overrides, resume=resume, progress=bar.update, out_path=out
            )
    except FacetagError as e:
        raise fail(e) from None
    if result.get("rank", 0) != 0:
        return  # under torchrun, rank 0 reports for all
    typer.echo(json.dumps(result, indent=2) if as_json else format_train(result))


def format_train(r: dict[str, Any]) -> str:
    return (
        f"test accuracy {float(r['test_accuracy']):.4f} after {r['epochs']} epochs "
        f"in {float(r['seconds']):.1f} s on {r['device']}\n"
        f"run id {r['run_id']}  model {r['model_path']}"
    )


def _numbers(value: str, kind: type[float] | type[int], what: str) -> list[Any]:
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated {what}, got {value!r}") from None


def format_sweep(result: dict[str, Any]) -> str:
    lines = [
        f"lr {r['lr']:<8g} batch {r['batch_size']:<4} "
        f"test accuracy {r['test_accuracy']:.4f}  run {r['run_id']}"
        for r in result["runs"]
    ]
    best = result["best"]
    lines.append(
        f"parent run {result['parent_run_id']}; best: lr {best['lr']:g}, batch {best['batch_size']}"
    )
    return "\n".join(lines)


@app.command()
def sweep(
    config: ConfigOpt = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (person folders).")] = None,
    lrs: Annotated[str, typer.Option("--lrs", help="Learning rates, e.g. 1e-3,3e-3.")] = "",
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Batch sizes, e.g. 16,32.")
    ] = "",
    epochs: EpochsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a learning-rate x batch-size grid as child runs of one MLflow parent run."""
    from facetag.training.runner import run_sweep

    lr_list = _numbers(lrs, float, "numbers")
    bs_list = _numbers(batch_sizes, int, "integers")
    if not lr_list or not bs_list:
        raise typer.BadParameter("give both --lrs and --batch-sizes, e.g. --lrs 1e-3,3e-3")
    overrides = {"data": str(data) if data else None, "epochs": epochs}
    try:
        with ProgressBar() as bar:
            result = run_sweep(config, overrides, lr_list, bs_list, progress=bar.update)
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(json.dumps(result, indent=2) if as_json else format_sweep(result))


@app.command()
def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
) -> None:
    """Start the MLflow dashboard on facetag's tracking store and print its URL."""
    import subprocess

    from facetag.training.tracking import ui_command

    try:
        argv, url = ui_command(port, host)
    except FacetagError as e:
        raise fail(e) from None
    if not argv:
        typer.echo(f"MLflow dashboard: {url}  (the tracking server's; MLFLOW_TRACKING_URI)")
        return
    typer.echo(f"MLflow dashboard: {url}  (Ctrl-C stops it)")
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(argv, check=False)


@app.command()
def export(
    model: Annotated[
        str, typer.Argument(help="Model file, runs:/<run>/<path> or models:/<name>@<alias>.")
    ],
    out: Annotated[Path, typer.Option(dir_okay=False, help="Where to write the model.")],
    half: Annotated[bool, typer.Option(help="Store weights as float16 (half the size).")] = True,
) -> None:
    """Write an embedder without its training-only parts, to ship or copy (make weights)."""
    from facetag.models.io import export_embedder
    from facetag.training.tracking import resolve_model_uri

    try:
        state = export_embedder(resolve_model_uri(model), out, half=half)
    except FacetagError as e:
        raise fail(e) from None
    t = state.get("threshold")
    typer.echo(
        f"{out}: {state['model_id']} ({out.stat().st_size / 1e6:.1f} MB, "
        f"{state['weights_dtype']}), threshold "
        f"{'none: run facetag evaluate first' if t is None else f'{t:.4f}'}"
    )


class PairsPeer(str, Enum):
    dlib = "dlib"


class Far(str, Enum):
    strict = "1e-3"  # one wrong name in a thousand different-person pairs
    loose = "1e-2"


# Long only in its options (Typer reads them from the signature); the body parses,
# makes one library call and prints.
@app.command()
def evaluate(
    model: Annotated[
        str | None,
        typer.Option(
            help="Model file, runs:/<run>/<path> or models:/<name>@<alias> [with --pairs: "
            "the shipped one]."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False, help="Person folders; default: the model's."),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="e.g. 5/5 or 0.8; default: the model's.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed; default: the model's.")] = None,
    device: DeviceOpt = Device.auto,
    log: Annotated[bool, typer.Option(help="Log metrics and ROC to the model's run.")] = True,
    store_threshold: Annotated[
        bool, typer.Option(help="Store the calibrated threshold with the model.")
    ] = True,
    far: Annotated[
        Far, typer.Option(help="False accept rate the stored threshold is chosen at.")
    ] = Far.strict,
    pairs: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Verify through the whole pipeline on the people of this folder instead "
            "(e.g. ../shared/data/lfw): detector, alignment, embedder.",
        ),
    ] = None,
    people: Annotated[str, typer.Option(help="With --pairs: first letters used.")] = "N-Z",
    pairs_store: Annotated[
        bool,
        typer.Option(
            "--calibrate",
            help="With --pairs: store the threshold at --far in the model file (calibrate on "
            "people no training saw, never on the ones you report).",
        ),
    ] = False,
    detector: Annotated[
        str | None, typer.Option(help="With --pairs: the detector [the shipped one].")
    ] = None,
    against: Annotated[
        PairsPeer | None,
        typer.Option(
            help="With --pairs: also score face_recognition's dlib pipeline (HOG, 5 points, "
            "its ResNet) on the same photos and pairs."
        ),
    ] = None,
    clusters: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Score facetag cluster on the people of this folder (BCubed).",
        ),
    ] = None,
    learning_curve: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="LFW folder: name F1 before and after facetag tune (N-R, S-Z).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Closed-set accuracy and open-set verification (ROC, EER, TAR@FAR, threshold);
    with --pairs, LFW-style 10-fold verification of photos through the whole pipeline."""
    if clusters is not None or learning_curve is not None:
        _evaluate_learning(clusters, learning_curve, model, detector, device, people, as_json)
        return
    if pairs is not None:
        store = far.value if store_threshold and pairs_store else None
        peer = against is not None
        _evaluate_pairs(pairs, model, detector, device, people, seed or 0, store, as_json, peer)
        return
    if model is None:
        raise typer.BadParameter("give --model (or --pairs FOLDER to verify the whole pipeline)")
    from facetag.device import resolve_device
    from facetag.training.evaluate import evaluate as run_evaluate
    from facetag.training.evaluate import format_result

    try:
        with ProgressBar() as bar:
            result = run_evaluate(
                model,
                data,
                split=split,
                seed=seed,
                device=resolve_device(device.value),
                log=log,
                store_threshold=store_threshold,
                far=far.value,
                progress=bar.update,
            )
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(json.dumps(result, indent=2) if as_json else format_result(result))


def _evaluate_pairs(
    root: Path,
    model: str | None,
    detector: str | None,
    device: Device,
    people: str,
    seed: int,
    store_far: str | None,
    as_json: bool,
    against_dlib: bool = False,
) -> None:
    from facetag.inference.models import load_models
    from facetag.inference.verify import evaluate_pairs, format_pairs, store_pair_threshold

    try:
        models = load_models(model_ref(model), model_ref(detector), device.value)
        with ProgressBar("warning") as bar:
            peer = None
            if against_dlib:
                from facetag.bench.embed import dlib_largest_descriptors
                from facetag.progress import Progress

                def peer(paths: list[Path]) -> Any:
                    def step(k: int, n: int) -> None:
                        bar.update(Progress("dlib photos", k, n))

                    return dlib_largest_descriptors(paths, step)

            r = evaluate_pairs(
                root,
                models,
                people=people,
                seed=seed,
                progress=bar.update,
                on_message=bar.message,
                peer=peer,
            )
        if against_dlib:
            r["peer_name"] = "dlib (face_recognition's pipeline)"
        if store_far is not None:
            r["stored"] = store_pair_threshold(models.embedder.path, r, store_far)
    except FacetagError as e:
        raise fail(e) from None
    text = format_pairs(r)
    if "stored" in r:
        text += f"\n  stored threshold {r['stored']['threshold']:.4f} in {r['stored']['path']}"
    typer.echo(json.dumps(r, indent=2) if as_json else text)


def _evaluate_learning(
    clusters: Path | None,
    curve: Path | None,
    model: str | None,
    detector: str | None,
    device: Device,
    people: str,
    as_json: bool,
) -> None:
    from facetag.inference.models import load_models

    try:
        models = load_models(model_ref(model, calibrated=True), model_ref(detector), device.value)
        with ProgressBar("warning") as bar:
            if clusters is not None:
                from facetag.inference.verify import evaluate_clusters

                r = evaluate_clusters(
                    clusters, models, people=people, progress=bar.update, on_message=bar.message
                )
            else:
                from facetag.tune import learning_curve, log_curve

                assert curve is not None
                r = learning_curve(curve, models, progress=bar.update, on_message=bar.message)
                r["mlflow_run"] = log_curve(r)
    except FacetagError as e:
        raise fail(e) from None
    if as_json:
        typer.echo(json.dumps(r, indent=2))
    elif clusters is not None:
        typer.echo(
            f"{r['root']} people {r['people_range']}: {r['photos']} photos in {r['clusters']} "
            f"clusters at distance {r['distance']:.4f}: BCubed precision "
            f"{r['bcubed_precision']:.4f} recall {r['bcubed_recall']:.4f} F "
            f"{r['bcubed_f']:.4f}; {r['mixed_clusters']} clusters mix people; "
            f"{r['ids_kept']} of {r['ids_before']} earlier ids kept"
        )
    else:
        rows = [
            f"{c['shots']} photos: F1 {c['f1_before']:.4f} -> {c['f1_after']:.4f}, "
            f"S-Z pairs {100 * c['strangers_pairs_accuracy_after']:.2f}%"
            for c in r["curve"]
        ]
        typer.echo(
            "\n".join(
                [
                    f"S-Z pairs before {100 * r['strangers_pairs_accuracy_before']:.2f}%",
                    *rows,
                    f"MLflow run {r['mlflow_run']}",
                ]
            )
        )
