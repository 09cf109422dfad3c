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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from facetag import __version__
from facetag.checkpoint import load_checkpoint, save_checkpoint
from facetag.errors import ModelError
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


def load_embedder(path: Path | str, device: str = "cpu", *, fold: bool = True) -> LoadedEmbedder:
    """Rebuild the embedding network from a model file, in eval mode on ``device``.

    A dlib-resnet comes back with its affines folded into its convs, in channels_last
    (the fast inference form; ``fold=False`` gives the trainable one). Its ``net``
    takes chips (N, 3, 150, 150) 0..255, not [-1, 1] images.
    """
    path = Path(path)
    state = read_embedder_state(path)
    if architecture(state, path) == DLIB_RESNET:
        return _load_dlib_resnet(path, state, device, fold)
    m = state["config"]["model"]
    net = EmbeddingNet(
        int(state["in_channels"]),
        tuple(m["widths"]),
        int(m["embedding_dim"]),
        m["activation"],
        dropout=float(m["dropout"]),
        pool=str(m.get("pool", "gap")),
        image_size=tuple(int(v) for v in state["image_size"]),
        flip_average=bool(m.get("flip_average", False)),
    )
    net.load_state_dict(state["embedder"])
    net.to(device).eval()
    threshold = state.get("threshold")
    return LoadedEmbedder(
        net=net,
        path=path,
        in_channels=int(state["in_channels"]),
        image_size=(int(state["image_size"][0]), int(state["image_size"][1])),
        people=list(state["people"]),
        threshold=float(threshold) if threshold is not None else None,
        state=state,
    )


def _load_dlib_resnet(path: Path, state: dict[str, Any], device: str, fold: bool) -> LoadedEmbedder:
    resnet = DlibResNet()
    resnet.load_state_dict(state["embedder"])  # float16 weights are copied into float32
    resnet = resnet.folded() if fold else resnet.eval()
    resnet.to(device)
    threshold = state.get("threshold")
    return LoadedEmbedder(
        net=resnet,
        path=path,
        in_channels=int(state["in_channels"]),
        image_size=(int(state["image_size"][0]), int(state["image_size"][1])),
        people=list(state.get("people", [])),
        threshold=float(threshold) if threshold is not None else None,
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
