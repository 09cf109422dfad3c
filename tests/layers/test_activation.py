"""ReLU, LeakyReLU, PReLU: gradients, the torch convention at 0, modules, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facetag.gradcheck.activation import CASES
from facetag.gradcheck.core import run_case
from facetag.layers.activation import (
    FUNCTIONS,
    LeakyReLU,
    PReLU,
    ReLU,
    leaky_relu,
    prelu,
    relu,
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_activation_case(case):
    result = run_case(case)
    assert result.passed, result


def _grads(fn, *inputs):
    """Output and input gradients of fn at fresh leaf copies, for a fixed random grad."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), [t.grad for t in leaves]


# Exactly 0 (and -0.0) between negatives and positives: the kink, where we match torch.
AT_ZERO = torch.tensor([[-2.0, -0.0, 0.0, 3.0], [0.0, -1.0, 0.0, 0.5]]).view(2, 2, 2)


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (relu, F.relu),
        (lambda x: relu(x.clone(), inplace=True), F.relu),
        (lambda x: leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2)),
        (lambda x: leaky_relu(x, -0.3), lambda x: F.leaky_relu(x, -0.3)),
        (lambda x: leaky_relu(x.clone(), 0.2, True), lambda x: F.leaky_relu(x, 0.2)),
        (lambda x: leaky_relu(x.clone(), 0.0, True), lambda x: F.leaky_relu(x, 0.0)),
    ],
    ids=["relu", "relu_inplace", "leaky", "leaky_negative", "leaky_inplace", "leaky_0_inplace"],
)
def test_activation_gradient_at_zero_matches_torch(ours, ref):
    out, (grad,) = _grads(ours, AT_ZERO)
    expected, (grad_ref,) = _grads(ref, AT_ZERO)
    assert torch.equal(out, expected)
    assert torch.equal(grad, grad_ref)


@pytest.mark.parametrize("num_parameters", [1, 2])
def test_prelu_gradient_at_zero_matches_torch(num_parameters):
    # torch: grad_x = weight * grad at x == 0, and x == 0 adds nothing to grad_weight.
    weight = torch.tensor([0.25, -0.5])[:num_parameters]
    out, (grad_x, grad_w) = _grads(prelu, AT_ZERO, weight)
    expected, (grad_x_ref, grad_w_ref) = _grads(F.prelu, AT_ZERO, weight)
    assert torch.equal(out, expected)
    assert torch.equal(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_w, grad_w_ref, rtol=0, atol=1e-6)


def test_relu_inplace_returns_x_and_saves_only_the_output():
    x = torch.tensor([-1.0, 2.0, -3.0], requires_grad=True)
    y = x * 1.0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = relu(y, inplace=True)
    assert out is y
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, 0.0]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 0.0]))
    assert len(saved) == 1


def test_relu_inplace_on_leaf_is_refused_like_torch():
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        relu(x, inplace=True)


def test_leaky_relu_inplace_with_negative_slope_is_refused():
    x = torch.ones(3, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match=r"leaky_relu: expected negative_slope >= 0"):
        leaky_relu(x, -0.1, inplace=True)
    with torch.no_grad():  # nothing to differentiate: allowed, as in torch
        assert torch.equal(leaky_relu(x.clone(), -0.1, inplace=True), x)


@pytest.mark.parametrize(
    ("ours", "twin"),
    [
        (ReLU(), nn.ReLU()),
        (ReLU(inplace=True), nn.ReLU(inplace=True)),
        (LeakyReLU(0.2, inplace=True), nn.LeakyReLU(0.2, inplace=True)),
        (LeakyReLU(), nn.LeakyReLU()),
        (PReLU(), nn.PReLU()),
        (PReLU(5, init=0.1), nn.PReLU(5, init=0.1)),
    ],
    ids=repr,
)
def test_activation_module_matches_torch(ours, twin):
    assert repr(ours) == repr(twin)
    assert ours.state_dict().keys() == twin.state_dict().keys()
    ours.load_state_dict(twin.state_dict())
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(x.clone()), twin(x.clone()))


def test_prelu_module_learns_one_slope_per_channel():
    m = PReLU(3)
    x = torch.full((2, 3, 2), -1.0)
    x[:, 1] = 1.0
    m(x).sum().backward()
    # Each channel's slope gradient sums x over the values where x <= 0.
    assert torch.equal(m.weight.grad, torch.tensor([-4.0, 0.0, -4.0]))


def test_activation_graph_holds_only_our_nodes():
    names = {f"{fn.__name__}Backward" for fn in FUNCTIONS}
    x = torch.randn(2, 3, 4, requires_grad=True)
    out = leaky_relu(prelu(relu(x), torch.full((3,), 0.25, requires_grad=True)), 0.1)
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        seen.add(type(node).__name__)
        stack += [n for n, _ in node.next_functions if n is not None]
    assert seen <= names | {"AccumulateGrad"}, seen - names


def test_prelu_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match=r"prelu: expected weight of shape \(1,\) or \(3,\)"):
        prelu(torch.zeros(2, 3, 4), torch.zeros(4))


def test_prelu_rejects_per_channel_weight_for_1d_input():
    with pytest.raises(ValueError, match=r"prelu: expected weight of shape \(1,\) or \(1,\)"):
        prelu(torch.zeros(5), torch.zeros(5))


def test_prelu_rejects_0d_input():
    with pytest.raises(ValueError, match=r"prelu: expected a floating-point x"):
        prelu(torch.tensor(1.0), torch.zeros(1))


def test_prelu_rejects_weight_of_another_dtype():
    with pytest.raises(ValueError, match=r"prelu: expected weight on cpu with dtype"):
        prelu(torch.zeros(2, 3), torch.zeros(3, dtype=torch.float64))


def test_relu_rejects_integer_input():
    with pytest.raises(ValueError, match=r"relu: expected a floating-point x"):
        relu(torch.zeros(3, dtype=torch.long))
