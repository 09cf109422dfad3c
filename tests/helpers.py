"""Shared test data: small generated face datasets (no real data needed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def tracking_store(root: Path) -> Iterator[str]:
    """A throwaway MLflow store (SQLite) and runs folder under ``root``, set in the
    environment as facetag reads them; yields the tracking URI."""
    import pytest

    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("FACETAG_RUNS_DIR", str(root / "runs"))
        yield uri


def write_faces(
    root: Path, people: list[str], per_person: int, seed: int = 0, size: int = 32
) -> Path:
    """root/<person>/<k>.png: grey images, a fixed smooth pattern per person + noise.

    Easy to tell apart, so a few epochs of a tiny network learn them.
    """
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for name in people:
        base = torch.nn.functional.interpolate(
            torch.rand(1, 1, 4, 4, generator=g), size=(size, size), mode="bilinear"
        )[0, 0]  # (size, size) smooth, different for each person
        (root / name).mkdir(parents=True)
        for k in range(per_person):
            noisy = (base + 0.08 * torch.randn(size, size, generator=g)).clamp(0, 1)
            pixels = (noisy * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / name / f"{k}.png")
    return root


def graph_nodes(*roots: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``roots`` (walks grad_fn.next_functions)."""
    seen: set[int] = set()
    names: set[str] = set()
    stack = [r.grad_fn for r in roots]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def leaked_nodes(*roots: torch.Tensor) -> set[str]:
    """Autograd nodes that are neither facetag Functions nor AccumulateGrad."""
    from facetag import layers

    allowed = {f"{fn.__name__}Backward" for fn in layers.FUNCTIONS} | {"AccumulateGrad"}
    return graph_nodes(*roots) - allowed
