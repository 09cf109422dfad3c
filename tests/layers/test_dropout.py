"""Dropout: the same mask as torch for the same seed, train/eval, p edge cases, errors."""

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facetag.gradcheck.core import run_case
from facetag.gradcheck.dropout import CASES
from facetag.layers.dropout import Dropout, dropout

# The package re-exports the function dropout() under the module's name, so import the module
# itself by its full name.
dropout_module = importlib.import_module("facetag.layers.dropout")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dropout_case(case):
    result = run_case(case)
    assert result.passed, result


def _seeded_grads(fn, x, seed=7):
    torch.manual_seed(seed)
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    return out, leaf.grad


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
def test_dropout_mask_matches_torch_for_same_seed(p):
    x = torch.randn(4, 16, 9, 9)
    ours, grad_ours = _seeded_grads(lambda t: dropout(t, p), x)
    ref, grad_ref = _seeded_grads(lambda t: F.dropout(t, p), x)
    assert torch.equal(ours, ref)
    assert torch.equal(grad_ours, grad_ref)
    kept = (ours != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.05


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.transpose(1, 3),
        lambda x: x[:, :, ::2],
        lambda x: x.contiguous(memory_format=torch.channels_last),
    ],
    ids=["transposed", "sliced", "channels-last"],
)
def test_dropout_non_contiguous_matches_torch(make):
    x = make(torch.randn(2, 3, 6, 5))
    ours, grad_ours = _seeded_grads(lambda t: dropout(t, 0.4), x)
    ref, grad_ref = _seeded_grads(lambda t: F.dropout(t, 0.4), x)
    assert torch.equal(ours, ref)
    assert torch.equal(grad_ours, grad_ref)


def test_dropout_inplace_matches_torch():
    x = torch.randn(3, 8)
    torch.manual_seed(3)
    a = x.clone().requires_grad_()
    ours = dropout(a * 1.0, 0.5, inplace=True)
    torch.manual_seed(3)
    b = x.clone().requires_grad_()
    ref = F.dropout(b * 1.0, 0.5, inplace=True)
    grad_out = torch.randn(3, 8)
    ours.backward(grad_out)
    ref.backward(grad_out)
    assert torch.equal(ours, ref)
    assert torch.equal(a.grad, b.grad)


def test_dropout_inplace_writes_into_input():
    x = torch.ones(64)
    y = dropout(x, 0.5, inplace=True)
    assert y is x
    assert set(x.unique().tolist()) <= {0.0, 2.0}


def test_dropout_module_train_and_eval():
    layer = Dropout(0.5)
    x = torch.randn(8, 32, requires_grad=True)
    layer.train()
    y = layer(x)
    assert (y == 0).any()
    torch.testing.assert_close(y[y != 0], 2 * x[y != 0])
    layer.eval()
    assert layer(x) is x  # eval is the identity, no copy and no graph node (as torch)
    assert layer.state_dict().keys() == nn.Dropout(0.5).state_dict().keys()
    assert repr(layer) == "Dropout(p=0.5, inplace=False)"


def test_dropout_p0_returns_input():
    x = torch.randn(3, 4, requires_grad=True)
    assert dropout(x, 0.0) is x


def test_dropout_p1_zeroes_output_and_gradient_like_torch():
    x = torch.tensor([[1.0, float("inf"), -2.0]])
    ours, grad_ours = _seeded_grads(lambda t: dropout(t, 1.0), x)
    ref, grad_ref = _seeded_grads(lambda t: F.dropout(t, 1.0), x)
    torch.testing.assert_close(ours, ref, equal_nan=True)  # inf * 0 is nan in both
    assert torch.equal(grad_ours, grad_ref)
    assert torch.equal(grad_ours, torch.zeros(1, 3))


def test_dropout_p1_draws_no_random_numbers():
    torch.manual_seed(0)
    dropout(torch.randn(4), 1.0)
    after_ours = torch.rand(1)
    torch.manual_seed(0)
    F.dropout(torch.randn(4), 1.0)
    assert torch.equal(after_ours, torch.rand(1))


def test_dropout_empty_input():
    x = torch.zeros(0, 4)
    assert dropout(x, 0.5) is x


def test_dropout_functions_lists_every_function():
    defined = {
        obj
        for obj in vars(dropout_module).values()
        if inspect.isclass(obj)
        and issubclass(obj, torch.autograd.Function)
        and obj.__module__ == dropout_module.__name__
    }
    assert set(dropout_module.FUNCTIONS) == defined


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"dropout: expected 0 <= p <= 1"):
        dropout(torch.zeros(3), p)
    with pytest.raises(ValueError, match=r"Dropout: expected 0 <= p <= 1"):
        Dropout(p)
