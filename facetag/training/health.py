"""Per-layer gradient health: gradient norms and update-to-weight ratios.

Backpropagation's known failure modes are gradients that vanish (early layers stop
learning: grad norm and update ratio near 0) or explode (norms grow by orders of
magnitude, then NaN). ``GradientHealth`` accumulates, over an epoch, the gradient norm of
every layer and the ratio ||W_after - W_before|| / ||W_before|| of each optimiser step, so
the dashboard shows both per layer. A healthy update ratio is around 1e-3 per step.
"""

from __future__ import annotations

import math

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


class GradientHealth:
    """Accumulates per-layer gradient norms and update ratios over the steps of an epoch."""

    def __init__(self, model: nn.Module) -> None:
        self.groups = layer_parameters(model)
        self._before: dict[str, list[Tensor]] = {}
        self.reset()

    def reset(self) -> None:
        self._grad_sum = dict.fromkeys(self.groups, 0.0)
        self._ratio_sum = dict.fromkeys(self.groups, 0.0)
        self._steps = 0

    def first_non_finite(self) -> str | None:
        """The first layer (in model order) whose gradient holds a NaN or an infinity."""
        for layer, params in self.groups.items():
            for _, p in params:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    return layer
        return None

    @torch.no_grad()
    def before_step(self) -> None:
        """Record gradient norms and snapshot weights; call after backward, before step."""
        for layer, params in self.groups.items():
            grads = [p.grad for _, p in params if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                self._grad_sum[layer] += math.sqrt(sum(float(n) ** 2 for n in norms))
            self._before[layer] = [p.detach().clone() for _, p in params]

    @torch.no_grad()
    def after_step(self) -> None:
        """Accumulate ||delta W|| / ||W|| per layer; call right after optimizer.step()."""
        for layer, params in self.groups.items():
            before = self._before.get(layer)
            if before is None:
                continue
            delta = sum(
                float((p - b).pow(2).sum()) for (_, p), b in zip(params, before, strict=True)
            )
            weight = sum(float(b.pow(2).sum()) for b in before)
            self._ratio_sum[layer] += math.sqrt(delta) / max(math.sqrt(weight), 1e-12)
        self._before.clear()
        self._steps += 1

    def summary(self) -> dict[str, tuple[float, float]]:
        """{layer: (mean gradient norm, mean update ratio)} over the steps since reset."""
        n = max(self._steps, 1)
        return {k: (self._grad_sum[k] / n, self._ratio_sum[k] / n) for k in self.groups}
