"""facetag's layers against their torch.nn twins, eager and compiled (``facetag bench``).

The same network is built from one definition twice, from facetag.layers and from torch.nn,
with identical weights: the recognition CNN (facetag.models.embedder, its twin from the
``TWIN`` ops) or dlib's face ResNet (facetag.models.resnet, its twin in
facetag.bench.resnet_twin). A third copy of the twin runs under ``torch.compile`` (default
mode): what a PyTorch user who wants speed writes. Its compilation happens on its first
step, which is timed apart (``torch_compile_s``) and never counted as a step.

Steps are timed interleaved (ours, eager, compiled, ours, ...) after a warm-up, so slow
drifts of a noisy machine hit all alike, and medians are reported with the machine's load
average. ``load`` runs that many busy-looping processes beside the warm-up and the timed
steps (facetag.bench.load), so that the contended case is measured on purpose. Training
is timed as facetag's training commands run on a CPU, with freed memory kept for reuse
(facetag.device.keep_freed_memory), which this process's three networks all share.

Peak memory is measured in a fresh subprocess per network, after one warm-up step (which
compiles what compiles): on CPU the high-water mark of the resident set over the resident
set after that step, freed heap returned first, under glibc's default allocator (the
peaks comparable with earlier figures; keep_freed_memory's fragmentation is measured
apart in experiments/LOG.md); on CUDA torch.cuda.max_memory_allocated
over the memory allocated then.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from facetag import layers
from facetag.bench.load import MAX_LOAD, busy_load
from facetag.bench.memory import current_rss_mb, hwm_rss_mb, reset_peak_rss
from facetag.bench.resnet_twin import TwinDlibResNet
from facetag.device import keep_freed_memory
from facetag.models.embedder import OURS, EmbeddingNet, FaceClassifier, Ops, training_layout
from facetag.models.resnet import CHIP_SIZE, DlibResNet

MODES = ("train", "infer")
MODELS = ("cnn", "resnet")
NETS = ("ours", "torch", "compiled")
"""The networks a benchmark times: facetag.layers, the torch.nn twin, the twin compiled."""


@dataclass(frozen=True)
class BenchSpec:
    """The benchmark network and workload (defaults: the issue's recognition-sized CNN)."""

    mode: str = "train"  # "train" or "infer"
    model: str = "cnn"  # "cnn" (facetag.models.embedder) or "resnet" (dlib's, 150x150 chips)
    batch_size: int = 64
    image_size: int = 96  # the cnn's input; the resnet takes CHIP_SIZE chips
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128, 256)
    embedding_dim: int = 128
    num_classes: int = 100
    activation: str = "prelu"
    channels_last: bool = False  # both twins (and ours) in channels_last
    warmup: int = 3
    steps: int = 10
    device: str = "cpu"
    fold_bn: bool = True  # infer only: fold BatchNorm (the resnet: its affines) into our convs
    compiled: bool = True  # also time the twin under torch.compile
    threads: int = 0  # torch's intra-op threads (0: torch's default), here and in subprocesses

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"bench: expected mode in {MODES}, got {self.mode!r}")
        if self.model not in MODELS:
            raise ValueError(f"bench: expected model in {MODELS}, got {self.model!r}")
        if not (self.device == "cpu" or self.device.split(":")[0] == "cuda"):
            raise ValueError(f"bench: expected device 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("batch_size", "image_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench: expected {name} >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError(
                f"bench: expected warmup and threads >= 0, got {self.warmup} and {self.threads}"
            )

    @property
    def input_size(self) -> int:
        """H = W of the input batch."""
        return CHIP_SIZE if self.model == "resnet" else self.image_size

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


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
    """Our network and its torch.nn twin, with identical weights (on the CPU).

    cnn: the classifier (embedder + softmax head) in both modes. resnet: in training the
    classifier around DlibResNet (its [-1, 1] batch mapped to 0..255 chips), at inference
    DlibResNet alone (chips -> descriptors).
    """
    torch.manual_seed(0)
    if spec.model == "cnn":

        def build(ops: Ops) -> nn.Module:
            embedder = EmbeddingNet(
                spec.in_channels, spec.widths, spec.embedding_dim, spec.activation, ops=ops
            )
            return FaceClassifier(embedder, spec.num_classes, head="softmax", ops=ops)

        ours, twin = build(OURS), build(TWIN)
    else:
        ours, twin = DlibResNet(), TwinDlibResNet()
        if spec.mode == "train":
            ours = FaceClassifier(ours, spec.num_classes, head="softmax", ops=OURS)
            twin = FaceClassifier(twin, spec.num_classes, head="softmax", ops=TWIN)
    twin.load_state_dict(ours.state_dict())
    return ours, twin


def build_nets(spec: BenchSpec) -> dict[str, nn.Module]:
    """{"ours", "torch"[, "compiled"]}: the pair, and a copy of the twin to compile."""
    ours, twin = build_pair(spec)
    nets = {"ours": ours, "torch": twin}
    if spec.compiled:
        nets["compiled"] = copy.deepcopy(twin)
    return nets


def _to_device(module: nn.Module, spec: BenchSpec, which: str = "torch") -> nn.Module:
    """The network on the bench's device; ``spec.channels_last`` puts every network in
    channels_last, and our CNN trains in facetag's own layout (training_layout) whatever
    the twins use: the twins run as a PyTorch user writes them."""
    module = module.to(spec.device)
    if spec.channels_last:
        module = module.to(memory_format=torch.channels_last)
    elif which == "ours" and spec.mode == "train" and spec.model == "cnn":
        module = training_layout(module, spec.device)
    return module


def _place(t: Tensor, spec: BenchSpec) -> Tensor:
    return t.to(spec.device)


def _compile(model: nn.Module) -> nn.Module:
    """torch.compile in its default mode (inductor): the twin a user who wants speed runs."""
    from facetag.layers.compile import quiet_cpp_extension

    quiet_cpp_extension()  # no "No CUDA runtime is found" line in the figures on a CPU box
    return torch.compile(model)  # type: ignore[return-value]  # an OptimizedModule


def _batch(spec: BenchSpec) -> tuple[Tensor, Tensor]:
    """(x (N, C, H, W), labels (N,)): the cnn's normalised images, the resnet's chips
    (0..255 at inference; [-1, 1] for its classifier in training)."""
    g = torch.Generator().manual_seed(1)
    C = 3 if spec.model == "resnet" else spec.in_channels
    shape = (spec.batch_size, C, spec.input_size, spec.input_size)
    if spec.model == "resnet":
        x = torch.rand(shape, generator=g)
        x = x * 255.0 if spec.mode == "infer" else x * 2.0 - 1.0
    else:
        x = torch.randn(shape, generator=g)
    y = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return _place(x, spec), _place(y, spec)


def inference_copy(model: nn.Module, spec: BenchSpec) -> nn.Module:
    """Our network as facetag runs it at inference: eval mode, BatchNorm (the resnet's
    affines) folded into the convs and max pools before their activations when
    ``spec.fold_bn``, in channels_last (oneDNN's faster layout on the CPU; the resnet:
    load_embedder's form)."""
    model = model.eval()
    if not spec.fold_bn:
        return model
    if isinstance(model, DlibResNet):
        return model.folded(channels_last=True)
    from facetag.models.fold import fold_batchnorm

    return fold_batchnorm(model).to(memory_format=torch.channels_last)


def _step_fn(model: nn.Module, spec: BenchSpec, which: str) -> Callable[[Tensor, Tensor], None]:
    """One training step (forward, loss, backward, SGD step) or one inference batch of the
    network ``which`` ("ours", "torch" or "compiled"); "compiled" compiles on its first call."""
    if which not in NETS:
        raise ValueError(f"bench: expected a network in {NETS}, got {which!r}")
    if spec.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        run = _compile(model) if which == "compiled" else model
        loss_fn = layers.cross_entropy if which == "ours" else F.cross_entropy

        def train_step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(run(x), y)
            loss.backward()
            opt.step()

        return train_step
    if spec.mode == "infer":
        model = inference_copy(model, spec) if which == "ours" else model.eval()
        run = _compile(model) if which == "compiled" else model

        def infer_step(x: Tensor, y: Tensor) -> None:
            with torch.inference_mode():
                run(x)

        return infer_step
    raise ValueError(f"bench: expected mode in {MODES}, got {spec.mode!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def intra_op_threads(n: int) -> Iterator[int]:
    """torch's intra-op threads set to n (0: left as they are) for the block; yields the count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _load_average() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def _timed(fn: Callable[[Tensor, Tensor], None], x: Tensor, y: Tensor, device: str) -> float:
    """Wall ms of one call."""
    _sync(device)
    t0 = time.perf_counter()
    fn(x, y)
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0


def time_nets(spec: BenchSpec, load: int = 0) -> dict[str, float]:
    """Median ms per step of each network, interleaved, with ``load`` busy processes beside
    the warm-up and the timed steps; also "compile_s" (the compiled twin's first step less
    its median step) and the 1-minute load average at the start and end of the timing."""
    nets = build_nets(spec)
    x, y = _batch(spec)
    steps = {name: _step_fn(_to_device(m, spec, name), spec, name) for name, m in nets.items()}
    out: dict[str, float] = {}
    first_ms = _timed(steps["compiled"], x, y, spec.device) if "compiled" in steps else 0.0
    times: dict[str, list[float]] = {name: [] for name in steps}
    with busy_load(load):
        for _ in range(spec.warmup):
            for fn in steps.values():
                fn(x, y)
        out["loadavg_start"] = _load_average()
        for _ in range(spec.steps):
            for name, fn in steps.items():
                times[name].append(_timed(fn, x, y, spec.device))
        out["loadavg_end"] = _load_average()
    for name, t in times.items():
        out[name] = statistics.median(t)
    if "compiled" in steps:
        out["compile_s"] = max(0.0, first_ms - out["compiled"]) / 1000.0
    return out


def memory_probe(spec: BenchSpec, which: str) -> float:
    """Peak memory (MiB) that 3 steps of one network add once a warm-up step is done.

    Runs in the current process: call it in a fresh subprocess (``peak_memory``).
    """
    nets = build_nets(BenchSpec(**{**asdict(spec), "compiled": which == "compiled"}))
    model = _to_device(nets[which], spec, which)
    del nets  # only the measured network stays alive
    x, y = _batch(spec)
    step = _step_fn(model, spec, which)
    step(x, y)  # warm-up: compiles, creates the optimizer's buffers
    if spec.is_cuda:
        torch.cuda.synchronize()
        base_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(x, y)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
    reset_peak_rss()
    base = current_rss_mb()
    for _ in range(3):
        step(x, y)
    return hwm_rss_mb() - base


def peak_memory(spec: BenchSpec) -> dict[str, float]:
    """Peak MiB for each network, each in a fresh Python process."""
    out = {}
    for which in NETS if spec.compiled else NETS[:2]:
        code = (
            "import json,sys,torch; from facetag.bench.layers import BenchSpec, memory_probe; "
            "d=json.loads(sys.argv[1]); d['widths']=tuple(d['widths']); "
            "d['threads'] and torch.set_num_threads(d['threads']); "
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


def profile_nets(spec: BenchSpec, rows: int = 15) -> dict[str, str]:
    """Per-op breakdown (torch.profiler, self CPU/CUDA time) for a few steps of each net.

    NOTE: our conv's grad_weight blocks run on worker threads (facetag.layers._threads),
    which the profiler does not follow: their time shows as Conv2dFnBackward's own.
    """
    from torch.profiler import ProfilerActivity, profile

    nets = build_nets(spec)
    x, y = _batch(spec)
    tables = {}
    for name, model in nets.items():
        step = _step_fn(_to_device(model, spec, name), spec, name)
        for _ in range(2):
            step(x, y)
        activities = [ProfilerActivity.CPU]
        if spec.is_cuda:
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(3):
                step(x, y)
            _sync(spec.device)
        sort = "self_cuda_time_total" if spec.is_cuda else "self_cpu_time_total"
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=rows)
    return tables


def _device_name(spec: BenchSpec) -> str:
    if spec.is_cuda:
        return str(torch.cuda.get_device_name(spec.device))
    return f"cpu ({torch.get_num_threads()} threads)"


def run_bench(spec: BenchSpec, memory: bool = True, load: int = 0) -> dict[str, object]:
    """Time (and measure the memory of) ours against the eager and compiled twins, with
    ``load`` busy processes beside the timed steps; the dict ``--json`` prints."""
    if isinstance(load, bool) or not 0 <= load <= MAX_LOAD:
        raise ValueError(f"bench: expected 0 <= load <= {MAX_LOAD}, got {load!r}")
    if spec.mode == "train" and not spec.is_cuda:
        keep_freed_memory()  # as facetag's training commands run (every net in this process)
    with intra_op_threads(spec.threads) as threads:
        ms = time_nets(spec, load)
        result: dict[str, object] = {
            "mode": spec.mode,
            "model": spec.model,
            "device": spec.device,
            "device_name": _device_name(spec),
            "threads": threads,
            "load": load,
            "loadavg_start": ms["loadavg_start"],
            "loadavg_end": ms["loadavg_end"],
            "cpu_count": os.cpu_count(),
            "batch_size": spec.batch_size,
            "image_size": spec.input_size,
            "widths": list(spec.widths) if spec.model == "cnn" else None,
            "channels_last": spec.channels_last,
            "steps": spec.steps,
            "ours_ms": round(ms["ours"], 2),
            "torch_ms": round(ms["torch"], 2),
            "ratio": round(ms["ours"] / ms["torch"], 3),
            "ours_images_per_s": round(spec.batch_size / ms["ours"] * 1000.0, 1),
            "torch_images_per_s": round(spec.batch_size / ms["torch"] * 1000.0, 1),
            "torch_version": torch.__version__,
        }
        if spec.compiled:
            result.update(
                torch_compiled_ms=round(ms["compiled"], 2),
                ratio_compiled=round(ms["ours"] / ms["compiled"], 3),
                torch_compiled_images_per_s=round(spec.batch_size / ms["compiled"] * 1000.0, 1),
                torch_compile_s=round(ms["compile_s"], 1),
            )
        if memory:
            mem = peak_memory(spec)
            result.update(
                ours_peak_mb=round(mem["ours"], 1),
                torch_peak_mb=round(mem["torch"], 1),
                memory_ratio=round(mem["ours"] / mem["torch"], 3) if mem["torch"] > 0 else None,
            )
            if spec.compiled:
                result.update(
                    torch_compiled_peak_mb=round(mem["compiled"], 1),
                    memory_ratio_compiled=(
                        round(mem["ours"] / mem["compiled"], 3) if mem["compiled"] > 0 else None
                    ),
                )
    return result
