"""The facetag command line (Typer). Parse, validate, call one library function, report."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

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
    op: Annotated[
        list[str] | None, typer.Option(help="Check only these ops (repeatable).")
    ] = None,
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
    mode: str, device: Device, as_json: bool, profile: bool, steps: int, batch_size: int,
    channels_last: bool, memory: bool,
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
