"""Micro-benchmark: facetag Conv2d vs nn.Conv2d, forward + backward, per layer and format.

    .venv/bin/python experiments/bench_conv.py [--threads 2] [--repeats 9] [--batch 64]

The layers are the recognition CNN's convolutions (3x3, padding 1, no bias: BatchNorm
follows). Every timing interleaves ours and torch's (A B A B ...) in one process and
reports medians, so the shared-CPU noise hits both alike; the ratio is ours / torch.
Columns:
  step     forward + backward of the layer (the first layer's x is the image: no grad_x)
  bwd_w    the weight gradient alone: torch's backward with only the weight asked for
           (oneDNN's kernel, which conv2d_grad_weight's "auto" takes on the CPU), against
           our three formulations (im2col, winograd, corr); ratio is the best of ours over
           torch's
  saved    bytes the forward keeps for the backward (saved_tensors_hooks), ours vs torch
  peak     with --memory: growth of the peak RSS over 3 forward + backward steps, each
           implementation in a fresh process (after the inputs exist), ours vs torch
Timings are process CPU time with --cpu-time (steadier when other jobs share the cores,
meaningful with --threads 1), wall time otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from facetag.layers.conv import Conv2d, conv2d_grad_weight

LAYERS = [(3, 32, 96), (32, 64, 48), (64, 128, 24), (128, 256, 12)]  # (C, F, H=W)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds of each fn, run round-robin after one warm-up round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors autograd keeps from module(x) for the backward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def bench_layer(
    C: int,
    F: int,
    H: int,
    N: int,
    fmt: torch.memory_format,
    repeats: int,
    clock: Callable[[], float],
) -> dict[str, float]:
    torch.manual_seed(0)
    twin = nn.Conv2d(C, F, 3, padding=1, bias=False).to(memory_format=fmt)
    ours = Conv2d(C, F, 3, padding=1, bias=False).to(memory_format=fmt)
    ours.load_state_dict(twin.state_dict())
    x = torch.randn(N, C, H, H).contiguous(memory_format=fmt)
    needs_grad_x = C != 3  # the first layer sees the image batch
    x.requires_grad_(needs_grad_x)
    go = torch.randn(N, F, H, H).contiguous(memory_format=fmt)

    def step(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            m.zero_grad(set_to_none=True)
            m(x).backward(go)

        return run

    y_t = twin(x)
    xd = x.detach()
    args = (go, xd, tuple(twin.weight.shape), (1, 1), (1, 1), (1, 1), 1)
    r = interleaved(
        {
            "ours": step(ours),
            "torch": step(twin),
            "bw_torch": lambda: torch.autograd.grad(y_t, twin.weight, go, retain_graph=True),
            "bw_im2col": lambda: conv2d_grad_weight(*args, method="im2col"),
            "bw_winograd": lambda: conv2d_grad_weight(*args, method="winograd"),
            "bw_corr": lambda: conv2d_grad_weight(*args, method="corr"),
        },
        repeats,
        clock,
    )
    r["saved_ours"] = saved_bytes(ours, x)
    r["saved_torch"] = saved_bytes(twin, x)
    return r


PEAK_SCRIPT = """
import re, sys, torch
from torch import nn
from facetag.layers.conv import Conv2d
impl, C, F, H, N, fmt, threads = sys.argv[1:]
C, F, H, N = int(C), int(F), int(H), int(N)
torch.set_num_threads(int(threads))
fmt = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
make = Conv2d if impl == "ours" else nn.Conv2d
m = make(C, F, 3, padding=1, bias=False).to(memory_format=fmt)
x = torch.randn(N, C, H, H).contiguous(memory_format=fmt).requires_grad_(C != 3)
go = torch.randn(N, F, H, H).contiguous(memory_format=fmt)
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
before = hwm()
for _ in range(3):
    x.grad = None
    m.zero_grad(set_to_none=True)
    m(x).backward(go)
print((hwm() - before) / 1024)
"""


def peak_mib(impl: str, C: int, F: int, H: int, N: int, fmt: str, threads: int) -> float:
    """Peak RSS growth (MiB) of 3 steps of one implementation, in a fresh process."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_SCRIPT,
            impl,
            str(C),
            str(F),
            str(H),
            str(N),
            fmt,
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time")
    parser.add_argument("--layers", type=int, nargs="*", default=list(range(len(LAYERS))))
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS growth")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    kind = "cpu" if args.cpu_time else "wall"
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
        f"{args.repeats} interleaved repeats, medians in ms ({kind} time)"
    )
    head = (
        f"{'layer':>16} {'format':>13} | {'ours':>7} {'torch':>7} {'ratio':>6} | "
        f"{'im2col':>7} {'wino':>7} {'corr':>7} {'torch':>7} {'ratio':>6} | {'saved MiB':>13}"
        + (f" | {'peak MiB':>13}" if args.memory else "")
    )
    print(f"{'':>31}| {'step (fwd + bwd)':^22} | {'bwd_w (weight grad only)':^38} |")
    print(head)
    print("-" * len(head))
    for i in args.layers:
        C, F, H = LAYERS[i]
        for name, fmt in (
            ("contiguous", torch.contiguous_format),
            ("channels_last", torch.channels_last),
        ):
            r = bench_layer(C, F, H, args.batch, fmt, args.repeats, clock)
            ms = {k: v * 1e3 for k, v in r.items() if not k.startswith("saved")}
            best = min(ms["bw_im2col"], ms["bw_winograd"], ms["bw_corr"])
            print(
                f"{f'{C}->{F} @{H}x{H}':>16} {name:>13} | {ms['ours']:7.1f} {ms['torch']:7.1f} "
                f"{ms['ours'] / ms['torch']:6.3f} | {ms['bw_im2col']:7.1f} "
                f"{ms['bw_winograd']:7.1f} {ms['bw_corr']:7.1f} "
                f"{ms['bw_torch']:7.1f} {best / ms['bw_torch']:6.3f} | "
                f"{r['saved_ours'] / 2**20:6.1f} {r['saved_torch'] / 2**20:6.1f}",
                end="",
            )
            if args.memory:
                peaks = [
                    peak_mib(impl, C, F, H, args.batch, name, args.threads)
                    for impl in ("ours", "torch")
                ]
                print(f" | {peaks[0]:6.1f} {peaks[1]:6.1f}", end="")
            print(flush=True)


if __name__ == "__main__":
    main()
