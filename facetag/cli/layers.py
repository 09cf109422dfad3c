"""``facetag gradcheck`` and ``facetag bench train|infer``: the layer library's proofs."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

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


def format_bench(result: dict[str, Any], memory: bool) -> str:
    """The human-readable table of ``facetag bench train|infer``."""
    r = result
    ours_mem = f"  peak {r['ours_peak_mb']:7.1f} MiB" if memory else ""
    torch_mem = f"  peak {r['torch_peak_mb']:7.1f} MiB" if memory else ""
    ratio_mem = f", memory {r['memory_ratio']:.3f}" if memory else ""
    return (
        f"{r['mode']} on {r['device_name']}, batch {r['batch_size']}, "
        f"{r['image_size']}x{r['image_size']}, median of {r['steps']} interleaved steps\n"
        f"  facetag.layers: {r['ours_ms']:8.1f} ms/step  {r['ours_images_per_s']:7.1f} "
        f"images/s{ours_mem}\n"
        f"  torch.nn:       {r['torch_ms']:8.1f} ms/step  {r['torch_images_per_s']:7.1f} "
        f"images/s{torch_mem}\n"
        f"  ratio ours/torch: time {r['ratio']:.3f}{ratio_mem}"
    )


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
        raise fail(e) from None
    spec = BenchSpec(
        mode=mode, device=dev, steps=steps, batch_size=batch_size, channels_last=channels_last
    )
    if profile:
        for name, table in profile_pair(spec).items():
            typer.echo(f"== {name} ({mode}, {dev}) ==\n{table}", err=as_json)
    result = run_bench(spec, memory=memory)
    typer.echo(json.dumps(result, indent=2) if as_json else format_bench(result, memory))


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
