"""Model files: what ``facetag train`` writes and evaluate, enroll and tag load.

A model file is a facetag checkpoint (facetag.checkpoint) holding the embedder's weights,
the config it was built from, its input (channels, size), the people it was trained on
and, after ``facetag evaluate``, the calibrated verification threshold.

``architecture`` says which network the weights belong to: ``"embedding-net"`` (the
small VGG-style EmbeddingNet that ``facetag train`` builds from ``config``; files without
the field are this) or ``"dlib-resnet"`` (facetag.models.resnet.DlibResNet, as
facetag.models.dlib_import writes it: no config, its ``provenance`` records the source).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from facetag import __version__
from facetag.checkpoint import load_checkpoint, save_checkpoint
from facetag.errors import ModelError
from facetag.layers.fused import ACTIVATIONS
from facetag.models.embedder import EmbeddingNet
from facetag.models.resnet import ARCHITECTURE as DLIB_RESNET
from facetag.models.resnet import DlibResNet

EMBEDDER_FORMAT = "facetag-embedder/1"
EMBEDDING_NET = "embedding-net"  # the architecture of files without the field
ARCHITECTURES = (EMBEDDING_NET, DLIB_RESNET)


@dataclass(frozen=True)
class ModelRef:
    """A model file to load, as a --model / --detector spec resolved to it
    (facetag.training.tracking.resolve_model turns runs:/ and models:/ URIs into one)."""

    path: Path | None = None  # None: the file shipped in the package
    spec: str = "shipped"  # what the user passed, shown in outputs ("none": no detector)
    calibrated_threshold: float | None = None  # stored in MLflow by facetag evaluate


def shipped_file(name: str, fix: str) -> Path:
    """facetag/weights/<name> inside the package; ModelError (one line, ending in ``fix``)
    when the installation lacks it."""
    path = Path(str(resources.files("facetag") / "weights" / name))
    if not path.is_file():
        raise ModelError(f"{path}: expected the shipped weights, got no such file; {fix}")
    return path


def shipped_embedder() -> Path:
    """The embedder weights inside the package (``make weights`` rebuilds them)."""
    return shipped_file(
        "embedder.pt",
        "pass --model (a model.pt from facetag train, runs:/... or models:/...) or run "
        "make weights",
    )


@dataclass
class LoadedEmbedder:
    net: EmbeddingNet | DlibResNet  # both: .embedding_dim, forward(images), embed(images)
    path: Path
    in_channels: int
    image_size: tuple[int, int]  # (H, W)
    people: list[str]
    threshold: float | None  # cosine distance under which two faces are the same person
    state: dict[str, Any]  # the whole file, for callers that need more

    @property
    def aligned(self) -> bool:
        """Whether faces reach this net as landmark-aligned chips (the dlib-resnet) rather
        than squares around their boxes (facetag.inference.align)."""
        return self.state.get("architecture") == DLIB_RESNET

    @property
    def version(self) -> str:
        """Identifies these weights (galleries and manifests record it)."""
        return str(self.state.get("model_id", self.path.name))


def read_embedder_state(path: Path | str) -> dict[str, Any]:
    """A model file's contents; ModelError (one line) when it is not an embedder's."""
    state = load_checkpoint(path)
    if state.get("format") != EMBEDDER_FORMAT:
        raise ModelError(
            f"{path}: expected a facetag embedder model (format {EMBEDDER_FORMAT}), got "
            f"{state.get('format', 'a checkpoint without a model format')!r}; pass the "
            "model.pt that facetag train wrote, or a runs:/ or models:/ URI"
        )
    return state


def architecture(state: dict[str, Any], path: Path | str) -> str:
    """The model file's architecture; ModelError (one line) for one this facetag lacks."""
    arch = state.get("architecture", EMBEDDING_NET)
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"{path}: expected an embedder architecture in {', '.join(ARCHITECTURES)}, got "
            f"{arch!r}; upgrade facetag (this is {__version__})"
        )
    return str(arch)


MAX_INPUT_SIDE = 512  # px; an embedder input larger than this is a damaged or hostile file
MAX_WIDTH = 4096  # channels of one stage, and the embedding's size


class Words(str):
    """What was found, said in words (shown as it is, where a value is shown as its repr)."""


def _bad(path: Path, field: str, expected: str, got: object) -> ModelError:
    shown = str(got) if isinstance(got, Words) else repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ModelError(
        f"{path}: expected {field} to be {expected}, got {shown}; pass a model file that "
        "facetag train or facetag export wrote"
    )


def _int_in(path: Path, state: dict[str, Any], field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(path, field, f"an integer in [{lo}, {hi}]", value)
    return value


def check_threshold(path: Path, value: Any, field: str = "threshold") -> float | None:
    """A stored cosine-distance threshold: None, or a finite number in (0, 2)."""
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 < value < 2:
        raise _bad(path, field, "a cosine distance in (0, 2)", value)
    return float(value)


def embedder_fields(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Every field load_embedder uses, checked (ModelError naming the file and the field)."""
    arch = architecture(state, path)
    out: dict[str, Any] = {"architecture": arch}
    out["in_channels"] = _int_in(path, state, "in_channels", state.get("in_channels"), 1, 3)
    if out["in_channels"] == 2:
        raise _bad(path, "in_channels", "1 (grey) or 3 (colour)", 2)
    size = state.get("image_size")
    if not isinstance(size, list | tuple) or len(size) != 2:
        raise _bad(path, "image_size", "[H, W]", size)
    out["image_size"] = tuple(
        _int_in(path, state, f"image_size[{i}]", v, 8, MAX_INPUT_SIDE) for i, v in enumerate(size)
    )
    people = state.get("people", [])
    if not isinstance(people, list) or not all(isinstance(n, str) for n in people):
        raise _bad(path, "people", "a list of names", people)
    out["people"] = list(people)
    out["threshold"] = check_threshold(path, state.get("threshold"))
    weights = state.get("embedder")
    if not isinstance(weights, dict) or not weights:
        raise _bad(
            path, "embedder", "the network's weights (a state dict)", Words(type(weights).__name__)
        )
    if arch == DLIB_RESNET:
        if out["in_channels"] != 3 or out["image_size"] != (150, 150):
            raise _bad(path, "image_size", "[150, 150] with 3 channels for a dlib-resnet", size)
        return out
    config = state.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise _bad(path, "config.model", "the network's config (widths, embedding_dim, ...)", None)
    widths = model.get("widths")
    if not isinstance(widths, list | tuple) or not 1 <= len(widths) <= 8:
        raise _bad(path, "config.model.widths", "a list of 1 to 8 channel counts", widths)
    out["widths"] = tuple(
        _int_in(path, state, f"config.model.widths[{i}]", w, 1, MAX_WIDTH)
        for i, w in enumerate(widths)
    )
    out["embedding_dim"] = _int_in(
        path, state, "config.model.embedding_dim", model.get("embedding_dim"), 1, MAX_WIDTH
    )
    activation = model.get("activation")
    if activation not in ACTIVATIONS:
        raise _bad(path, "config.model.activation", f"one of {', '.join(ACTIVATIONS)}", activation)
    out["activation"] = activation
    dropout = model.get("dropout", 0.0)
    ok = isinstance(dropout, int | float) and not isinstance(dropout, bool)
    if not ok or not 0 <= dropout < 1:
        raise _bad(path, "config.model.dropout", "a number in [0, 1)", dropout)
    out["dropout"] = float(dropout)
    pool = model.get("pool", "gap")
    if pool not in ("gap", "flatten"):
        raise _bad(path, "config.model.pool", "gap or flatten", pool)
    out["pool"] = pool
    flip = model.get("flip_average", False)
    if not isinstance(flip, bool):
        raise _bad(path, "config.model.flip_average", "true or false", flip)
    out["flip_average"] = flip
    return out


def load_weights(path: Path, net: torch.nn.Module, weights: dict[str, Any], field: str) -> None:
    """net.load_state_dict(weights) with a mismatch as one ModelError line, not a traceback
    listing every tensor."""
    expected = net.state_dict()
    for name, t in expected.items():
        got = weights.get(name)
        if not isinstance(got, torch.Tensor):
            raise _bad(path, f"{field}[{name!r}]", f"a tensor of shape {tuple(t.shape)}", got)
        if tuple(got.shape) != tuple(t.shape):
            raise _bad(
                path,
                f"{field}[{name!r}]",
                f"of shape {tuple(t.shape)} (as the file's config says)",
                tuple(got.shape),
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise _bad(path, f"{field}[{name!r}]", "finite numbers", Words("NaN or infinity"))
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise _bad(path, field, "only the network's weights", Words(f"also {extra[0]!r}"))
    net.load_state_dict(weights)


def load_embedder(path: Path | str, device: str = "cpu", *, fold: bool = True) -> LoadedEmbedder:
    """Rebuild the embedding network from a model file, in eval mode on ``device``.

    A dlib-resnet comes back with its affines folded into its convs, in channels_last
    (the fast inference form; ``fold=False`` gives the trainable one). Its ``net``
    takes chips (N, 3, 150, 150) 0..255, not [-1, 1] images. Every field is checked
    first (embedder_fields): one ModelError line naming the file and the field.
    """
    path = Path(path)
    state = read_embedder_state(path)
    f = embedder_fields(path, state)
    if f["architecture"] == DLIB_RESNET:
        return _load_dlib_resnet(path, state, device, fold, f)
    net = EmbeddingNet(
        f["in_channels"],
        f["widths"],
        f["embedding_dim"],
        f["activation"],
        dropout=f["dropout"],
        pool=f["pool"],
        image_size=f["image_size"],
        flip_average=f["flip_average"],
    )
    load_weights(path, net, state["embedder"], "embedder")
    net.to(device).eval()
    return LoadedEmbedder(
        net=net,
        path=path,
        in_channels=f["in_channels"],
        image_size=f["image_size"],
        people=f["people"],
        threshold=f["threshold"],
        state=state,
    )


def _load_dlib_resnet(
    path: Path, state: dict[str, Any], device: str, fold: bool, f: dict[str, Any]
) -> LoadedEmbedder:
    resnet = DlibResNet()
    # float16 weights are copied into float32; load_weights checks the shapes first.
    load_weights(path, resnet, state["embedder"], "embedder")
    resnet = resnet.folded() if fold else resnet.eval()
    resnet.to(device)
    return LoadedEmbedder(
        net=resnet,
        path=path,
        in_channels=f["in_channels"],
        image_size=f["image_size"],
        people=f["people"],
        threshold=f["threshold"],
        state=state,
    )


def write_threshold(path: Path | str, threshold: float, extra: dict[str, Any]) -> None:
    """Store the calibrated threshold (and how it was found) in the model file, atomically."""
    state = load_checkpoint(path)
    state = {k: v for k, v in state.items() if k != "facetag"}
    state["threshold"] = float(threshold)
    state["calibration"] = extra
    save_checkpoint(path, state)


def weights_id(weights: dict[str, Any]) -> str:
    """``embedder-<sha256 of the weights' names and bytes, 16 hex>``: the model version."""
    digest = hashlib.sha256()
    for name, t in weights.items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"embedder-{digest.hexdigest()[:16]}"


def export_embedder(src: Path | str, dst: Path | str, half: bool = True) -> dict[str, Any]:
    """Write the part of a model file that enrolment and tagging need, to ship it.

    Drops the training-only classifier head (one row per training person). ``half``
    stores floating-point weights as float16: load_embedder copies them into the float32
    network (load_state_dict casts), embeddings move by ~1e-3 in cosine distance, and the
    file halves. The exported weights get their own model_id (galleries made with the
    full-precision model are re-embedded); threshold, calibration, config and run id stay.
    """
    state = read_embedder_state(src)
    weights = {
        k: v.half() if half and v.is_floating_point() else v for k, v in state["embedder"].items()
    }
    if half:  # the id of what loaders will run: float32 copies of the float16 values
        as_run = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    else:
        as_run = weights
    out = {k: v for k, v in state.items() if k not in ("classifier", "facetag")}
    out.update(
        embedder=weights,
        model_id=weights_id(as_run),
        exported_from=state.get("model_id"),
        weights_dtype="float16" if half else "float32",
    )
    save_checkpoint(dst, out)
    return out
