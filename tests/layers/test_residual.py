"""Residual additions: gradients, dlib's add_prev padding semantics, modules, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from facetag.gradcheck.core import run_case
from facetag.gradcheck.residual import CASES
from facetag.layers import residual
from facetag.layers.residual import Add, AddFn, ZeroPadAdd, ZeroPadAddFn, add, zero_pad_add

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 4), (4, 8, 7, 7)]  # batch 1 and odd sizes
# (x, skip) pairs as dlib's network has them, and the other ways round.
PAIRS = [
    ((2, 3, 4, 4), (2, 3, 4, 4)),
    ((2, 4, 3, 3), (2, 2, 3, 3)),  # down block at 35 and 17 px: fewer skip channels
    ((2, 4, 3, 3), (2, 2, 4, 4)),  # down block at 8 px: the skip is larger too
    ((1, 4, 1, 1), (1, 2, 2, 2)),  # the last down block
    ((2, 2, 3, 2), (2, 3, 2, 4)),
]


def _pair(x_shape, skip_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(x_shape, generator=g, dtype=dtype, requires_grad=True),
        torch.randn(skip_shape, generator=g, dtype=dtype, requires_grad=True),
    )


def _padded_sum(x, skip):
    C, H, W = (max(a, b) for a, b in zip(x.shape[1:], skip.shape[1:], strict=True))

    def pad(t):
        return F.pad(t, (0, W - t.shape[3], 0, H - t.shape[2], 0, C - t.shape[1]))

    return pad(x) + pad(skip)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_residual_case(case):
    result = run_case(case)
    assert result.passed, result


@pytest.mark.parametrize("shape", SHAPES)
def test_add_gradcheck(shape):
    assert gradcheck(AddFn.apply, _pair(shape, shape, torch.float64))


@pytest.mark.parametrize(("x_shape", "skip_shape"), PAIRS)
def test_zero_pad_add_gradcheck(x_shape, skip_shape):
    assert gradcheck(ZeroPadAddFn.apply, _pair(x_shape, skip_shape, torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_add_matches_reference(shape):
    ours = _pair(shape, shape, torch.float32)
    ref = [t.detach().clone().requires_grad_() for t in ours]
    out = add(*ours)
    expected = ref[0] + ref[1]
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(("x_shape", "skip_shape"), PAIRS)
def test_zero_pad_add_matches_reference(x_shape, skip_shape):
    ours = _pair(x_shape, skip_shape, torch.float32)
    ref = [t.detach().clone().requires_grad_() for t in ours]
    out = zero_pad_add(*ours)
    expected = _padded_sum(*ref)
    grad_out = torch.randn_like(out)  # random: all-ones would hide a wrong crop
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_zero_pad_add_is_dlibs_add_prev():
    # dlib's tt::add: the output has the larger size in each dimension and every element
    # one input lacks counts as 0. A 3x3 main path with 4 channels plus a 4x4 skip with 2.
    x = torch.ones(1, 4, 3, 3)
    skip = torch.full((1, 2, 4, 4), 10.0)
    y = zero_pad_add(x, skip)
    assert y.shape == (1, 4, 4, 4)
    assert torch.equal(y[0, :2, :3, :3], torch.full((2, 3, 3), 11.0))  # both
    assert torch.equal(y[0, :2, 3, :], torch.full((2, 4), 10.0))  # the skip's last row alone
    assert torch.equal(y[0, 2:, :3, :3], torch.ones(2, 3, 3))  # x alone
    assert torch.equal(y[0, 2:, 3, :], torch.zeros(2, 4))  # neither


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_zero_pad_add_keeps_the_layouts(memory_format):
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=memory_format).requires_grad_()
    skip = torch.randn(2, 2, 4, 4).contiguous(memory_format=memory_format).requires_grad_()
    y = zero_pad_add(x, skip)
    assert y.is_contiguous(memory_format=memory_format)
    y.backward(torch.randn(y.shape).contiguous(memory_format=memory_format))
    assert x.grad.is_contiguous(memory_format=memory_format)
    assert skip.grad.is_contiguous(memory_format=memory_format)


def test_residual_modules():
    x, skip = torch.randn(2, 4, 3, 3), torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(ZeroPadAdd()(x, skip), _padded_sum(x, skip))
    torch.testing.assert_close(Add()(x, x), 2 * x)


def test_residual_functions_lists_every_function():
    assert (AddFn, ZeroPadAddFn) == residual.FUNCTIONS


def test_add_rejects_different_shapes():
    with pytest.raises(ValueError, match=r"add: expected x and skip of the same shape.*zero_pad"):
        add(torch.zeros(2, 4, 3, 3), torch.zeros(2, 2, 3, 3))


def test_add_rejects_2d_input():
    with pytest.raises(ValueError, match=r"add: expected x of shape \(N, C, H, W\)"):
        add(torch.zeros(3, 4), torch.zeros(3, 4))


def test_zero_pad_add_rejects_different_batch_sizes():
    with pytest.raises(ValueError, match=r"zero_pad_add: expected x and skip with the same batch"):
        zero_pad_add(torch.zeros(2, 4, 3, 3), torch.zeros(1, 4, 3, 3))


def test_zero_pad_add_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match=r"zero_pad_add: expected skip on x's torch.float32"):
        zero_pad_add(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 3, dtype=torch.float64))
