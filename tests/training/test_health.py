"""Per-layer gradient health: sampled steps, known norms and update ratios, the figure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from facetag.training.figures import gradient_health_figure
from facetag.training.health import GradientHealth, HealthSample


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))


def _steps(model: nn.Module, health: GradientHealth, n: int, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # plain SGD: delta W = -lr * g
    model[3].weight.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    for step in range(n):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        grads = {i: [p.grad.clone() for p in model[i].parameters()] for i in (0, 2)}
        weights = {i: [p.detach().clone() for p in model[i].parameters()] for i in (0, 2)}
        health.before_step(step)
        opt.step()
        health.after_step()
        if step % health.every == 0:  # the sample holds this step's exact figures
            layers = health.samples[-1].layers
            for i in (0, 2):
                g = math.sqrt(sum(float(x.square().sum()) for x in grads[i]))
                w = math.sqrt(sum(float(x.square().sum()) for x in weights[i]))
                assert layers[f"net.{i}"] == pytest.approx((g, lr * g / w), rel=1e-5)


def test_every_nth_step_is_sampled_with_its_own_norm_and_update_ratio():
    model = _model()
    health = GradientHealth(model, every=2, prefix="net.")
    _steps(model, health, 5)
    assert [s.step for s in health.samples] == [0, 2, 4]
    # Layers in model order; a frozen layer has no gradient and is not a layer here.
    assert list(health.samples[0].layers) == ["net.0", "net.2"]
    health.reset()
    assert health.samples == []


def test_steps_between_samples_take_no_snapshot(monkeypatch):
    model = _model()
    health = GradientHealth(model, every=3)
    calls = []
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: calls.append(1) or self)
    for step in (1, 2, 4, 5):
        health.before_step(step)
        health.after_step()
    assert calls == []
    assert health.samples == []


def test_every_below_one_is_refused():
    with pytest.raises(ValueError, match="expected every >= 1, got 0"):
        GradientHealth(_model(), every=0)


def test_figure_puts_every_layer_by_depth_on_a_log_axis_with_the_healthy_band(tmp_path):
    samples = [
        HealthSample(0, {"stem": (10.0, 1e-2), "mid": (1.0, 1e-3), "head": (0.1, 0.0)}),
        HealthSample(10, {"stem": (20.0, 2e-2), "mid": (2.0, 2e-3), "head": (0.2, 1e-5)}),
    ]
    fig = gradient_health_figure(samples, "epoch 3")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["stem", "mid", "head"]
    assert "epoch 3 (2 sampled steps)" in ax.get_title()
    band = [p for p in ax.patches if p.get_label() == "healthy update ratio"]
    assert len(band) == 1
    bottom, height = band[0].get_y(), band[0].get_height()
    assert (bottom, bottom + height) == pytest.approx((3e-4, 3e-3))
    ratios = next(c for c in ax.containers if c.get_label() == "update ratio")
    medians = ratios.lines[0].get_ydata()
    assert list(medians[:2]) == pytest.approx([1.5e-2, 1.5e-3])
    assert medians[2] == pytest.approx(1e-5)  # a zero ratio is left off the log axis
    fig.savefig(tmp_path / "health.png")
    assert (tmp_path / "health.png").stat().st_size > 1000


def test_figure_without_samples_is_refused():
    with pytest.raises(ValueError, match="expected sampled steps, got none"):
        gradient_health_figure([], "epoch 1")
