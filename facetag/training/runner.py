"""``facetag train``: resolve the config, run the loop, record everything in MLflow.

The loop (facetag.training.loop) knows nothing of MLflow; a ``TrackedRun`` (training.core)
turns its reports into a tracked run, and ``finish`` logs the figures, tables and the registered
model once training ends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from facetag.checkpoint import copy_checkpoint
from facetag.config import EMBEDDER, Config, config_to_toml, load_config
from facetag.progress import ProgressFn
from facetag.training import core, figures
from facetag.training.core import TrackedRun
from facetag.training.loop import Trained, train

REGISTERED_EMBEDDER = "facetag-embedder"


def resolve_config(
    config_path: Path | None, overrides: Mapping[str, object], resume: str | None
) -> Config:
    """defaults < TOML < flags; a resumed run keeps its stored config (--epochs extends it,
    --device moves it)."""
    return core.resolve_config(
        EMBEDDER,
        config_path,
        overrides,
        resume,
        allowed=("epochs", "device"),
        command="facetag train",
    )


def tracked_run(config: Config, parent: Any = None, run_name: str | None = None) -> TrackedRun:
    """The MLflow run of one ``facetag train`` (a sweep's child when ``parent`` is given)."""
    return TrackedRun("facetag train", config_to_toml(config), parent, run_name)


def validation_key(trained: Trained) -> str:
    """Identifies 'the same validation data': dataset content, split and seed."""
    c = trained.config
    text = f"{trained.data_hash}|{c.data.split}|{c.train.seed}|{c.data.image_size}"
    return hashlib.sha256(text.encode()).hexdigest()


def finish(hooks: TrackedRun, trained: Trained) -> dict[str, Any]:
    """Log figures, tables and the model; register it; end the run FINISHED."""
    tracker = hooks.tracker
    r = trained.result
    people = list(r.people)
    true = trained.test_set.labels
    pred = trained.predictions
    cm = figures.confusion_matrix(true, pred, len(people))
    tracker.log_figure(figures.confusion_matrix_figure(cm, people), "confusion_matrix.png")
    history = [
        {
            "train_loss": h.train_loss,
            "val_loss": h.val_loss,
            "train_acc": h.train_accuracy,
            "val_acc": h.val_accuracy,
        }
        for h in r.history
    ]
    tracker.log_figure(figures.curves_figure(history), "curves.png")
    wrong = (pred != true).nonzero().flatten()
    if wrong.numel():
        grid = figures.misclassified_grid(
            trained.test_set.images[wrong],
            [people[int(true[i])] for i in wrong],
            [people[int(pred[i])] for i in wrong],
        )
        tracker.log_figure(grid, "misclassified.png")
    tracker.log_text(figures.per_person_accuracy_csv(true, pred, people), "per_person.csv")
    tracker.log_metrics({"test_accuracy": r.test_accuracy, "train_seconds": r.seconds}, r.epochs)
    example = trained.test_set.images[:2].float() / 127.5 - 1.0  # (2, C, H, W)
    return hooks.register(
        trained.model.embedder.cpu().eval(),
        name="embedder",
        input_example=example,
        registered_name=REGISTERED_EMBEDDER,
        metric_name="test_accuracy",
        metric_value=r.test_accuracy,
        data_hash=validation_key(trained),
        checkpoint=r.model_path,
    )


def run_training(
    config_path: Path | None,
    overrides: Mapping[str, object],
    *,
    resume: str | None = None,
    progress: ProgressFn | None = None,
    track: bool = True,
    out_path: Path | None = None,
) -> dict[str, Any]:
    """Train from a config file + flags (or resume a run); the dict ``--json`` prints.

    ``out_path``: also copy the finished model file there (rank 0).
    """
    config = resolve_config(config_path, overrides, resume)
    hooks = tracked_run(config) if track else None
    trained = train(config, resume=resume, progress=progress, hooks=hooks)
    r = trained.result
    out: dict[str, Any] = {
        "run_id": r.run_id,
        "test_accuracy": r.test_accuracy,
        "epochs": r.epochs,
        "seconds": round(r.seconds, 2),
        "device": r.device,
        "people": len(r.people),
        "model_path": str(r.model_path) if r.model_path else None,
        "torch_threads": torch.get_num_threads(),
        "rank": trained.rank,
    }
    if hooks is not None and hooks.tracker is not None:
        out.update(finish(hooks, trained))
    if out_path is not None and trained.rank == 0 and r.model_path:
        out["out"] = str(copy_checkpoint(r.model_path, out_path))
    return out


def run_sweep(
    config_path: Path | None,
    overrides: Mapping[str, object],
    lrs: list[float],
    batch_sizes: list[int],
    *,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train every (lr, batch size) pair as a child run of one parent run.

    The parent records the grid and, at the end, the best child's parameters and
    accuracy, so the dashboard compares the children side by side.
    """
    from facetag.training.tracking import Tracker

    base = load_config(config_path, overrides)
    experiment = base.data.name or Path(base.data.path).resolve().name
    results: list[dict[str, Any]] = []
    with Tracker.start(experiment, run_name="sweep", tags={"command": "facetag sweep"}) as parent:
        parent.log_params(
            {
                "sweep.lr": ",".join(map(str, lrs)),
                "sweep.batch_size": ",".join(map(str, batch_sizes)),
            }
        )
        for lr in lrs:
            for bs in batch_sizes:
                config = load_config(config_path, {**overrides, "lr": lr, "batch_size": bs})
                hooks = tracked_run(config, parent=parent, run_name=f"lr={lr:g} bs={bs}")
                trained = train(config, progress=progress, hooks=hooks)
                registered = finish(hooks, trained)
                results.append(
                    {
                        "lr": lr,
                        "batch_size": bs,
                        "run_id": trained.result.run_id,
                        "test_accuracy": trained.result.test_accuracy,
                        **registered,
                    }
                )
        best = max(results, key=lambda r: r["test_accuracy"])
        parent.log_metrics({"best_test_accuracy": best["test_accuracy"]}, step=0)
        parent.set_tags(
            {
                "best_run_id": best["run_id"],
                "best_lr": best["lr"],
                "best_batch_size": best["batch_size"],
            }
        )
        return {"parent_run_id": parent.run_id, "runs": results, "best": best}
