"""facetag's layers against their torch.nn twins, side by side (``facetag bench``).

The same network is built twice from one definition (facetag.models.embedder), once from
facetag.layers and once from torch.nn, with identical weights. Steps are timed
interleaved (ours, torch, ours, torch, ...) after a warm-up, so slow drifts of a noisy
machine hit both alike, and medians are reported. Peak memory is measured in a fresh
subprocess per network: on CPU as the growth of the peak resident set over the
baseline after the model and batch exist; on CUDA with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from facetag import layers
from facetag.bench.memory import current_rss_mb, peak_rss_mb
from facetag.models.embedder import OURS, EmbeddingNet, FaceClassifier, Ops


@dataclass(frozen=True)
class BenchSpec:
    """The benchmark network and workload (defaults: the issue's recognition-sized CNN)."""

    mode: str = "train"  # "train" or "infer"
    batch_size: int = 64
    image_size: int = 96
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128, 256)
    embedding_dim: int = 128
    num_classes: int = 100
    activation: str = "prelu"
    channels_last: bool = False
    warmup: int = 3
    steps: int = 10
    device: str = "cpu"
    fold_bn: bool = True  # infer only: fold BatchNorm into the convs of our net


def _twin_bn_act(F_: int, activation: str = "prelu") -> nn.Module:
    act: nn.Module = nn.PReLU(F_) if activation == "prelu" else nn.ReLU()
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(F_), act=act))


class _TwinGlobalAvgPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, C)


TWIN = Ops(
    Conv2d=nn.Conv2d,
    BatchNormAct2d=_twin_bn_act,
    MaxPool2d=nn.MaxPool2d,
    GlobalAvgPool2d=_TwinGlobalAvgPool,
    Flatten=nn.Flatten,
    Linear=nn.Linear,
    BatchNorm1d=nn.BatchNorm1d,
    Dropout=nn.Dropout,
)


def build_pair(spec: BenchSpec) -> tuple[nn.Module, nn.Module]:
    """Our classifier and its torch.nn twin, with identical weights."""

    def build(ops: Ops) -> nn.Module:
        embedder = EmbeddingNet(
            spec.in_channels, spec.widths, spec.embedding_dim, spec.activation, ops=ops
        )
        return FaceClassifier(embedder, spec.num_classes, head="softmax", ops=ops)

    torch.manual_seed(0)
    ours = build(OURS)
    twin = build(TWIN)
    twin.load_state_dict(ours.state_dict())
    return ours, twin


def _prepare(model: nn.Module, spec: BenchSpec) -> nn.Module:
    model = model.to(spec.device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _batch(spec: BenchSpec) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(
        spec.batch_size, spec.in_channels, spec.image_size, spec.image_size, generator=g
    )
    y = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(spec.device), y.to(spec.device)


def _step_fn(model: nn.Module, spec: BenchSpec, ours: bool) -> Callable[[Tensor, Tensor], None]:
    """One training step (forward, loss, backward, SGD step) or one inference batch."""
    if spec.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = layers.cross_entropy if ours else F.cross_entropy

        def train_step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

        return train_step
    if spec.mode == "infer":
        model.eval()
        if ours and spec.fold_bn:
            from facetag.models.fold import fold_batchnorm

            model = fold_batchnorm(model)

        def infer_step(x: Tensor, y: Tensor) -> None:
            with torch.inference_mode():
                model(x)

        return infer_step
    raise ValueError(f"bench: expected mode 'train' or 'infer', got {spec.mode!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(spec: BenchSpec) -> dict[str, float]:
    """Median ms per step of ours and of the twin, interleaved A B A B."""
    ours, twin = build_pair(spec)
    ours, twin = _prepare(ours, spec), _prepare(twin, spec)
    x, y = _batch(spec)
    steps = {"ours": _step_fn(ours, spec, True), "torch": _step_fn(twin, spec, False)}
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for _ in range(spec.warmup):
        for fn in steps.values():
            fn(x, y)
    for _ in range(spec.steps):
        for name, fn in steps.items():
            _sync(spec.device)
            t0 = time.perf_counter()
            fn(x, y)
            _sync(spec.device)
            times[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def memory_probe(spec: BenchSpec, which: str) -> float:
    """Peak memory (MiB) a few steps of one network add over its baseline.

    Runs in the current process: call it in a fresh subprocess (``peak_memory``).
    """
    ours, twin = build_pair(spec)
    model = _prepare(ours if which == "ours" else twin, spec)
    del ours, twin  # only the measured network stays alive
    x, y = _batch(spec)
    step = _step_fn(model, spec, which == "ours")
    if spec.device.startswith("cuda"):
        torch.cuda.synchronize()
        base_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(x, y)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
    base = current_rss_mb()
    for _ in range(3):
        step(x, y)
    return peak_rss_mb() - base


def peak_memory(spec: BenchSpec) -> dict[str, float]:
    """Peak MiB for ours and the twin, each in a fresh Python process."""
    out = {}
    for which in ("ours", "torch"):
        code = (
            "import json,sys; from facetag.bench.layers import BenchSpec, memory_probe; "
            "d=json.loads(sys.argv[1]); d['widths']=tuple(d['widths']); "
            f"print(memory_probe(BenchSpec(**d), {which!r}))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(asdict(spec))],
            capture_output=True,
            text=True,
            check=True,
        )
        out[which] = float(proc.stdout.strip().splitlines()[-1])
    return out


def profile_pair(spec: BenchSpec, rows: int = 15) -> dict[str, str]:
    """Per-op breakdown (torch.profiler, self CPU/CUDA time) for a few steps of each net."""
    from torch.profiler import ProfilerActivity, profile

    ours, twin = build_pair(spec)
    x, y = _batch(spec)
    tables = {}
    for name, model in (("ours", ours), ("torch", twin)):
        model = _prepare(model, spec)
        step = _step_fn(model, spec, name == "ours")
        for _ in range(2):
            step(x, y)
        activities = [ProfilerActivity.CPU]
        if spec.device.startswith("cuda"):
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(3):
                step(x, y)
            _sync(spec.device)
        sort = "self_cuda_time_total" if spec.device.startswith("cuda") else "self_cpu_time_total"
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=rows)
    return tables


def run_bench(spec: BenchSpec, memory: bool = True) -> dict[str, object]:
    """Time (and measure memory of) ours vs the torch twin; the dict ``--json`` prints."""
    ms = time_pair(spec)
    result: dict[str, object] = {
        "mode": spec.mode,
        "device": spec.device,
        "device_name": (
            torch.cuda.get_device_name(spec.device)
            if spec.device.startswith("cuda")
            else f"cpu ({torch.get_num_threads()} threads)"
        ),
        "batch_size": spec.batch_size,
        "image_size": spec.image_size,
        "widths": list(spec.widths),
        "channels_last": spec.channels_last,
        "steps": spec.steps,
        "ours_ms": round(ms["ours"], 2),
        "torch_ms": round(ms["torch"], 2),
        "ratio": round(ms["ours"] / ms["torch"], 3),
        "ours_images_per_s": round(spec.batch_size / ms["ours"] * 1000.0, 1),
        "torch_images_per_s": round(spec.batch_size / ms["torch"] * 1000.0, 1),
        "torch_version": torch.__version__,
    }
    if memory:
        mem = peak_memory(spec)
        result.update(
            ours_peak_mb=round(mem["ours"], 1),
            torch_peak_mb=round(mem["torch"], 1),
            memory_ratio=round(mem["ours"] / mem["torch"], 3) if mem["torch"] > 0 else None,
        )
    return result
