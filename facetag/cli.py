"""The facetag command line (Typer). Parse, validate, call one library function, report."""

from __future__ import annotations

import contextlib
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from facetag import __version__
from facetag.errors import FacetagError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals hold tensors
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Find the faces in your photos and name the people you know.",
)
bench_app = typer.Typer(
    no_args_is_help=True, help="Time facetag's layers against their torch.nn twins."
)
app.add_typer(bench_app, name="bench")


class Device(str, Enum):
    auto = "auto"  # cuda when available; the device actually used is always reported
    cpu = "cpu"
    cuda = "cuda"


def _fail(e: FacetagError) -> typer.Exit:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


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


@app.command()
def gradcheck(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    op: Annotated[list[str] | None, typer.Option(help="Check only these ops (repeatable).")] = None,
) -> None:
    """Check every op's backward against finite differences and against torch.nn.

    Exit code 1 if any op fails.
    """
    from facetag.gradcheck import all_cases, run_cases
    from facetag.gradcheck.report import format_table, summarise

    cases = [c for c in all_cases() if not op or c.op in op]
    if not cases:
        _fail_msg = f"gradcheck: no op named {', '.join(op or [])}; see `facetag gradcheck`"
        raise _fail(FacetagError(_fail_msg))
    results = run_cases(cases)
    rows = summarise(results)
    if as_json:
        typer.echo(json.dumps({"ops": rows, "passed": all(r["passed"] for r in rows)}, indent=2))
    else:
        typer.echo(format_table(rows))
    if not all(r["passed"] for r in rows):
        raise typer.Exit(code=1)


def _bench(
    mode: str,
    device: Device,
    as_json: bool,
    profile: bool,
    steps: int,
    batch_size: int,
    channels_last: bool,
    memory: bool,
) -> None:
    from facetag.bench import BenchSpec, profile_pair, run_bench
    from facetag.device import resolve_device

    try:
        dev = resolve_device(device.value)
    except FacetagError as e:
        raise _fail(e) from None
    spec = BenchSpec(
        mode=mode, device=dev, steps=steps, batch_size=batch_size, channels_last=channels_last
    )
    if profile:
        for name, table in profile_pair(spec).items():
            typer.echo(f"== {name} ({mode}, {dev}) ==\n{table}", err=as_json)
    result = run_bench(spec, memory=memory)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"{mode} on {result['device_name']}, batch {spec.batch_size}, "
        f"{spec.image_size}x{spec.image_size}, median of {spec.steps} interleaved steps\n"
        f"  facetag.layers: {result['ours_ms']:8.1f} ms/step  "
        f"{result['ours_images_per_s']:7.1f} images/s"
        + (f"  peak {result['ours_peak_mb']:7.1f} MiB" if memory else "")
        + f"\n  torch.nn:       {result['torch_ms']:8.1f} ms/step  "
        f"{result['torch_images_per_s']:7.1f} images/s"
        + (f"  peak {result['torch_peak_mb']:7.1f} MiB" if memory else "")
        + f"\n  ratio ours/torch: time {result['ratio']:.3f}"
        + (f", memory {result['memory_ratio']:.3f}" if memory else "")
    )


DeviceOpt = Annotated[Device, typer.Option(help="Where to run (auto: CUDA when available).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
ProfileOpt = Annotated[bool, typer.Option(help="Print the per-op time breakdown first.")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Timed steps per network.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Batch size.")]
ChannelsLastOpt = Annotated[bool, typer.Option(help="Run both networks in channels_last.")]
MemoryOpt = Annotated[bool, typer.Option(help="Measure peak memory (in subprocesses).")]


@bench_app.command("train")
def bench_train(
    device: DeviceOpt = Device.auto,
    as_json: JsonOpt = False,
    profile: ProfileOpt = False,
    steps: StepsOpt = 10,
    batch_size: BatchOpt = 64,
    channels_last: ChannelsLastOpt = False,
    memory: MemoryOpt = True,
) -> None:
    """Training steps (forward, loss, backward, SGD step): ours vs torch.nn."""
    _bench("train", device, as_json, profile, steps, batch_size, channels_last, memory)


@bench_app.command("infer")
def bench_infer(
    device: DeviceOpt = Device.auto,
    as_json: JsonOpt = False,
    profile: ProfileOpt = False,
    steps: StepsOpt = 20,
    batch_size: BatchOpt = 64,
    channels_last: ChannelsLastOpt = False,
    memory: MemoryOpt = True,
) -> None:
    """Inference batches (eval mode, BatchNorm folded into our convs): ours vs torch.nn."""
    _bench("infer", device, as_json, profile, steps, batch_size, channels_last, memory)


data_app = typer.Typer(no_args_is_help=True, help="Inspect and fetch face datasets.")
app.add_typer(data_app, name="data")


@data_app.command("info")
def data_info(
    path: Annotated[Path, typer.Argument(help="A folder of person folders: PATH/<person>/*.jpg")],
) -> None:
    """People, images, image sizes and problems found in a person-folder dataset."""
    from facetag.data.folders import format_info, info

    try:
        report = info(path)
    except FacetagError as e:
        raise _fail(e) from None
    typer.echo(format_info(report))


class Far(str, Enum):
    strict = "1e-3"  # one wrong name in a thousand different-person pairs
    loose = "1e-2"


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
        raise _fail(e) from None
    typer.echo(str(out))


@data_app.command("crops")
def data_crops(
    sources: Annotated[list[Path], typer.Argument(help="Folders of person folders.")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Where the crops go.")],
    size: Annotated[int, typer.Option(min=16, help="Side of the saved crops, px.")] = 112,
    detector: Annotated[
        str | None, typer.Option(help="Detector (default: the shipped one).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Cut the face of every photo the way tagging does, into OUT/<person>/ for training.

    People with the same folder name in two sources are merged into one person.
    """
    from facetag.inference.crops import cut_crops
    from facetag.inference.detect import load_detector

    try:
        det = load_detector(detector, "cpu")
        with _PhotoBar("warning") as bar:
            report = cut_crops(
                sources, out, det, size=size, on_message=bar.message, progress=bar.update
            )
    except FacetagError as e:
        raise _fail(e) from None
    summary = report.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    merged = ", ".join(f"{k} ({' + '.join(v)})" for k, v in report.merged.items()) or "none"
    typer.echo(
        f"{summary['crops']} crops of {report.people} people in {out} "
        f"({report.written} new, {report.kept} kept); no face found in "
        f"{len(report.missed)} photos; merged: {merged}"
    )


def _flag_overrides(**flags: object) -> dict[str, object]:
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


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A TOML config.")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (person folders).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Passes over the data.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per step.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, init and order.")] = None,
    device: Annotated[Device | None, typer.Option(help="auto: CUDA when available.")] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue the run with this MLflow run id.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Also copy the model file here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the face-embedding network; metrics and model go to MLflow."""
    from facetag.training.progress import ProgressBar
    from facetag.training.runner import run_training

    overrides = _flag_overrides(
        data=data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device
    )
    try:
        with ProgressBar() as bar:
            result = run_training(
                config, overrides, resume=resume, progress=bar.update, out_path=out
            )
    except FacetagError as e:
        raise _fail(e) from None
    if result.get("rank", 0) != 0:
        return  # under torchrun, rank 0 reports for all
    typer.echo(json.dumps(result, indent=2) if as_json else _train_summary(result))


def _train_summary(r: dict[str, object]) -> str:
    return (
        f"test accuracy {float(r['test_accuracy']):.4f} after {r['epochs']} epochs "  # type: ignore[arg-type]
        f"in {float(r['seconds']):.1f} s on {r['device']}\n"  # type: ignore[arg-type]
        f"run id {r['run_id']}  model {r['model_path']}"
    )


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@app.command()
def sweep(
    config: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A TOML config.")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (person folders).")] = None,
    lrs: Annotated[str, typer.Option("--lrs", help="Learning rates, e.g. 1e-3,3e-3.")] = "",
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Batch sizes, e.g. 16,32.")
    ] = "",
    epochs: Annotated[int | None, typer.Option(min=1, help="Passes over the data.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a learning-rate x batch-size grid as child runs of one MLflow parent run."""
    from facetag.training.progress import ProgressBar
    from facetag.training.runner import run_sweep

    lr_list, bs_list = _floats(lrs), _ints(batch_sizes)
    if not lr_list or not bs_list:
        raise typer.BadParameter("give both --lrs and --batch-sizes, e.g. --lrs 1e-3,3e-3")
    overrides = {"data": str(data) if data else None, "epochs": epochs}
    try:
        with ProgressBar() as bar:
            result = run_sweep(config, overrides, lr_list, bs_list, progress=bar.update)
    except FacetagError as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for r in result["runs"]:
        typer.echo(
            f"lr {r['lr']:<8g} batch {r['batch_size']:<4} "
            f"test accuracy {r['test_accuracy']:.4f}  run {r['run_id']}"
        )
    typer.echo(
        f"parent run {result['parent_run_id']}; best: lr {result['best']['lr']:g}, "
        f"batch {result['best']['batch_size']}"
    )


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
        raise _fail(e) from None
    typer.echo(f"MLflow dashboard: {url}  (Ctrl-C stops it)")
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(argv, check=False)


# --- detector commands ---


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"expected a value > 0, got {value}")
    return value


def _probability(value: float | None) -> float | None:
    if value is not None and not 0 <= value <= 1:
        raise typer.BadParameter(f"expected a probability in [0, 1], got {value}")
    return value


ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Detector: a checkpoint path, runs:/... or models:/facetag-detector@"
        "champion (default: the shipped weights)."
    ),
]
MinFaceOpt = Annotated[
    float | None, typer.Option(callback=_positive, help="Smallest face to find, px high [20].")
]


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
        raise _fail(e) from None
    t = state.get("threshold")
    typer.echo(
        f"{out}: {state['model_id']} ({out.stat().st_size / 1e6:.1f} MB, "
        f"{state['weights_dtype']}), threshold "
        f"{'none: run facetag evaluate first' if t is None else f'{t:.4f}'}"
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
    as_json: JsonOpt = False,
) -> None:
    """Train the face detector cascade; metrics and model go to MLflow."""
    from facetag.training.detector_train import DetectorProgressBar, train_detector

    overrides = _flag_overrides(
        data=data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device
    )
    try:
        with DetectorProgressBar() as bar:
            r = train_detector(config, overrides, resume=resume, progress=bar.update, out=out)
    except FacetagError as e:
        raise _fail(e) from None
    d = r.as_dict()
    typer.echo(
        json.dumps(d, indent=2)
        if as_json
        else (
            f"val AP50 {d['val_ap50']:.4f} (faces >= 32 px {d['val_ap50_32']:.4f}), recall at "
            f"1 FP/image {d['val_recall_at_1fp']:.4f} on {d['val_images']} photos, "
            f"{d['seconds']:.0f} s on {d['device']}\nrun id {d['run_id']}  model {d['model_path']}"
        )
    )


@app.command()
def detect(
    paths: Annotated[list[Path], typer.Argument(help="Photos or folders of photos.")],
    recursive: Annotated[bool, typer.Option(help="Look in sub-folders too.")] = False,
    as_json: JsonOpt = False,
    min_face: MinFaceOpt = None,
    threshold: Annotated[
        float | None, typer.Option(callback=_probability, help="Face score to report [0.8].")
    ] = None,
    device: DeviceOpt = Device.auto,
    model: ModelOpt = None,
) -> None:
    """Find the faces in PATHS; a photo that fails is reported and the others go on."""
    from facetag.inference.detect import detect_paths

    def report(message: str) -> None:
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)

    try:
        doc, failed = detect_paths(
            paths,
            recursive=recursive,
            min_face=min_face,
            threshold=threshold,
            device=device.value,
            model=model,
            on_error=report,
        )
    except FacetagError as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        for image in doc["images"]:
            typer.echo(
                f"{image['path']}: {len(image['faces'])} faces ({image['width']}x{image['height']})"
            )
            for f in image["faces"]:
                typer.echo("  " + " ".join(f"{v:.0f}" for v in f["box"]) + f"  {f['score']:.3f}")
    if failed:
        raise typer.Exit(code=1)


@app.command("evaluate-detector")
def evaluate_detector_cmd(
    boxes: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="WIDER .txt or CSV.")],
    images: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Photos root.")],
    model: ModelOpt = None,
    min_face: MinFaceOpt = None,
    device: DeviceOpt = Device.auto,
    as_json: JsonOpt = False,
) -> None:
    """Score the detector: AP at IoU 0.5 (all faces, faces >= 32 px), recall at 1 FP/image."""
    from facetag.inference.detect import evaluate_boxes

    def report(message: str) -> None:
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)

    try:
        r = evaluate_boxes(
            boxes, images, device=device.value, model=model, min_face=min_face, on_error=report
        )
    except FacetagError as e:
        raise _fail(e) from None
    typer.echo(
        json.dumps(r, indent=2)
        if as_json
        else (
            f"AP50 {r['ap50']:.4f}  AP50 (faces >= 32 px) {r['ap50_32']:.4f}  recall at 1 FP/image "
            f"{r['recall_at_1fp']:.4f}\n{r['faces']} faces in {r['images']} photos, "
            f"model {r['model']['detector']} on {r['device']}"
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
    as_json: JsonOpt = False,
) -> None:
    """Photos/s and peak memory of the detector over FOLDER (decoding included)."""
    from facetag.inference.detect import bench_detect

    try:
        r = bench_detect(
            folder,
            device=device.value,
            model=model,
            repeats=repeats,
            min_face=min_face,
            threads=threads,
        )
    except FacetagError as e:
        raise _fail(e) from None
    typer.echo(
        json.dumps(r, indent=2)
        if as_json
        else (
            f"detect on {r['device']} ({r['torch_threads']} threads): {r['photos_per_s']:.2f} "
            f"photos/s over {r['photos']} photos ({r['distinct_photos']} distinct), "
            f"{r['faces_per_photo']} faces/photo\npeak memory {r['peak_rss_mb']:.0f} MiB "
            f"(after the first pass {r['peak_rss_mb_first_pass']:.0f} MiB)"
        )
    )


@app.command()
def evaluate(
    model: Annotated[
        str, typer.Option(help="Model file, runs:/<run>/<path> or models:/<name>@<alias>.")
    ],
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
    as_json: JsonOpt = False,
) -> None:
    """Closed-set accuracy and open-set verification (ROC, EER, TAR@FAR, threshold)."""
    from facetag.device import resolve_device
    from facetag.training.evaluate import evaluate as run_evaluate
    from facetag.training.evaluate import format_result

    try:
        result = run_evaluate(
            model,
            data,
            split=split,
            seed=seed,
            device=resolve_device(device.value),
            log=log,
            store_threshold=store_threshold,
            far=far.value,
        )
    except FacetagError as e:
        raise _fail(e) from None
    typer.echo(json.dumps(result, indent=2) if as_json else format_result(result))


# --- tagging commands ---


class _PhotoBar:
    """photos/s and ETA on stderr (redrawn on a terminal, a line every 30 s in a log)."""

    def __init__(self, kind: str = "error") -> None:
        import sys

        self.kind = kind  # how message() lines start: "error" (tag) or "warning" (enroll)
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.dirty = False
        self.last = 0.0

    def __enter__(self) -> _PhotoBar:
        return self

    def __exit__(self, *_: object) -> None:
        if self.dirty:
            self.stream.write("\n")
        self.stream.flush()

    def update(self, p: Any) -> None:
        import time

        line = f"{p.done}/{p.total} photos  {p.photos_per_s:.2f} photos/s  ETA {p.eta_s:.0f} s"
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line + " " * 8)
            self.dirty = True
        elif p.done == p.total or now - self.last >= 30:
            self.stream.write(line + "\n")
            self.last = now
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.dirty:
            self.stream.write("\n")
            self.dirty = False
        colour = typer.colors.RED if self.kind == "error" else typer.colors.YELLOW
        typer.secho(f"{self.kind}: {text}", fg=colour, err=True)


def _distance(value: float | None) -> float | None:
    if value is not None and not 0 < value < 2:
        raise typer.BadParameter(f"expected a cosine distance in (0, 2), got {value}")
    return value


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
    from facetag.inference.tag import enroll as enroll_people
    from facetag.inference.tag import load_models

    try:
        models = load_models(model, detector, device.value)
        typer.echo(f"device: {models.device}", err=True)
        with _PhotoBar("warning") as bar:
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
        raise _fail(e) from None
    typer.echo(
        f"{r.gallery}: {r.people} people, {r.photos} photos ({r.embedded} embedded, "
        f"{r.kept} unchanged, {r.removed} removed, {r.skipped} skipped), model "
        f"{r.model} on {r.device}"
    )


@app.command()
def tag(
    photos: Annotated[list[Path], typer.Argument(help="Photos or folders of photos.")],
    gallery: Annotated[Path, typer.Option(dir_okay=False, help="From facetag enroll.")],
    recursive: Annotated[bool, typer.Option(help="Look in sub-folders too.")] = False,
    as_json: JsonOpt = False,
    csv: Annotated[Path | None, typer.Option(dir_okay=False, help="Write a CSV here.")] = None,
    xmp: Annotated[bool, typer.Option(help="Write face regions to XMP sidecars.")] = False,
    annotate: Annotated[
        Path | None, typer.Option(file_okay=False, help="Write annotated copies here.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(callback=_distance, help="Cosine distance to name a face.")
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
    from facetag.inference.score import format_score, read_expected, score_tags
    from facetag.inference.tag import TagOptions, load_models, tag_photos
    from facetag.inference.writers import format_tags, to_json

    options = TagOptions(
        recursive=recursive,
        batch_size=batch_size,
        workers=workers,
        csv=csv,
        xmp=xmp,
        annotate=annotate,
        manifest=manifest,
    )
    try:
        wanted = read_expected(expected) if expected is not None else None
        models = load_models(model, detector, device.value, threshold)
        typer.echo(f"device: {models.device}", err=True)
        with _PhotoBar() as bar:
            run = tag_photos(
                photos, gallery, models, options, on_message=bar.message, progress=bar.update
            )
    except FacetagError as e:
        raise _fail(e) from None
    score = score_tags(run.doc["images"], wanted) if wanted is not None else None
    if as_json:
        typer.echo(to_json({**run.doc, "score": score.to_json()} if score else run.doc))
    else:
        typer.echo(format_tags(run.doc))
        if score is not None:
            typer.echo(format_score(score))
    if run.failed:
        raise typer.Exit(code=1)


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
    import tempfile

    from facetag.inference.tag import bench_tag, load_models

    try:
        models = load_models(model, detector, device.value, 0.5)
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
        raise _fail(e) from None
    typer.echo(
        json.dumps(r, indent=2)
        if as_json
        else f"tag on {r['device']} ({r['torch_threads']} threads, {r['workers']} workers): "
        f"{r['photos_per_s']:.2f} photos/s over {r['photos']} photos "
        f"({r['distinct_photos']} distinct), {r['faces_per_photo']} faces/photo\n"
        f"peak memory {r['peak_rss_mb']:.0f} MiB (after the first pass "
        f"{r['peak_rss_mb_first_pass']:.0f} MiB)"
    )
