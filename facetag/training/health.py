"""Per-layer gradient health: gradient norms and update-to-weight ratios.

Backpropagation's known failure modes are gradients that vanish (early layers stop
learning: grad norm and update ratio near 0) or explode (norms grow by orders of
magnitude, then NaN). ``GradientHealth`` samples, every N optimiser steps, the gradient norm of
every layer and the ratio ||W_after - W_before|| / ||W_before|| of that step, so the
dashboard shows both per layer and per step. A healthy update ratio is around 1e-3 per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def layer_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters grouped by the module that owns them, in model order."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for module_name, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if params:
            groups[module_name or "model"] = params
    return groups


HEALTHY_UPDATE_RATIO = (3e-4, 3e-3)  # the band around 1e-3 the figure marks


@dataclass(frozen=True)
class HealthSample:
    """One sampled optimiser step: {layer: (gradient norm, update ratio)}."""

    step: int  # the optimiser step (the schedule's count, so it continues on resume)
    layers: dict[str, tuple[float, float]]


class GradientHealth:
    """Per-layer gradient norms and update ratios of every ``every``-th optimiser step.

    The samples since ``reset`` are what the dashboard plots per step (``grad_norm/<layer>``,
    ``update_ratio/<layer>`` at the step) and the per-epoch figure draws by depth. Steps in
    between skip the weight snapshot, so sampling also costs less than measuring every step.
    ``prefix`` names the layers of one of several networks ("pnet.").
    """

    def __init__(self, model: nn.Module, every: int = 10, prefix: str = "") -> None:
        if every < 1:
            raise ValueError(f"GradientHealth: expected every >= 1, got {every}")
        self.groups = layer_parameters(model)
        self.every, self.prefix = every, prefix
        self._before: dict[str, list[Tensor]] = {}
        self._grads: dict[str, float] = {}
        self._step = -1
        self.samples: list[HealthSample] = []

    def reset(self) -> None:
        """Start a new epoch's samples."""
        self.samples = []

    def first_non_finite(self) -> str | None:
        """The first layer (in model order) whose gradient holds a NaN or an infinity."""
        for layer, params in self.groups.items():
            for _, p in params:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    return layer
        return None

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """On a sampled ``step``: record gradient norms and snapshot the weights.
        Call after backward, before optimizer.step()."""
        self._step = step if step % self.every == 0 else -1
        if self._step < 0:
            return
        for layer, params in self.groups.items():
            grads = [p.grad for _, p in params if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                self._grads[layer] = math.sqrt(sum(float(n) ** 2 for n in norms))
                self._before[layer] = [p.detach().clone() for _, p in params]

    @torch.no_grad()
    def after_step(self) -> None:
        """On a sampled step: ||delta W|| / ||W|| per layer; call right after optimizer.step()."""
        if self._step < 0:
            return
        layers: dict[str, tuple[float, float]] = {}
        for layer, params in self.groups.items():
            before = self._before.get(layer)
            if before is None:
                continue  # no gradient reached it this step
            delta = sum(
                float((p - b).pow(2).sum()) for (_, p), b in zip(params, before, strict=True)
            )
            weight = sum(float(b.pow(2).sum()) for b in before)
            ratio = math.sqrt(delta) / max(math.sqrt(weight), 1e-12)
            layers[self.prefix + layer] = (self._grads[layer], ratio)
        self.samples.append(HealthSample(self._step, layers))
        self._before.clear()
        self._grads.clear()
        self._step = -1
