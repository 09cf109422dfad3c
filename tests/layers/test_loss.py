"""Losses: gradients, torch's edge cases (ignored targets, kinks, huge logits), modules."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facetag.gradcheck.core import run_case
from facetag.gradcheck.loss import CASES
from facetag.layers import loss
from facetag.layers.loss import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    SmoothL1Loss,
    binary_cross_entropy_with_logits,
    cross_entropy,
    smooth_l1_loss,
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_case(case):
    result = run_case(case)
    assert result.passed, result


def _grads(fn, *inputs, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    return out, [t.grad for t in leaves if t.requires_grad]


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored_like_torch(reduction, smoothing):
    # mean over zero samples is 0/0 = nan in torch; the gradient is still exactly zero.
    logits = torch.randn(3, 4)
    target = torch.full((3,), -100)
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    ours, (grad_ours,) = _grads(lambda z: cross_entropy(z, target, **kw), logits)
    ref, (grad_ref,) = _grads(lambda z: F.cross_entropy(z, target, **kw), logits)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    torch.testing.assert_close(grad_ours, grad_ref)
    assert torch.equal(grad_ours, torch.zeros(3, 4))


def test_cross_entropy_is_softmax_minus_one_hot():
    logits = torch.randn(5, 7, dtype=torch.float64)
    target = torch.tensor([0, 6, 3, 3, 1])
    _, (grad,) = _grads(lambda z: cross_entropy(z, target, reduction="sum"), logits)
    expected = logits.softmax(1) - F.one_hot(target, 7).double()
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)


def test_cross_entropy_large_logits_stay_finite():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-500.0, 500.0, 499.0]])
    target = torch.tensor([1, 2])
    ours, (grad_ours,) = _grads(lambda z: cross_entropy(z, target), logits)
    ref, (grad_ref,) = _grads(lambda z: F.cross_entropy(z, target), logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad_ours, grad_ref)


def test_cross_entropy_module_loads_torch_state_dict():
    weight = torch.rand(6) + 0.5
    twin = nn.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.1)
    ours = CrossEntropyLoss(torch.ones(6), ignore_index=2, label_smoothing=0.1)
    ours.load_state_dict(twin.state_dict())
    logits, target = torch.randn(8, 6), torch.randint(0, 6, (8,))
    out, (grad,) = _grads(ours, logits, target)
    out_twin, (grad_twin,) = _grads(twin, logits, target)
    torch.testing.assert_close(out, out_twin)
    torch.testing.assert_close(grad, grad_twin)
    assert CrossEntropyLoss().state_dict().keys() == nn.CrossEntropyLoss().state_dict().keys()


def test_cross_entropy_rejects_out_of_range_target():
    with pytest.raises(ValueError, match=r"cross_entropy: expected targets in \[0, 3\) or "):
        cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_cross_entropy_rejects_float_target():
    with pytest.raises(ValueError, match=r"cross_entropy: expected target of shape \(2,\) and"):
        cross_entropy(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))


def test_cross_entropy_rejects_bad_options():
    logits, target = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"cross_entropy: expected logits of shape \(N, P\)"):
        cross_entropy(torch.zeros(2, 3, 4), target)
    with pytest.raises(ValueError, match=r"cross_entropy: expected weight of shape \(3,\)"):
        cross_entropy(logits, target, weight=torch.ones(4))
    with pytest.raises(ValueError, match=r"expected reduction to be one of 'mean', 'sum', 'none"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match=r"cross_entropy: expected 0 <= label_smoothing <= 1"):
        cross_entropy(logits, target, label_smoothing=1.5)


@pytest.mark.parametrize("pos_weight", [None, torch.tensor([3.0, 0.5])])
def test_bce_with_logits_is_stable_for_huge_logits(pos_weight):
    logits = torch.tensor([[1e4, -1e4], [-200.0, 200.0], [0.0, 50.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 1.0]])
    fn = binary_cross_entropy_with_logits
    ours, grads = _grads(lambda x, t: fn(x, t, pos_weight=pos_weight), logits, target)
    twin = F.binary_cross_entropy_with_logits
    ref, grads_ref = _grads(lambda x, t: twin(x, t, pos_weight=pos_weight), logits, target)
    assert torch.isfinite(ours)
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_bce_with_logits_module_loads_torch_state_dict():
    twin = nn.BCEWithLogitsLoss(weight=torch.rand(5), pos_weight=torch.rand(5) * 2)
    ours = BCEWithLogitsLoss(torch.ones(5), pos_weight=torch.ones(5))
    ours.load_state_dict(twin.state_dict())
    logits, target = torch.randn(4, 5), torch.rand(4, 5)
    out, grads = _grads(ours, logits, target)
    out_twin, grads_twin = _grads(twin, logits, target)
    torch.testing.assert_close(out, out_twin)
    for a, b in zip(grads, grads_twin, strict=True):
        torch.testing.assert_close(a, b)


def test_loss_weights_must_not_require_grad_like_torch():
    weight = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"cross_entropy: expected weight that does not requir"):
        cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), weight)
    with pytest.raises(ValueError, match=r"expected pos_weight that does not require grad"):
        binary_cross_entropy_with_logits(torch.zeros(2, 3), torch.zeros(2, 3), None, weight)


def test_bce_with_logits_rejects_mismatched_shapes():
    fn = binary_cross_entropy_with_logits
    with pytest.raises(ValueError, match=r"binary_cross_entropy_with_logits: expected target of"):
        fn(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"expected pos_weight broadcastable to the logits' sha"):
        fn(torch.zeros(2, 3), torch.zeros(2, 3), pos_weight=torch.ones(2))


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_smooth_l1_kinks_like_torch(beta):
    # Differences exactly at -beta, +beta and 0 (all exact in binary floating point): torch
    # takes the linear branch at |d| == beta (gradient +-1) and gives 0 at d == 0.
    target = torch.tensor([0.25, 0.25, 0.25, -1.0])
    x = target + torch.tensor([-beta, beta, 0.0, beta])
    ours, grads = _grads(lambda a, b: smooth_l1_loss(a, b, beta, "sum"), x, target)
    ref, grads_ref = _grads(
        lambda a, b: F.smooth_l1_loss(a, b, beta=beta, reduction="sum"), x, target
    )
    torch.testing.assert_close(ours, ref)
    assert torch.equal(grads[0], torch.tensor([-1.0, 1.0, 0.0, 1.0]))
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, b)


def test_smooth_l1_beta0_is_l1_with_zero_gradient_at_zero():
    x = torch.tensor([1.0, -2.0, 3.0])
    target = torch.tensor([1.0, 0.0, 0.0])
    ours, grads = _grads(lambda a, b: smooth_l1_loss(a, b, 0.0, "none"), x, target)
    ref, grads_ref = _grads(lambda a, b: F.l1_loss(a, b, reduction="none"), x, target)
    assert torch.equal(ours, ref)
    assert torch.equal(grads[0], torch.tensor([0.0, -1.0, 1.0]))
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, b)


def test_smooth_l1_module_matches_torch():
    ours, twin = SmoothL1Loss(beta=0.3), nn.SmoothL1Loss(beta=0.3)
    x, target = torch.randn(6, 4), torch.randn(6, 4)
    torch.testing.assert_close(ours(x, target), twin(x, target))
    assert repr(ours) == "SmoothL1Loss(reduction='mean', beta=0.3)"


def test_smooth_l1_rejects_negative_beta():
    with pytest.raises(ValueError, match=r"smooth_l1_loss: expected beta >= 0"):
        smooth_l1_loss(torch.zeros(3), torch.zeros(3), beta=-1.0)


def test_loss_modules_reject_unknown_reduction():
    with pytest.raises(ValueError, match=r"SmoothL1Loss: expected reduction to be one of"):
        SmoothL1Loss(reduction="batchmean")


def test_loss_functions_lists_every_function():
    defined = {
        obj
        for obj in vars(loss).values()
        if inspect.isclass(obj)
        and issubclass(obj, torch.autograd.Function)
        and obj.__module__ == loss.__name__
    }
    assert set(loss.FUNCTIONS) == defined
