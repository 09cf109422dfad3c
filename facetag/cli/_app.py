"""The Typer apps the command modules register on (``facetag``, ``bench``, ``data``)."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals hold tensors
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Find the faces in your photos and name the people you know.",
)
bench_app = typer.Typer(
    no_args_is_help=True,
    help="Time facetag's layers against their torch.nn twins, and the pipeline on photos.",
)
app.add_typer(bench_app, name="bench")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, fetch and prepare face datasets.")
app.add_typer(data_app, name="data")
