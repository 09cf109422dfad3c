"""Linear: gradients (cases), the module against nn.Linear, memory, errors."""

import pytest
import torch
from torch import nn

from facetag.gradcheck.core import run_case
from facetag.gradcheck.linear import CASES
from facetag.layers.linear import FUNCTIONS, Linear, LinearFn, linear


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_linear_case(case):
    result = run_case(case)
    assert result.passed, result


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(64, 256), (8, 5, 256)])
def test_linear_module_matches_torch(bias, x_shape):
    torch.manual_seed(0)
    twin = nn.Linear(256, 128, bias=bias)
    ours = Linear(256, 128, bias=bias)
    ours.load_state_dict(twin.state_dict())
    x = torch.randn(x_shape, requires_grad=True)
    grad_out = torch.randn(*x_shape[:-1], 128)
    grads = []
    for module in (ours, twin):
        x.grad = None
        y = module(x)
        y.backward(grad_out)
        grads.append((y, x.grad, module.weight.grad, module.bias))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    if bias:
        torch.testing.assert_close(ours.bias.grad, twin.bias.grad)


def test_linear_init_and_state_dict_match_torch():
    torch.manual_seed(5)
    twin = nn.Linear(7, 3)
    torch.manual_seed(5)
    ours = Linear(7, 3)
    assert list(ours.state_dict()) == list(twin.state_dict()) == ["weight", "bias"]
    assert torch.equal(ours.weight, twin.weight)
    assert torch.equal(ours.bias, twin.bias)
    assert list(Linear(7, 3, bias=False).state_dict()) == ["weight"]
    assert repr(ours) == repr(twin)
    assert repr(Linear(7, 3, bias=False)) == repr(nn.Linear(7, 3, bias=False))


def test_linear_saves_only_x_and_weight():
    x = torch.randn(4, 6, requires_grad=True)
    layer = Linear(6, 2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), layer.weight.data_ptr()]
    assert type(y.grad_fn).__name__ == "LinearFnBackward"
    assert (LinearFn,) == FUNCTIONS


def test_linear_skips_grad_x_when_x_needs_none():
    layer = Linear(6, 2)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    assert x.grad is None
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(2, 6))
    torch.testing.assert_close(layer.bias.grad, torch.full((2,), 4.0))


def test_linear_rejects_wrong_feature_count():
    with pytest.raises(ValueError, match=r"linear: expected x of shape \(N, \*, 5\), got \(4, 3\)"):
        linear(torch.zeros(4, 3), torch.zeros(2, 5))


def test_linear_rejects_bad_weight_and_bias():
    with pytest.raises(ValueError, match=r"linear: expected weight of shape \(P, D\)"):
        linear(torch.zeros(4, 5), torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match=r"linear: expected bias of shape \(2,\)"):
        linear(torch.zeros(4, 5), torch.zeros(2, 5), torch.zeros(3))
    with pytest.raises(ValueError, match=r"linear: expected weight on x's torch\.float64"):
        linear(torch.zeros(4, 5, dtype=torch.float64), torch.zeros(2, 5))
