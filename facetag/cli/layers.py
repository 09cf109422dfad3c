"""``facetag gradcheck`` and ``facetag bench train|infer``: the layer library's proofs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

import typer

from facetag.bench.load import MAX_LOAD
from facetag.cli._app import app, bench_app
from facetag.cli._common import Device, DeviceOpt, JsonOpt, fail
from facetag.errors import FacetagError


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
        message = f"gradcheck: no op named {', '.join(op or [])}; see `facetag gradcheck`"
        raise fail(FacetagError(message))
    rows = summarise(run_cases(cases))
    if as_json:
        typer.echo(json.dumps({"ops": rows, "passed": all(r["passed"] for r in rows)}, indent=2))
    else:
        typer.echo(format_table(rows))
    if not all(r["passed"] for r in rows):
        raise typer.Exit(code=1)


class Model(str, Enum):
    cnn = "cnn"  # the recognition CNN (facetag.models.embedder), 96x96 images
    resnet = "resnet"  # dlib's face ResNet (facetag.models.resnet), 150x150 chips


def _ms_row(label: str, ms: float, images_per_s: float, peak: float | None) -> str:
    mem = "" if peak is None else f"  peak {peak:7.1f} MiB"
    return f"  {label:<18}{ms:8.1f} ms/step  {images_per_s:7.1f} images/s{mem}\n"


def format_bench(result: dict[str, Any], memory: bool) -> str:
    """The human-readable table of ``facetag bench train|infer``."""
    r = result
    compiled = "torch_compiled_ms" in r
    table = (
        f"{r['mode']} {r['model']} on {r['device_name']}, batch {r['batch_size']}, "
        f"{r['image_size']}x{r['image_size']}, median of {r['steps']} interleaved steps, "
        f"load {r['load']} busy processes (load average {r['loadavg_start']:.2f} -> "
        f"{r['loadavg_end']:.2f}, {r['cpu_count']} cores)\n"
        + _ms_row(
            "facetag.layers:",
            r["ours_ms"],
            r["ours_images_per_s"],
            r["ours_peak_mb"] if memory else None,
        )
        + _ms_row(
            "torch.nn eager:",
            r["torch_ms"],
            r["torch_images_per_s"],
            r["torch_peak_mb"] if memory else None,
        )
    )
    if compiled:
        table += (
            _ms_row(
                "torch.nn compiled:",
                r["torch_compiled_ms"],
                r["torch_compiled_images_per_s"],
                r["torch_compiled_peak_mb"] if memory else None,
            ).rstrip("\n")
            + f"  (compile {r['torch_compile_s']:.1f} s, not counted)\n"
        )
    table += f"  ratio ours/eager: time {r['ratio']:.3f}"
    table += f", memory {r['memory_ratio']:.3f}" if memory else ""
    if compiled:
        table += f"\n  ratio ours/compiled: time {r['ratio_compiled']:.3f}"
        if memory and r["memory_ratio_compiled"] is not None:
            table += f", memory {r['memory_ratio_compiled']:.3f}"
    return table


@dataclass(frozen=True)
class BenchArgs:
    """The options ``bench train`` and ``bench infer`` share."""

    device: Device
    as_json: bool
    profile: bool
    steps: int
    batch_size: int
    channels_last: bool
    memory: bool
    model: Model
    compiled: bool
    load: int
    threads: int | None


def _bench(mode: str, a: BenchArgs) -> None:
    from facetag.bench import BenchSpec, profile_nets, run_bench
    from facetag.bench.layers import intra_op_threads
    from facetag.device import resolve_device

    try:
        dev = resolve_device(a.device.value)
    except FacetagError as e:
        raise fail(e) from None
    spec = BenchSpec(
        mode=mode,
        model=a.model.value,
        device=dev,
        steps=a.steps,
        batch_size=a.batch_size,
        channels_last=a.channels_last,
        compiled=a.compiled,
        threads=a.threads or 0,
    )
    if a.profile:
        with intra_op_threads(spec.threads):
            for name, table in profile_nets(spec).items():
                typer.echo(f"== {name} ({mode} {a.model.value}, {dev}) ==\n{table}", err=a.as_json)
    result = run_bench(spec, memory=a.memory, load=a.load)
    typer.echo(json.dumps(result, indent=2) if a.as_json else format_bench(result, a.memory))


ProfileOpt = Annotated[bool, typer.Option(help="Print the per-op time breakdown first.")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Timed steps per network.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Batch size.")]
ChannelsLastOpt = Annotated[bool, typer.Option(help="Run every network in channels_last.")]
MemoryOpt = Annotated[bool, typer.Option(help="Measure peak memory (in subprocesses).")]
ModelOpt = Annotated[Model, typer.Option(help="The network: the recognition CNN or dlib's ResNet.")]
CompiledOpt = Annotated[
    bool, typer.Option(help="Also time the torch.nn twin under torch.compile (default mode).")
]
LoadOpt = Annotated[
    int,
    typer.Option(min=0, max=MAX_LOAD, help="Busy-looping processes to run beside the timed steps."),
]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="torch's CPU threads (default: torch's, one per core).")
]


@bench_app.command("train")
def bench_train(
    device: DeviceOpt = Device.auto,
    as_json: JsonOpt = False,
    profile: ProfileOpt = False,
    steps: StepsOpt = 10,
    batch_size: BatchOpt = 64,
    channels_last: ChannelsLastOpt = False,
    memory: MemoryOpt = True,
    model: ModelOpt = Model.cnn,
    compiled: CompiledOpt = True,
    load: LoadOpt = 0,
    threads: ThreadsOpt = None,
) -> None:
    """Training steps (forward, loss, backward, SGD step): ours vs torch.nn, eager and compiled."""
    args = BenchArgs(
        device,
        as_json,
        profile,
        steps,
        batch_size,
        channels_last,
        memory,
        model,
        compiled,
        load,
        threads,
    )
    _bench("train", args)


@bench_app.command("infer")
def bench_infer(
    device: DeviceOpt = Device.auto,
    as_json: JsonOpt = False,
    profile: ProfileOpt = False,
    steps: StepsOpt = 20,
    batch_size: BatchOpt = 64,
    channels_last: ChannelsLastOpt = False,
    memory: MemoryOpt = True,
    model: ModelOpt = Model.cnn,
    compiled: CompiledOpt = True,
    load: LoadOpt = 0,
    threads: ThreadsOpt = None,
) -> None:
    """Inference batches (eval mode, BatchNorm folded into our convs): ours vs torch.nn,
    eager and compiled."""
    args = BenchArgs(
        device,
        as_json,
        profile,
        steps,
        batch_size,
        channels_last,
        memory,
        model,
        compiled,
        load,
        threads,
    )
    _bench("infer", args)
