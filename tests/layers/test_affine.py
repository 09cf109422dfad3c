"""Per-channel affine: gradients, the torch reference, module, errors."""

import pytest
import torch
from torch.autograd import gradcheck

from facetag.gradcheck.affine import CASES
from facetag.gradcheck.core import run_case
from facetag.layers import affine
from facetag.layers.affine import ChannelAffine, ChannelAffineFn, channel_affine

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 4), (4, 8, 7, 7)]  # batch 1 and odd sizes


def make_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    return (
        torch.randn(shape, generator=g, dtype=dtype, requires_grad=True),
        torch.randn(C, generator=g, dtype=dtype, requires_grad=True),
        torch.randn(C, generator=g, dtype=dtype, requires_grad=True),
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_channel_affine_case(case):
    result = run_case(case)
    assert result.passed, result


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_affine_gradcheck(shape):  # finite differences, float64
    assert gradcheck(ChannelAffineFn.apply, make_inputs(shape, torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_affine_matches_reference(shape):  # built-in ops + autograd, float32
    ours = make_inputs(shape, torch.float32)
    ref = [t.detach().clone().requires_grad_() for t in ours]
    out = channel_affine(*ours)
    expected = ref[0] * ref[1][None, :, None, None] + ref[2][None, :, None, None]
    grad_out = torch.randn_like(out)  # not .sum(): all-ones upstream grads hide transposes
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_channel_affine_module_starts_as_identity():
    layer = ChannelAffine(3)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), x)
    assert repr(layer) == "ChannelAffine(channels=3)"
    assert [n for n, _ in layer.named_parameters()] == ["gamma", "beta"]


def test_channel_affine_functions_lists_every_function():
    assert (ChannelAffineFn,) == affine.FUNCTIONS


def test_channel_affine_rejects_2d_input():
    with pytest.raises(ValueError, match=r"expected x of shape \(N, C, H, W\)"):
        channel_affine(torch.zeros(3, 4), torch.ones(4), torch.zeros(4))


def test_channel_affine_rejects_gamma_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"channel_affine: gamma and beta must have shape \(4,\)"):
        channel_affine(torch.zeros(2, 4, 3, 3), torch.ones(3), torch.zeros(4))
