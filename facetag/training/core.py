"""What every facetag training loop shares (the embedder's loop.py, the detector's
detector_train.py, and later ones): where runs live, resuming a run's config, optimiser
parameter groups, the guarded optimiser step, run checkpoints and the MLflow run.

    ctx = StepContext(opt, sched, health, where="epoch 3", hint="lower --lr")
    check_loss(ctx, batch, loss)      # TrainingError naming the epoch and batch on NaN/inf
    loss.backward()
    lr = optimizer_step(ctx, batch)   # gradient guard naming the layer, health, step, schedule
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from facetag.checkpoint import load_checkpoint, save_checkpoint
from facetag.config import Schema, read_toml
from facetag.errors import ConfigError, TrainingError
from facetag.training.health import GradientHealth

C = TypeVar("C")


def runs_dir() -> Path:
    """Where checkpoints live: $FACETAG_RUNS_DIR or experiments/runs."""
    return Path(os.environ.get("FACETAG_RUNS_DIR", "experiments/runs"))


CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"  # the latest epoch's, in the MLflow run


def run_checkpoint(resume: str, command: str) -> Path:
    """The checkpoint of run ``resume``; ConfigError (one line) when there is none."""
    ckpt = runs_dir() / resume / "checkpoint.pt"
    if not ckpt.is_file():
        # A teammate's run, or a machine that lost its runs folder: each epoch's checkpoint
        # is also in the run's MLflow artifacts.
        from facetag.training.tracking import download_checkpoint

        if not download_checkpoint(resume, CHECKPOINT_ARTIFACT, ckpt):
            raise ConfigError(
                f"--resume {resume}: expected a checkpoint at {ckpt} or in the run's MLflow "
                f"artifacts, got none; check the run id ({command} prints it), "
                f"FACETAG_RUNS_DIR and MLFLOW_TRACKING_URI"
            )
    return ckpt


def resolve_config(
    schema: Schema[C],
    config_path: Path | None,
    overrides: Mapping[str, object],
    resume: str | None,
    *,
    allowed: tuple[str, ...],
    command: str,
) -> C:
    """defaults < TOML < flags; a resumed run takes the config stored in its checkpoint,
    changed only by the flags in ``allowed`` (--epochs to extend it, --device to move it).

    A run started by an older facetag stores fewer settings than this one has: resumed
    with --config, it takes the settings it lacks from that TOML, which must agree with
    every setting it stored (so a newer phase, such as the detector's landmark epochs,
    can finish a run without starting it again)."""
    if resume is None:
        return schema.load(config_path, overrides)
    ckpt = run_checkpoint(resume, command)
    changed = sorted(k for k, v in overrides.items() if k not in allowed and v is not None)
    flags = " or ".join(f"--{k}" for k in allowed)
    if changed:
        what = ", ".join(f"--{k.replace('_', '-')}" for k in changed)
        raise ConfigError(
            f"--resume {resume}: {what} cannot change a run that has started; resume "
            f"with only --resume (and optionally {flags})"
        )
    raw: dict[str, dict[str, Any]] = load_checkpoint(ckpt)["config"]
    if config_path is not None:
        toml = schema.to_dict(schema.load(config_path))
        written = read_toml(config_path)  # the settings the file itself sets
        for section, values in toml.items():
            for key, value in values.items():
                if key not in written.get(section, {}) or key not in raw.get(section, {}):
                    continue
                if raw[section][key] != value:
                    raise ConfigError(
                        f"--resume {resume}: --config {config_path} sets {section}.{key} to "
                        f"{value!r}, the run has {raw[section][key]!r}; a run that has started "
                        f"cannot change: resume with only --resume (and optionally {flags})"
                    )
        raw = {s: {**toml.get(s, {}), **raw.get(s, {})} for s in {*toml, *raw}}
    stored = schema.from_dict(raw, source=str(ckpt))
    kept = {k: v for k, v in overrides.items() if k in allowed}
    return schema.with_flags(stored, kept, f"--resume {resume}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only: decaying a batch-norm scale, a
    PReLU slope or a bias towards 0 fights the normalisation instead of regularising."""
    trained = [p for p in model.parameters() if p.requires_grad]  # frozen ones left out
    return [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},
    ]


@dataclass
class StepContext:
    """The optimiser side of one epoch of a loop, and how its errors are worded."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    health: GradientHealth
    where: str  # "epoch 3", "epoch 3 (pnet)": starts every error message
    hint: str  # the fix an error message ends with
    model: nn.Module | None = None  # with clip > 0: whose gradients are clipped
    clip: float = 0.0  # global gradient-norm limit, 0 = off


def check_loss(ctx: StepContext, batch: int, *losses: Tensor) -> None:
    """TrainingError when a loss is NaN or infinite (before backward wastes a step)."""
    for loss in losses:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"{ctx.where}: the loss became {value} at batch {batch}; {ctx.hint}"
            )


def optimizer_step(ctx: StepContext, batch: int) -> float:
    """After backward: stop on a non-finite gradient (naming the layer), record gradient
    health, clip, step the optimiser and the schedule. Returns the learning rate used."""
    bad = ctx.health.first_non_finite()
    if bad is not None:
        raise TrainingError(
            f"{ctx.where}: the gradient of layer '{bad}' became NaN or infinite at batch "
            f"{batch}; {ctx.hint}"
        )
    ctx.health.before_step(ctx.sched.last_epoch)  # the schedule counts steps, across resumes
    if ctx.clip > 0 and ctx.model is not None:
        clip_gradients(ctx.model, ctx.clip)
    lr = float(ctx.opt.param_groups[0]["lr"])
    ctx.opt.step()
    ctx.health.after_step()
    ctx.sched.step()
    return lr


@torch.no_grad()
def clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Scale all gradients so their global norm is at most ``max_norm`` (explicit formula)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)


def end_epoch(
    hooks: TrackedRun | None,
    metrics: Mapping[str, float],
    run_dir: Path,
    *,
    weights: Mapping[str, Any],
    ctx: StepContext,
    epoch: int,
    history: list[Any],
    config: dict[str, Any],
    run_id: str | None,
) -> None:
    """What both loops do after an epoch: its metrics and layer health to MLflow, the
    atomic run checkpoint ``--resume`` continues from, then the same checkpoint to the
    run's artifacts (so a teammate can resume it)."""
    if hooks is not None:
        hooks.epoch(metrics, epoch, ctx.health)
    save_checkpoint(
        run_dir / "checkpoint.pt",
        {
            **weights,  # the model's state under the loop's own key: "model", "cascade"
            "optimizer": ctx.opt.state_dict(),
            "scheduler": ctx.sched.state_dict(),
            "epoch": epoch,
            "history": [vars(h) for h in history],
            "config": config,
            "run_id": run_id or "",
        },
    )
    if hooks is not None:
        hooks.checkpoint(run_dir / "checkpoint.pt")


class TrackedRun:
    """A loop's MLflow run (facetag.training.tracking, imported only when tracking):
    params and the resolved config at the start, metrics and layer health per epoch, the
    end state on failure, and the registered model at the end."""

    def __init__(self, command: str, config_toml: str, parent: Any = None, name: str | None = None):
        self.command, self.config_toml = command, config_toml
        self.parent, self.run_name = parent, name  # parent: a Tracker (a sweep's child run)
        self.tracker: Any = None

    def start(self, experiment: str, params: Mapping[str, object]) -> str:
        from facetag.training.tracking import Tracker

        tags = {"command": self.command}
        if self.parent is not None:
            self.tracker = self.parent.child(run_name=self.run_name, tags=tags)
        else:
            self.tracker = Tracker.start(experiment, run_name=self.run_name, tags=tags)
        self.tracker.log_params(params)
        self.tracker.log_text(self.config_toml, "config.toml")
        return str(self.tracker.run_id)

    def resume(self, run_id: str, experiment: str) -> None:
        from facetag.training.tracking import Tracker

        self.tracker = Tracker.resume(run_id, experiment=experiment)

    def epoch(self, metrics: Mapping[str, float], epoch: int, health: GradientHealth) -> None:
        """The epoch's metrics (at step ``epoch``), its sampled steps' layer health (at their
        optimiser steps) and the health figure by depth."""
        from facetag.training.figures import gradient_health_figure

        self.tracker.log_metrics(dict(metrics), step=epoch)
        if health.samples:
            self.tracker.log_health_samples(health.samples)
            figure = gradient_health_figure(health.samples, f"epoch {epoch}")
            name = f"{health.prefix or 'model.'}epoch_{epoch:03d}.png"
            self.tracker.log_figure(figure, f"figures/gradient_health/{name}")

    def checkpoint(self, path: Path) -> None:
        """Copy the epoch's checkpoint into the run (CHECKPOINT_ARTIFACT), replacing the last:
        ``--resume`` on another machine continues from it."""
        self.tracker.log_file(path, CHECKPOINT_ARTIFACT.rsplit("/", 1)[0])

    def failed(self, message: str, interrupted: bool = False) -> None:
        if self.tracker is not None and not self.tracker.ended:
            self.tracker.end("KILLED" if interrupted else "FAILED", message)

    def register(self, model: nn.Module, **log_model: Any) -> dict[str, Any]:
        """Log ``model`` (tracking.Tracker.log_model's arguments), tag the run with the
        registered version, end it FINISHED; the registration for ``--json``."""
        registration = self.tracker.log_model(model, **log_model)
        self.tracker.set_tags(
            {"registered_version": registration.version, "champion": registration.champion}
        )
        self.tracker.end()
        return {
            "registered_model": registration.name,
            "version": registration.version,
            "champion": registration.champion,
            "champion_reason": registration.reason,
        }
