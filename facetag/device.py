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
