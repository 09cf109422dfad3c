"""BatchNorm2d + activation: ours (separate and fused, eager and compiled) against torch.nn.

Forward + backward of one (N, C, H, W) block at the recognition CNN's four stage shapes
(batch 64: 32 @ 96x96, 64 @ 48x48, 128 @ 24x24, 256 @ 12x12), contiguous and
channels_last. Timings are interleaved (every variant once per round, rounds rotate the
order) and the median is reported with its ratio to the torch twin with the same
activation, so a noisy, shared machine hits every variant alike. Memory is reported two
ways: the bytes saved for backward (storage-deduplicated, via saved_tensors_hooks, so the
output is counted once even when the next layer saves it too; that is the memory a
training step holds between forward and backward) and the peak resident-set growth of one
forward + backward, each variant in a fresh subprocess.

    python experiments/bench_norm.py                 # full table (several minutes)
    python experiments/bench_norm.py --rounds 5 --stages 0 3 --no-memory

Not a test; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from facetag.layers.activation import PReLU, ReLU
from facetag.layers.fused import BatchNormAct2d
from facetag.layers.norm import BatchNorm2d

STAGES = [(64, 32, 96, 96), (64, 64, 48, 48), (64, 128, 24, 24), (64, 256, 12, 12)]


def build(variant: str, C: int) -> nn.Module:
    """One block; the same weights for every variant (PReLU slopes 0.25 per channel)."""
    torch.manual_seed(0)
    act = variant.split(":")[1]
    kind = variant.split(":")[0]
    if kind == "torch":
        a: nn.Module = nn.PReLU(C) if act == "prelu" else nn.ReLU()
        block = nn.Sequential(nn.BatchNorm2d(C), a)
    elif kind == "separate":
        a = PReLU(C) if act == "prelu" else ReLU()
        block = nn.Sequential(BatchNorm2d(C), a)
    elif kind in ("fused-eager", "fused-compiled"):
        block = BatchNormAct2d(C, activation=act, use_compile=kind == "fused-compiled")
    else:
        raise ValueError(f"bench_norm: unknown variant {variant!r}")
    with torch.no_grad():  # non-trivial affine parameters, identical across variants
        bn = block[0] if isinstance(block, nn.Sequential) else block.bn
        bn.weight.copy_(torch.linspace(0.5, 1.5, C))
        bn.bias.copy_(torch.linspace(-0.2, 0.2, C))
    return block.train()


def inputs(shape: tuple[int, ...], channels_last: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    grad = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    return x, grad


def step(block: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    leaf = x.detach().requires_grad_()

    def run() -> None:
        leaf.grad = None
        block.zero_grad(set_to_none=True)
        block(leaf).backward(grad)

    return run


def saved_bytes(block: nn.Module, x: Tensor) -> int:
    """Bytes of the distinct storages saved for backward by one forward."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    leaf = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(leaf)
    # The output is held by whatever follows (e.g. max-pool saves its input); count it once
    # for every variant, so that the numbers compare what the block itself adds.
    s = out.untyped_storage()
    storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def peak_rss_mib(variant: str, shape: tuple[int, ...], channels_last: bool) -> float:
    """Peak RSS growth (MiB) of one forward/backward after a warm-up, in a fresh subprocess.

    Counted: the output, the saved tensors and every temporary of forward and backward,
    and grad_x; the input x and the upstream gradient exist before and are not counted.
    """
    code = f"""
import json, resource, torch
import experiments.bench_norm as b
x, g = b.inputs({shape!r}, {channels_last})
block = b.build({variant!r}, {shape[1]})
leaf = x.requires_grad_()
block(leaf).backward(g)  # warm-up (compiles); its peak is not counted
leaf.grad = None
block.zero_grad(set_to_none=True)
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS to the current RSS
base = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])
block(leaf).backward(g)
peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
print(json.dumps((peak - base) / 1024))
"""
    # A fixed mmap threshold makes glibc return every tensor's memory on free, so the
    # resident set follows the live tensors instead of what malloc keeps cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1]))


def time_variants(
    variants: list[str], shape: tuple[int, ...], channels_last: bool, rounds: int
) -> dict[str, float]:
    x, grad = inputs(shape, channels_last)
    runs = {v: step(build(v, shape[1]), x, grad) for v in variants}
    for run in runs.values():  # warm-up: compile, first-touch of the allocator
        run()
        run()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            t0 = time.perf_counter()
            runs[v]()
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(ts) * 1e3 for v, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--stages", type=int, nargs="*", default=[0, 1, 2, 3])
    p.add_argument("--layouts", nargs="*", default=["nchw", "cl"])
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--variants",
        nargs="*",
        default=[
            "torch:prelu",
            "separate:prelu",
            "fused-eager:prelu",
            "fused-compiled:prelu",
            "torch:relu",
            "fused-eager:relu",
            "fused-compiled:relu",
        ],
        help="kind:activation; each activation needs its torch:activation twin",
    )
    args = p.parse_args()
    variants = args.variants
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    x, grad = inputs((64, 32, 24, 24), False)
    step(build("fused-compiled:prelu", 32), x, grad)()
    print(
        f"first compiled call (fwd + bwd, PReLU, includes compiling): "
        f"{time.perf_counter() - t0:.1f} s"
    )
    header = f"{'shape':>18} {'layout':>6} {'variant':>22} {'ms':>8} {'ratio':>6}"
    if not args.no_memory:
        header += f" {'saved MiB':>10} {'peak MiB':>9}"
    print(header)
    for i in args.stages:
        shape = STAGES[i]
        for layout in args.layouts:
            cl = layout == "cl"
            ms = time_variants(variants, shape, cl, args.rounds)
            for v in variants:
                twin = "torch:" + v.split(":")[1]
                line = f"{shape!s:>18} {layout:>6} {v:>22} {ms[v]:8.1f} {ms[v] / ms[twin]:6.2f}"
                if not args.no_memory:
                    x, _ = inputs(shape, cl)
                    saved = saved_bytes(build(v, shape[1]), x) / 2**20
                    line += f" {saved:10.1f} {peak_rss_mib(v, shape, cl):9.1f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
