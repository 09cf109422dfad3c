"""Train the face-embedding network on a person-folder dataset.

The loop is plain PyTorch over facetag.layers: forward, our cross-entropy, our backward,
an optimiser step. Around it: per-layer gradient health, a NaN/inf guard naming the layer,
an atomic checkpoint every epoch (``--resume`` continues bit-exactly on CPU), MLflow
tracking through ``facetag.training.tracking`` (rank 0 only under torchrun), and the
final model file that evaluation, enrolment and tagging load.

Determinism: every epoch re-seeds torch from (seed, epoch) and shuffles with a generator
seeded the same way, so a resumed run replays exactly the epochs it missed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from facetag import __version__, layers
from facetag.checkpoint import load_checkpoint, save_checkpoint
from facetag.config import Config, config_to_dict, flatten
from facetag.data.folders import FaceDataset, FaceFolder, Split, content_hash, scan_folder, split
from facetag.data.transforms import AugmentConfig
from facetag.device import keep_freed_memory, resolve_device
from facetag.errors import ConfigError, DataError, TrainingError
from facetag.models.embedder import EmbeddingNet, FaceClassifier, training_layout
from facetag.models.io import EMBEDDER_FORMAT as MODEL_FORMAT
from facetag.models.io import load_embedder, read_embedder_state, weights_id
from facetag.models.resnet import ARCHITECTURE as DLIB_RESNET
from facetag.models.resnet import DlibResNet
from facetag.progress import Progress, ProgressFn
from facetag.training.core import (
    StepContext,
    TrackedRun,
    check_loss,
    end_epoch,
    optimizer_step,
    param_groups,
    runs_dir,
)
from facetag.training.health import GradientHealth


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_s: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        """The epoch's MLflow metrics."""
        return {
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "lr": self.lr,
            "images_per_s": self.images_per_s,
            "epoch_seconds": self.seconds,
        }


@dataclass
class TrainResult:
    run_id: str | None
    test_accuracy: float
    epochs: int
    seconds: float
    device: str
    people: tuple[str, ...]
    history: list[EpochStats] = field(default_factory=list)
    model_path: Path | None = None


def build_classifier(config: Config, num_classes: int, in_channels: int) -> FaceClassifier:
    m = config.model
    if m.architecture == "dlib-resnet":
        return FaceClassifier(
            init_network(config.train.init),
            num_classes,
            m.head,
            arcface_scale=m.arcface_scale,
            arcface_margin=m.arcface_margin,
        )
    embedder = EmbeddingNet(
        in_channels,
        m.widths,
        m.embedding_dim,
        m.activation,
        dropout=m.dropout,
        pool=m.pool,
        image_size=config.data.image_size,
        flip_average=m.flip_average,
    )
    if config.train.init:  # continue from a model file of the same shape
        embedder.load_state_dict(read_embedder_state(config.train.init)["embedder"])
    return FaceClassifier(
        embedder,
        num_classes,
        m.head,
        arcface_scale=m.arcface_scale,
        arcface_margin=m.arcface_margin,
    )


def freeze(model: FaceClassifier, trainable: str) -> None:
    """[train] trainable: "all" trains everything; "head" only the embedder's last linear
    layer (its ``fc``, and the embedding-net's ``bn`` after it: the embedding) and the
    classifier. Frozen parameters get no gradient, so backpropagation stops at that layer:
    no backward through the body."""
    if trainable == "all":
        return
    if trainable != "head":
        raise ConfigError(f"[train] trainable: expected 'all' or 'head', got {trainable!r}")
    fc = getattr(model.embedder, "fc", None)
    if not isinstance(fc, nn.Module):
        raise ConfigError(
            f"[train] trainable = 'head': expected an embedder with a last linear layer fc, "
            f"got {type(model.embedder).__name__}; use 'all'"
        )
    for p in model.embedder.parameters():
        p.requires_grad_(False)
    bn = getattr(model.embedder, "bn", None)
    for part in (fc, bn) if isinstance(bn, nn.Module) else (fc,):
        for p in part.parameters():
            p.requires_grad_(True)


def init_network(path: str) -> DlibResNet:
    """The trainable (unfolded) dlib-resnet of model file ``path`` ([train] init)."""
    state = read_embedder_state(path)
    if state.get("architecture") != DLIB_RESNET:
        raise ConfigError(
            f"{path}: expected a dlib-resnet model file to fine-tune, got "
            f"{state.get('architecture', 'an embedding-net')}; facetag import dlib writes one"
        )
    net = DlibResNet()
    net.load_state_dict({k: v.float() for k, v in state["embedder"].items()})
    return net


def augment_config(config: Config) -> AugmentConfig:
    d = config.data
    return AugmentConfig(
        flip=0.5 if d.flip else 0.0,
        degrees=d.affine_degrees,
        translate=d.translate,
        scale=d.scale,
        brightness=d.brightness,
        contrast=d.contrast,
        saturation=d.saturation,
        grey=d.grey,
        lowres=d.lowres,
        blur=d.blur,
    )


def _channels(config: Config, folder: FaceFolder) -> int:
    if config.data.channels in (1, 3):
        return config.data.channels
    from facetag.data.images import load_image

    first = load_image(folder.images[0][0], None)
    return 1 if first.mode == "L" else 3


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = config.train
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.momentum, 0.999))
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True)
    raise ValueError(f"optimizer: expected adamw or sgd, got {t.optimizer!r}")


def _make_scheduler(
    config: Config, opt: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    t = config.train
    if t.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=t.lr,
            total_steps=max(total_steps, 1),
            pct_start=t.warmup_fraction,
            cycle_momentum=True,
            base_momentum=0.85,
            max_momentum=0.95,
        )
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if t.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"schedule: expected onecycle, cosine or constant, got {t.schedule!r}")


@torch.no_grad()
def evaluate_classifier(
    model: FaceClassifier, data: FaceDataset, device: str, batch_size: int = 256
) -> tuple[float, float, Tensor]:
    """(mean loss, accuracy, predictions (N,)) of the closed-set classifier on ``data``."""
    model.eval()
    total_loss, correct, preds = 0.0, 0, []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (N, P); no labels: no margin, the plain scaled cosines
        total_loss += float(layers.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(dim=1)
        correct += int((pred == y).sum())
        preds.append(pred.cpu())
    n = len(data)
    return total_loss / n, correct / n, torch.cat(preds)


def model_file_state(
    model: FaceClassifier,
    config: Config,
    people: tuple[str, ...],
    in_channels: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The self-describing model file: what evaluate, enroll and tag load.

    ``model_id`` fingerprints the embedder's weights: galleries and tagging manifests
    record it, so embeddings of two different models are never compared.
    """
    weights = model.embedder.state_dict()
    arch: dict[str, Any] = {}
    if config.model.architecture == "dlib-resnet":
        init = read_embedder_state(config.train.init)
        arch = {
            "architecture": DLIB_RESNET,
            "embedding_dim": model.embedder.embedding_dim,
            "provenance": {**init.get("provenance", {}), "fine_tuned_from": init["model_id"]},
        }
    return {
        "model_id": weights_id(weights),
        "format": MODEL_FORMAT,
        **arch,
        "facetag_version": __version__,
        "config": config_to_dict(config),
        "people": list(people),
        "in_channels": in_channels,
        "image_size": list(config.data.image_size),
        "embedder": weights,
        "classifier": model.head.state_dict(),
        **(extra or {}),
    }


@dataclass
class Trained:
    """Everything the caller needs after the loop: to log, evaluate and save the model."""

    result: TrainResult
    model: FaceClassifier
    config: Config
    test_set: FaceDataset
    predictions: Tensor
    data_hash: str
    in_channels: int
    rank: int = 0  # under torchrun, only rank 0 reports


@dataclass
class _Epochs:
    """What each epoch of one training run needs (the context of ``_train_epoch``)."""

    net: nn.Module  # the model, wrapped for DistributedDataParallel under torchrun
    model: FaceClassifier
    train_set: FaceDataset
    test_set: FaceDataset
    ctx: StepContext
    config: Config
    device: str
    dist: Any  # facetag.training.distributed.DistContext
    progress: ProgressFn | None
    teacher: nn.Module | None = None  # frozen init network, with [train] distill_weight


def _teacher(config: Config, device: str) -> nn.Module | None:
    """The frozen network distillation pulls towards: [train] init as it was, eval mode."""
    if config.train.distill_weight <= 0 or not config.train.init:
        return None
    net = load_embedder(config.train.init, device).net
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@dataclass
class _Data:
    split: Split
    train_set: FaceDataset
    test_set: FaceDataset
    in_channels: int
    data_hash: str  # content hash of the dataset folder
    images: int  # in the folder


def _prepare(config: Config) -> tuple[Config, _Data]:
    """The config with an absolute data path, and the split datasets."""
    if not config.data.path:
        raise DataError("train: no dataset given; pass --data PATH or set [data] path")
    # Absolute, so a model file can be evaluated from any working directory.
    config = replace(config, data=replace(config.data, path=str(Path(config.data.path).resolve())))
    folder = scan_folder(config.data.path)
    sp = split(folder, config.data.split, config.train.seed)
    in_channels = _channels(config, folder)
    size = (int(config.data.image_size[0]), int(config.data.image_size[1]))
    train_set = FaceDataset(
        sp.train, sp.people, size=size, channels=in_channels, augment=augment_config(config)
    )
    test_set = FaceDataset(sp.test, sp.people, size=size, channels=in_channels)
    data = _Data(sp, train_set, test_set, in_channels, content_hash(folder), folder.num_images)
    return config, data


def _run_params(config: Config, d: _Data, model: nn.Module, **more: object) -> dict[str, object]:
    return {
        **flatten(config),
        "data.resolved_path": str(Path(config.data.path).resolve()),
        "data.content_hash": d.data_hash,
        "data.people": len(d.split.people),
        "data.images": d.images,
        "data.train_images": len(d.split.train),
        "data.test_images": len(d.split.test),
        "data.in_channels": d.in_channels,
        **more,
        "facetag_version": __version__,
        "torch_version": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def train(
    config: Config,
    *,
    resume: str | None = None,
    progress: ProgressFn | None = None,
    hooks: TrackedRun | None = None,
) -> Trained:
    """Train ``config`` (resolved), or continue the run ``resume``; see the module doc.

    ``hooks`` (rank 0 only) records the run in MLflow; None trains untracked.
    """
    from facetag.training.distributed import DistContext

    dist = DistContext.from_env()
    device = resolve_device(config.train.device)
    if dist.active:
        device = dist.device(device)
    if device == "cpu":
        keep_freed_memory()  # each step reuses the last one's memory (no fresh pages)
    config, d = _prepare(config)
    sp, train_set, test_set, in_channels = d.split, d.train_set, d.test_set, d.in_channels
    _seed_everything(config.train.seed)
    model = build_classifier(config, len(sp.people), in_channels).to(device)
    if config.model.architecture != "dlib-resnet":
        model = training_layout(model, device)  # type: ignore[assignment]  # the same model
    freeze(model, config.train.trainable)
    opt = _make_optimizer(config, model)
    steps_per_epoch = math.ceil(len(train_set) / (config.train.batch_size * dist.world_size))
    sched = _make_scheduler(config, opt, steps_per_epoch * config.train.epochs)
    experiment = config.data.name or Path(config.data.path).resolve().name
    ctx = StepContext(
        opt,
        sched,
        GradientHealth(model, config.train.health_every),
        "",
        "lower --lr or set [train] grad_clip",
        model,
        config.train.grad_clip,
    )
    start_epoch, history, run_id = _open_run(
        config, d, model, ctx, resume, hooks, experiment, device, dist
    )
    run_id = dist.broadcast_str(run_id)
    run_dir = runs_dir() / (run_id or "local")
    epochs = _Epochs(
        dist.wrap(model),
        model,
        train_set,
        test_set,
        ctx,
        config,
        device,
        dist,
        progress,
        _teacher(config, device),
    )
    try:
        for epoch in range(start_epoch, config.train.epochs + 1):
            stats = _train_epoch(epochs, epoch)
            history.append(stats)
            if dist.is_main:
                end_epoch(
                    hooks,
                    stats.metrics(),
                    run_dir,
                    weights={"model": model.state_dict()},
                    ctx=ctx,
                    epoch=epoch,
                    history=history,
                    config=config_to_dict(config),
                    run_id=run_id,
                )
    except TrainingError as e:
        if dist.is_main and hooks is not None:
            hooks.failed(str(e))
        dist.close()
        raise
    except KeyboardInterrupt:
        if dist.is_main and hooks is not None:
            hooks.failed(f"interrupted; continue with --resume {run_id}", interrupted=True)
        raise
    return _finish(config, d, model, history, run_id, run_dir, device, dist)


def _finish(
    config: Config,
    d: _Data,
    model: FaceClassifier,
    history: list[EpochStats],
    run_id: str | None,
    run_dir: Path,
    device: str,
    dist: Any,  # facetag.training.distributed.DistContext
) -> Trained:
    """The trained run: its result, the test-set predictions and (rank 0) the model file."""
    sp, test_set, in_channels = d.split, d.test_set, d.in_channels
    result = TrainResult(
        run_id=run_id,
        test_accuracy=history[-1].val_accuracy,
        epochs=config.train.epochs,
        seconds=sum(h.seconds for h in history),
        device=device,
        people=sp.people,
        history=history,
    )
    _, _, preds = evaluate_classifier(model, test_set, device)
    if dist.is_main:
        state = model_file_state(model, config, sp.people, in_channels, {"run_id": run_id or ""})
        result.model_path = save_checkpoint(run_dir / "model.pt", state)
    dist.close()
    return Trained(result, model, config, test_set, preds, d.data_hash, in_channels, dist.rank)


def _open_run(
    config: Config,
    d: _Data,
    model: nn.Module,
    ctx: StepContext,
    resume: str | None,
    hooks: TrackedRun | None,
    experiment: str,
    device: str,
    dist: Any,
) -> tuple[int, list[EpochStats], str | None]:
    """(first epoch to train, the epochs so far, run id): a resumed run's checkpoint put
    back into model and optimiser, or a new MLflow run started (rank 0)."""
    if resume is not None:
        state = load_checkpoint(runs_dir() / resume / "checkpoint.pt")
        model.load_state_dict(state["model"])
        ctx.opt.load_state_dict(state["optimizer"])
        ctx.sched.load_state_dict(state["scheduler"])
        if dist.is_main and hooks is not None:
            hooks.resume(resume, experiment)
        return int(state["epoch"]) + 1, [EpochStats(**h) for h in state["history"]], resume
    run_id = None
    if dist.is_main and hooks is not None:
        params = _run_params(config, d, model, device_used=device, world_size=dist.world_size)
        run_id = hooks.start(experiment, params)
    return 1, [], run_id


def _train_epoch(e: _Epochs, epoch: int) -> EpochStats:
    config, dist, ctx = e.config, e.dist, e.ctx
    ctx.where = f"epoch {epoch}"
    seed = _epoch_seed(config.train.seed, epoch)
    torch.manual_seed(seed)  # augmentation and dropout draw from the global RNG
    loader = dist.loader(e.train_set, config.train.batch_size, seed, config.train.num_workers)
    e.net.train()
    ctx.health.reset()
    t0 = time.perf_counter()
    seen, loss_sum, correct = 0, 0.0, 0
    batches = len(loader)
    lr = ctx.opt.param_groups[0]["lr"]
    for i, (x, y) in enumerate(loader, start=1):
        x, y = x.to(e.device, non_blocking=True), y.to(e.device, non_blocking=True)
        ctx.opt.zero_grad(set_to_none=True)
        if e.teacher is None:
            logits = e.net(x, y)  # (N, P)
            loss = layers.cross_entropy(logits, y, label_smoothing=config.train.label_smoothing)
            check_loss(ctx, i, loss)
            loss.backward()
        else:
            logits, z = e.net(x, y, with_embedding=True)  # (N, P), (N, D)
            loss = layers.cross_entropy(logits, y, label_smoothing=config.train.label_smoothing)
            distill = _distillation(e.teacher, x, z)
            check_loss(ctx, i, loss, distill)
            # Each root with its weight as its incoming gradient: no sum node in the graph.
            w = config.train.distill_weight / x.shape[0]
            torch.autograd.backward([loss, distill], [torch.ones_like(loss), loss.new_tensor(w)])
        lr = optimizer_step(ctx, i)
        n = y.shape[0]
        seen += n
        loss_sum += float(loss.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
        if e.progress is not None and dist.is_main:
            rate = seen * dist.world_size / max(time.perf_counter() - t0, 1e-9)
            figures = {"loss": loss_sum / seen, "acc": correct / seen, "img/s": rate}
            e.progress(Progress(_epoch_task(epoch, config), i, batches, figures, epoch=epoch))
    train_seconds = time.perf_counter() - t0
    val_loss, val_acc, _ = evaluate_classifier(e.model, e.test_set, e.device)
    stats = EpochStats(
        epoch=epoch,
        train_loss=loss_sum / max(seen, 1),
        train_accuracy=correct / max(seen, 1),
        val_loss=val_loss,
        val_accuracy=val_acc,
        lr=lr,
        images_per_s=seen * dist.world_size / max(train_seconds, 1e-9),
        seconds=time.perf_counter() - t0,
    )
    if e.progress is not None and dist.is_main:
        figures = {"loss": stats.train_loss, "acc": stats.train_accuracy}
        figures["img/s"] = stats.images_per_s
        summary = f"val loss {stats.val_loss:.4f} acc {stats.val_accuracy:.4f}"
        e.progress(Progress(_epoch_task(epoch, config), batches, batches, figures, summary, epoch))
    return stats


def _distillation(teacher: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """Sum over the batch of smooth L1 (beta 1: half the squared error, the embeddings
    being unit vectors) between the student's embeddings z (N, D) and the frozen
    teacher's on the same images x (N, C, H, W) in [-1, 1]."""
    with torch.no_grad():
        chips = (x + 1.0) * 127.5 if getattr(teacher, "takes_pixels", False) else x
        target: Tensor = teacher.embed(chips)  # type: ignore[operator]  # (N, D)
    return layers.smooth_l1_loss(z, target, beta=1.0, reduction="sum")


def _epoch_task(epoch: int, config: Config) -> str:
    return f"epoch {epoch:>3}/{config.train.epochs}"
