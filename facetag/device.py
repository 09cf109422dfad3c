"""Which device a command runs on: ``auto`` picks CUDA when there is one."""

from __future__ import annotations

import torch

from facetag.errors import DeviceError


def resolve_device(choice: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> the device actually used ('cpu' or 'cuda').

    ``cuda`` without a usable GPU is an error, never a silent fall back to the CPU.
    """
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "--device cuda: expected a CUDA GPU, got none (torch.cuda.is_available() is "
                "False); use --device cpu or --device auto"
            )
        return "cuda"
    raise DeviceError(f"--device: expected auto, cpu or cuda, got {choice!r}")


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a training step frees for the next step.

    By default glibc serves every block above 32 MiB (and, adaptively, smaller ones) with
    its own mmap and unmaps it when freed, so each step's activations and gradients are
    fresh pages: the kernel zeroes and maps them one 4 KiB fault at a time. Filling a
    fresh 75 MB tensor took 22 ms here, the same tensor reused 0.9 ms; the CNN's training
    step 273 -> 196 ms (experiments/LOG.md). With mmap off and trimming at 2 GiB, freed
    blocks stay in the heap and the next step reuses them. The cost: the process keeps
    its peak heap until it exits, which a training run reaches every step anyway.
    (PyTorch's CPU tuning guide reaches the same end by preloading jemalloc or tcmalloc.)

    Called by the training commands only: tagging keeps glibc's defaults and its small
    footprint. Returns whether it took effect (False off glibc, e.g. macOS or musl).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
