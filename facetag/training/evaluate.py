"""``facetag evaluate``: closed-set accuracy and open-set verification of a trained embedder.

    result = evaluate("models:/facetag-embedder@champion", None, split=None, seed=None)

1. Load the model (a model file, ``runs:/...`` or ``models:/...``) and a person-folder
   dataset: by default the one it was trained on, split with its own split and seed, so
   the test images are exactly the ones training held out. Another dataset (other people)
   works the same way: its train images are enrolled and its test images probe.
2. Embed every train and test image (no augmentation, eval mode, no_grad).
3. Closed set: each test image gets the person of the nearest per-person mean train
   embedding (cosine); report the accuracy.
4. Open set: every pair of test images (i < j) is scored by cosine similarity; from the
   ROC come the AUC, the EER, the TAR at FAR 1e-2 and 1e-3, and the threshold that
   maximises pair accuracy.
5. The chosen threshold is stored with the model and the figures go to the model's run.

Thresholds are cosine DISTANCES, d = 1 - cos(a, b) in [0, 2] between L2-normalised
embeddings, because tagging compares distances: two faces are the same person when
d < threshold. A stored threshold lies halfway between two observed pair distances, so
``<`` and ``<=`` give the same rates on the evaluation pairs.

Which threshold tagging uses: the one at FAR 1e-3 when the test pairs can measure it (at
least 1000 different-person pairs), else the one with the best pair accuracy. A tagger
that says "unknown" costs the user one click; one that names the wrong person puts a
wrong name into their photo library (and maybe a stranger's face under a friend's name),
so the threshold is set by how rarely different people are accepted, not by accuracy.
Accuracy over all pairs is dominated by the many different-person pairs anyway, but with
few pairs its threshold rests on a handful of them: it is only the fallback.

Where the threshold is stored (``store_threshold``):
- in the model file (``threshold`` and ``calibration``), which ``load_embedder`` reads; for
  a ``runs:/`` or ``models:/`` spec that file is a downloaded copy, so the calibrated copy
  is also logged to the model's run as ``calibration/model.pt``;
- as tags on the model's run and on every registered version of that run
  (``facetag.threshold`` and friends), which ``calibrated_threshold(spec)`` reads: that is
  how ``models:/facetag-embedder@champion`` finds its threshold.

What goes to the model's run (``log``): metrics ``eval_*`` (step 0), ``evaluation/roc.png``
with the operating point, and ``evaluation/result.json``. The run keeps its status: the
figures are added to it, it is not reopened. A local model file that records no run (or a
run that is not in the tracking store) is evaluated without logging, and the result says so.
"""

from __future__ import annotations

import datetime
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from facetag import __version__
from facetag.data.folders import FaceDataset, Split, scan_folder
from facetag.data.folders import split as split_folder
from facetag.device import resolve_device
from facetag.errors import DataError
from facetag.metrics.verification import (
    DEFAULT_FAR,
    FARS,
    OperatingPoint,
    Verification,
    choose_threshold,
    impostors_needed,
    pair_scores,
    verify,
)
from facetag.progress import Progress, ProgressFn
from facetag.training import figures

if TYPE_CHECKING:
    from facetag.models.embedder import EmbeddingNet
    from facetag.training.tracking import Tracker

TAG_PREFIX = "facetag."
METRIC_PREFIX = "eval_"
ROC_ARTIFACT = "evaluation/roc.png"
RESULT_ARTIFACT = "evaluation/result.json"
CALIBRATED_MODEL_ARTIFACT = "calibration/model.pt"


@torch.no_grad()
def embed_dataset(
    net: EmbeddingNet,
    data: FaceDataset,
    device: str,
    batch_size: int = 256,
    on_batch: Callable[[int, int], None] | None = None,
) -> Tensor:
    """L2-normalised embeddings (N, D) float32 on the CPU of every image of ``data``.

    ``data`` should have no augmentation (FaceDataset's default); the net runs in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"embed_dataset: expected batch_size >= 1, got {batch_size}")
    net.eval()
    N = len(data)
    out = []
    for start in range(0, N, batch_size):
        x, _ = data.get_batch(range(start, min(start + batch_size, N)))  # (B, C, H, W)
        if getattr(net, "takes_pixels", False):
            x = (x + 1.0) * 127.5  # the dlib-resnet takes 0..255 chips
        out.append(net.embed(x.to(device)).float().cpu())  # (B, D)
        if on_batch is not None:
            on_batch(min(start + batch_size, N), N)
    return torch.cat(out)  # (N, D)


def closed_set_accuracy(
    gallery: Tensor, gallery_labels: Tensor, probes: Tensor, probe_labels: Tensor, P: int
) -> tuple[float, Tensor]:
    """(accuracy, predictions (M,)): each probe gets the person of the nearest mean.

    gallery (G, D) and probes (M, D) are L2-normalised embeddings, labels int64 in [0, P).
    Each person's gallery embeddings are averaged and re-normalised; a probe goes to the
    mean with the highest cosine similarity. People without gallery images are never
    predicted.
    """
    if gallery.ndim != 2 or probes.ndim != 2 or gallery.shape[1] != probes.shape[1]:
        raise ValueError(
            f"closed_set_accuracy: expected gallery (G, D) and probes (M, D), got "
            f"{tuple(gallery.shape)} and {tuple(probes.shape)}"
        )
    if gallery_labels.shape != gallery.shape[:1] or probe_labels.shape != probes.shape[:1]:
        raise ValueError(
            f"closed_set_accuracy: expected one label per embedding, got "
            f"{tuple(gallery_labels.shape)} for {gallery.shape[0]} and "
            f"{tuple(probe_labels.shape)} for {probes.shape[0]}"
        )
    if probes.shape[0] == 0:
        raise ValueError("closed_set_accuracy: expected at least one probe, got none")
    D = gallery.shape[1]
    g = gallery.double()
    sums = torch.zeros(P, D, dtype=torch.float64).index_add_(0, gallery_labels, g)  # (P, D)
    counts = torch.bincount(gallery_labels, minlength=P)  # (P,)
    means = torch.nn.functional.normalize(sums, dim=1)  # (P, D); an empty person stays 0
    sim = probes.double() @ means.T  # (M, P)
    sim[:, counts == 0] = -math.inf
    pred = sim.argmax(dim=1)  # (M,)
    return float((pred == probe_labels).double().mean()), pred


def thin_roc(fpr: Tensor, tpr: Tensor, resolution: int = 2000) -> Tensor:
    """Indices (K,) of the ROC points worth drawing: the curve as a figure shows it.

    A point is kept when it enters a new cell of a ``resolution`` grid on the linear
    axes or of a ``resolution / 4`` per-decade grid on the log FAR axis; the first and
    last points always are. That is at most about 3 * resolution + 40 points, however
    many pairs there are (millions for a few thousand test images, which matplotlib
    takes half a minute to draw), and the curve moves by at most one cell.
    """
    cells = torch.stack(
        [
            (fpr * resolution).floor(),
            (tpr * resolution).floor(),
            (torch.log10(fpr.clamp(min=1e-10)) * (resolution / 4)).floor(),
        ],
        dim=1,
    )  # (T + 1, 3)
    keep = torch.ones(fpr.shape[0], dtype=torch.bool)  # (T + 1,)
    keep[1:] = (cells[1:] != cells[:-1]).any(dim=1)
    keep[-1] = True
    return torch.nonzero(keep).flatten()  # (K,)


def evaluate(
    model_spec: str,
    data: Path | None,
    *,
    split: str | None,
    seed: int | None,
    device: str = "auto",
    log: bool = True,
    store_threshold: bool = True,
    batch_size: int = 256,
    far: str = DEFAULT_FAR,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Evaluate a trained embedder; the dict ``facetag evaluate --json`` prints.

    model_spec: a model file, an MLflow model directory, ``runs:/<run>/<path>`` or
    ``models:/<name>@<alias>`` / ``models:/<name>/<version>``. data, split and seed
    default to the model's own (its config's data.path, data.split and train.seed).
    ``log``: metrics, ROC figure and result JSON to the model's run. ``store_threshold``:
    the chosen threshold into the model file and the run / version tags (module doc).
    ``far``: the false accept rate the stored threshold is chosen at ("1e-3" or "1e-2").
    ``progress`` gets a Progress per image loaded and per batch embedded.

    Nothing is written before every number is computed: a bad model, dataset or split
    raises (ModelError, DataError, ConfigError) and leaves files, runs and registry as
    they were.
    """
    from facetag.models.io import load_embedder
    from facetag.training import tracking

    used = resolve_device(device)
    remote = model_spec.startswith(("runs:/", "models:/"))
    with tempfile.TemporaryDirectory(prefix="facetag-evaluate-") as tmp:
        path = tracking.resolve_model_uri(model_spec, Path(tmp) / "model" if remote else None)
        loaded = load_embedder(path, used)
        root, split_spec, split_seed = _evaluation_data(loaded.state, path, data, split, seed)
        sp = _split_for_pairs(root, split_spec, split_seed)
        accuracy, v, sizes = _measure(loaded, sp, used, batch_size, progress)
        rule, chosen = choose_threshold(v, far)
        # A local file names its run itself; model_run_id would only set up the store.
        run_id = tracking.model_run_id(model_spec) if remote else None
        run_id = run_id or str(loaded.state.get("run_id") or "")
        result: dict[str, Any] = {
            "model": model_spec,
            "model_id": loaded.version,
            "data": str(root),
            "split": split_spec,
            "seed": split_seed,
            "people": len(sp.people),
            "enrolled_images": sizes[0],
            "test_images": sizes[1],
            **_verification_fields(accuracy, v, rule, chosen),
            "stored": [],
            "run_id": run_id or None,
            "tracking": "",
            "device": used,
        }
        _record(result, model_spec, path, tmp, v, chosen, log=log, store=store_threshold)
    return result


def _measure(
    loaded: Any, sp: Split, device: str, batch_size: int, progress: ProgressFn | None
) -> tuple[float, Verification, tuple[int, int]]:
    """Embed the split's enrolment and test images: (closed-set accuracy, verification of
    every test pair, (enrolment images, test images))."""
    size, channels = loaded.image_size, loaded.in_channels

    def stage(name: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(Progress(name, done, total))

    train_set = FaceDataset(
        sp.train, sp.people, size=size, channels=channels, on_progress=stage("load train")
    )
    test_set = FaceDataset(
        sp.test, sp.people, size=size, channels=channels, on_progress=stage("load test")
    )
    gallery = embed_dataset(loaded.net, train_set, device, batch_size, stage("embed train"))
    probes = embed_dataset(loaded.net, test_set, device, batch_size, stage("embed test"))
    accuracy, _ = closed_set_accuracy(
        gallery, train_set.labels, probes, test_set.labels, len(sp.people)
    )
    scores, same = pair_scores(probes, test_set.labels)
    return accuracy, verify(scores, same), (len(train_set), len(test_set))


def _verification_fields(
    accuracy: float, v: Verification, rule: str, chosen: OperatingPoint
) -> dict[str, Any]:
    return {
        "pairs": v.pairs,
        "genuine_pairs": v.genuine,
        "impostor_pairs": v.impostor,
        "closed_set_accuracy": accuracy,
        "auc": v.auc,
        "eer": v.eer,
        "tar_at_far": {k: None if p is None else p.tar for k, p in v.at_far.items()},
        "threshold_at_far": {k: None if p is None else p.threshold for k, p in v.at_far.items()},
        "best_threshold": v.best.threshold,
        "best_pair_accuracy": v.best_accuracy,
        "threshold": chosen.threshold,
        "threshold_rule": rule,
        "threshold_far": chosen.far,
        "threshold_tar": chosen.tar,
        "threshold_metric": "cosine distance (1 - cos); same person when below",
    }


def _record(
    result: dict[str, Any],
    model_spec: str,
    path: Path,
    tmp: str,
    v: Verification,
    chosen: OperatingPoint,
    *,
    log: bool,
    store: bool,
) -> None:
    """Store the threshold in the model file and MLflow, and log the evaluation."""
    from facetag.models.io import write_threshold

    remote = model_spec.startswith(("runs:/", "models:/"))
    if store:
        write_threshold(path, chosen.threshold, _calibration_record(result))
        if not remote:
            result["stored"].append(str(path))
    if not (log or store):  # nothing for MLflow to record
        result["tracking"] = "not logged: --no-log"
        return
    run_id = result["run_id"]
    tracker, why_not = _attach(run_id) if run_id else (None, _no_run(path))
    if tracker is None:
        result["run_id"] = None
        result["tracking"] = f"not logged: {why_not}"
        return
    result["tracking"] = f"logged to run {tracker.run_id}" if log else "not logged: --no-log"
    if store:
        result["stored"] += _store_in_mlflow(tracker, model_spec, path, result, tmp)
    if log:
        _log_evaluation(tracker, v, chosen, result)


def format_result(result: dict[str, Any]) -> str:
    """The human-readable report of an ``evaluate`` result (the CLI without --json)."""

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    lines = [
        ("model", f"{result['model']} ({result['model_id']})"),
        (
            "data",
            f"{result['data']}: {result['people']} people, {result['enrolled_images']} "
            f"enrolled, {result['test_images']} test images (split {result['split']}, "
            f"seed {result['seed']})",
        ),
        ("closed-set accuracy", pct(result["closed_set_accuracy"])),
        (
            "verification",
            f"{result['pairs']} pairs ({result['genuine_pairs']} same person), "
            f"AUC {result['auc']:.4f}, EER {pct(result['eer'])}",
        ),
    ]
    for name, far in FARS.items():
        tar = result["tar_at_far"].get(name)
        text = (
            f"n/a (needs {impostors_needed(far)} different-person pairs, got "
            f"{result['impostor_pairs']})"
            if tar is None
            else f"{pct(tar)} (threshold {result['threshold_at_far'][name]:.4f})"
        )
        lines.append((f"TAR at FAR {name}", text))
    lines += [
        (
            "best threshold",
            f"{result['best_threshold']:.4f} (pair accuracy {pct(result['best_pair_accuracy'])})",
        ),
        (
            "threshold",
            f"{result['threshold']:.4f} cosine distance ({result['threshold_rule']}: FAR "
            f"{pct(result['threshold_far'])}, TAR {pct(result['threshold_tar'])})",
        ),
        ("stored in", ", ".join(result["stored"]) or "nowhere (--no-store-threshold)"),
        ("tracking", result["tracking"]),
        ("device", result["device"]),
    ]
    width = max(len(a) for a, _ in lines)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in lines)


def _evaluation_data(
    state: dict[str, Any], path: Path, data: Path | None, split_spec: str | None, seed: int | None
) -> tuple[Path, str, int]:
    """(dataset root, split, seed): the arguments, else the model's own."""
    config = state.get("config", {})
    if data is None:
        recorded = str(config.get("data", {}).get("path", ""))
        if not recorded:
            raise DataError(
                f"{path}: expected the model's config to name its dataset, got none; "
                "pass --data PATH"
            )
        data = Path(recorded)
        if not data.is_dir():
            raise DataError(
                f"{path}: expected the dataset it was trained on at {data}, got no such "
                "folder; pass --data PATH"
            )
    if split_spec is None:
        split_spec = str(config.get("data", {}).get("split", ""))
        if not split_spec:
            raise DataError(
                f"{path}: expected the model's config to record a split, got "
                "none; pass --split, e.g. 5/5 or 0.5"
            )
    if seed is None:
        seed = int(config.get("train", {}).get("seed", 0))
    return data, split_spec, seed


def _split_for_pairs(root: Path, split_spec: str, seed: int) -> Split:
    """Split the dataset; DataError unless the test images make both kinds of pair."""
    sp = split_folder(scan_folder(root), split_spec, seed)
    per_person = torch.bincount(
        torch.tensor([s.label for s in sp.test], dtype=torch.int64), minlength=len(sp.people)
    )
    with_test = int((per_person > 0).sum())
    most = int(per_person.max()) if per_person.numel() else 0
    if with_test < 2 or most < 2:
        raise DataError(
            f"{root}: expected test images of at least 2 people, 2 or more for someone, "
            f"got {len(sp.test)} test images of {with_test} people with split {split_spec}; "
            "pass a split that leaves 2 or more test images per person, e.g. --split 0.5"
        )
    return sp


def _calibration_record(result: dict[str, Any]) -> dict[str, Any]:
    """What the model file keeps about how its threshold was found (plain data)."""
    keys = (
        "threshold_rule",
        "threshold_far",
        "threshold_tar",
        "threshold_metric",
        "data",
        "split",
        "seed",
        "pairs",
        "genuine_pairs",
        "impostor_pairs",
        "eer",
        "auc",
        "best_threshold",
        "threshold_at_far",
        "closed_set_accuracy",
    )
    record = {k: result[k] for k in keys}
    record["evaluated_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    record["facetag_version"] = __version__
    return record


def _no_run(path: Path) -> str:
    return (
        f"{path} records no MLflow run; evaluate runs:/<run_id>/embedder or "
        "models:/facetag-embedder@champion to log to the training run"
    )


def _attach(run_id: str) -> tuple[Tracker | None, str]:
    """A Tracker on the existing run ``run_id``, its status untouched; or (None, why not).

    NOTE: Tracker.resume would set the run RUNNING and drop its failure tag; adding
    metrics and artifacts to a finished run needs neither, so the Tracker is built on
    the run as it is.
    """
    from facetag.training import tracking

    uri = tracking.tracking_uri()
    client = tracking.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
    except tracking.MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None, f"run {run_id} is not in {uri}; set MLFLOW_TRACKING_URI to its store"
    if run.info.lifecycle_stage == "deleted":
        return None, f"run {run_id} is deleted in {uri}; restore it in the MLflow UI"
    return tracking.Tracker(client, run_id, run.info.experiment_id, uri), ""


def _threshold_tags(result: dict[str, Any]) -> dict[str, str]:
    tags = {
        f"{TAG_PREFIX}threshold": repr(result["threshold"]),  # tracking.THRESHOLD_TAG
        f"{TAG_PREFIX}threshold_rule": result["threshold_rule"],
        f"{TAG_PREFIX}threshold_best_accuracy": repr(result["best_threshold"]),
        f"{TAG_PREFIX}threshold_data": result["data"],
    }
    for name, value in result["threshold_at_far"].items():
        if value is not None:
            tags[f"{TAG_PREFIX}threshold_far{name}"] = repr(value)
    return tags


def _store_in_mlflow(
    tracker: Tracker, spec: str, path: Path, result: dict[str, Any], tmp: str
) -> list[str]:
    """Tags on the run and its registered versions, and the calibrated model file."""
    tags = _threshold_tags(result)
    tracker.set_tags(tags)
    stored = [f"run {tracker.run_id} tags"]
    versions = {
        (str(mv.name), str(mv.version)): mv
        for mv in tracker.client.search_model_versions(f"run_id = '{tracker.run_id}'")
    }
    from facetag.training.tracking import registered_version

    named = registered_version(tracker.client, spec)
    if named is not None:
        versions[(str(named.name), str(named.version))] = named
    for name, number in sorted(versions):
        for key, value in tags.items():
            tracker.client.set_model_version_tag(name, number, key, value)
        stored.append(f"models:/{name}/{number} tags")
    upload = Path(tmp) / "upload"
    upload.mkdir()
    shutil.copyfile(path, upload / Path(CALIBRATED_MODEL_ARTIFACT).name)
    tracker.log_file(
        upload / Path(CALIBRATED_MODEL_ARTIFACT).name, str(Path(CALIBRATED_MODEL_ARTIFACT).parent)
    )
    stored.append(f"runs:/{tracker.run_id}/{CALIBRATED_MODEL_ARTIFACT}")
    return stored


def _log_evaluation(
    tracker: Tracker, v: Verification, chosen: OperatingPoint, result: dict[str, Any]
) -> None:
    metrics = {
        "closed_set_accuracy": result["closed_set_accuracy"],
        "eer": v.eer,
        "auc": v.auc,
        "threshold": chosen.threshold,
        "best_threshold": v.best.threshold,
    }
    for name, p in v.at_far.items():
        if p is not None:  # not measurable: no metric rather than a misleading 0 or 1
            metrics[f"tar_far{name}"] = p.tar
    tracker.log_metrics({f"{METRIC_PREFIX}{k}": x for k, x in metrics.items()}, step=0)
    title = (
        f"Verification ROC: {v.pairs} pairs of {result['test_images']} test images "
        f"(threshold = cosine distance, {result['threshold_rule']})"
    )
    keep = thin_roc(v.fpr, v.tpr)
    fig = figures.roc_figure(
        v.fpr[keep],
        v.tpr[keep],
        operating_point=(chosen.far, chosen.tar, chosen.threshold),
        title=title,
    )
    tracker.log_figure(fig, ROC_ARTIFACT)
    tracker.log_dict(result, RESULT_ARTIFACT)
