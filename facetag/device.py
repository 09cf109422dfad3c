"""Which device a command runs on (``auto`` picks CUDA when there is one), and how a
training process on the CPU keeps its freed memory (``keep_freed_memory``)."""

from __future__ import annotations

from typing import Any

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
    step 272 -> 201 ms (`facetag bench train`, experiments/LOG.md). With mmap off and
    trimming at 2 GiB, freed blocks stay in the heap and the next step reuses them. The
    cost: fragmentation (the CNN bench's peak 355 -> 560 MiB) and the process keeps its
    peak heap until it exits. (PyTorch's CPU tuning guide reaches the same end by
    preloading jemalloc or tcmalloc; under such a preload this changes nothing.)

    Called by the training commands (the setting lasts for the rest of the process, a
    command's evaluation after training included); tagging keeps glibc's defaults.
    Returns whether it took effect: False off glibc (macOS, musl), or when another
    allocator was preloaded.
    """
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        used = ctypes.CDLL(None).malloc  # the malloc the running process resolves
    except (OSError, AttributeError):
        return False

    def address(f: Any) -> int | None:
        return ctypes.cast(f, ctypes.c_void_p).value

    if address(used) != address(libc.malloc):
        return False  # jemalloc or tcmalloc preloaded: glibc's settings would not matter
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
