"""``facetag import dlib`` and ``facetag bench embed``: the public-domain dlib network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from facetag.cli._app import app, bench_app
from facetag.cli._common import JsonOpt, fail
from facetag.errors import FacetagError

import_app = typer.Typer(no_args_is_help=True, help="Bring other tools' trained networks in.")
app.add_typer(import_app, name="import")


@import_app.command("dlib")
def import_dlib_cmd(
    file: Annotated[
        Path | None,
        typer.Argument(
            help="dlib_face_recognition_resnet_model_v1.dat [default: the one in the "
            "face_recognition_models package]."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(dir_okay=False, help="The facetag model file to write.")] = (
        Path("dlib-resnet.pt")
    ),
    half: Annotated[bool, typer.Option(help="Store the weights as float16 (11 MB).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Read dlib's face metric network (pure Python, no dlib needed) into a facetag model."""
    from facetag.models.dlib_import import import_dlib, packaged_dlib_model

    try:
        state = import_dlib(file or packaged_dlib_model(), out, half=half)
    except FacetagError as e:
        raise fail(e) from None
    p = state["provenance"]
    summary = {
        "out": str(out),
        "model_id": state["model_id"],
        "bytes": out.stat().st_size,
        "weights_dtype": state["weights_dtype"],
        **p,
    }
    typer.echo(
        json.dumps(summary, indent=2)
        if as_json
        else (
            f"{out}: {state['model_id']} ({summary['bytes'] / 1e6:.1f} MB, "
            f"{state['weights_dtype']}) from {p['source']} (sha256 {p['sha256'][:12]}..., "
            f"{p['licence'].split(' (')[0]})"
        )
    )


def format_bench_embed(r: dict[str, Any]) -> str:
    return (
        f"embed {r['chips']} chips, {r['torch_threads']} torch threads: facetag "
        f"{r['ours']['best']:.1f} chips/s, dlib {r['dlib']['best']:.1f} chips/s "
        f"(compute_face_descriptor); ours/dlib throughput {r['ratio']:.2f}x; largest "
        f"descriptor difference {r['max_abs_diff']:.1e}"
    )


@bench_app.command("embed")
def bench_embed_cmd(
    chips: Annotated[
        Path | None, typer.Option(exists=True, file_okay=False, help="Folder of 150x150 chips.")
    ] = None,
    n: Annotated[int, typer.Option(min=1, help="Chips to embed.")] = 64,
    model: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A dlib-resnet model file.")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed passes (best kept).")] = 3,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Chips/s of our dlib-resnet against dlib's compute_face_descriptor, same chips."""
    from facetag.bench.embed import bench_embed, load_chips

    try:
        r = bench_embed(load_chips(chips, n), model=model, repeats=repeats, threads=threads)
    except FacetagError as e:
        raise fail(e) from None
    typer.echo(json.dumps(r, indent=2) if as_json else format_bench_embed(r))
