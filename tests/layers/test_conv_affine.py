"""Fused convolution + per-channel affine: gradients, the torch reference, what it saves,
errors."""

import pytest
import torch

from facetag.gradcheck.conv_affine import CASES
from facetag.gradcheck.core import run_case
from facetag.layers.conv_affine import conv_affine


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conv_affine_case(case):  # float64 finite differences and gradcheck; float32 torch
    result = run_case(case)
    assert result.passed, result


def test_conv_affine_keeps_only_its_input_not_the_conv_output():
    # The separate pair keeps the conv's output z for the affine's gamma gradient; the fused
    # op recomputes nothing and keeps x and the parameters alone.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, requires_grad=True)
    b, gamma, beta = (torch.randn(4, generator=g, requires_grad=True) for _ in range(3))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv_affine(x, w, b, gamma, beta, padding=1)
    assert y.shape == (2, 4, 8, 8)
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), w.numel(), 4, 4])


def test_conv_affine_gamma_gradient_is_the_inner_product_with_the_weight_gradient():
    # A known answer: x all ones, a 1x1 kernel, no padding: z[n, f] = sum_c W[f, c] + b[f]
    # at every position, so dL/dgamma[f] for L = sum(y) is N * H * W * (sum_c W[f, c] + b[f]).
    x = torch.ones(2, 3, 4, 5)
    w = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]).view(2, 3, 1, 1).requires_grad_()
    b = torch.tensor([0.5, -2.0], requires_grad=True)
    gamma = torch.tensor([2.0, 3.0], requires_grad=True)
    beta = torch.zeros(2, requires_grad=True)
    conv_affine(x, w, b, gamma, beta).sum().backward()
    positions = 2 * 4 * 5
    assert gamma.grad is not None
    assert beta.grad is not None
    torch.testing.assert_close(gamma.grad, torch.tensor([6.5, -2.5]) * positions)
    torch.testing.assert_close(beta.grad, torch.full((2,), float(positions)))
    torch.testing.assert_close(b.grad, gamma.detach() * positions)


def test_conv_affine_rejects_gamma_of_the_wrong_size():
    x, w = torch.zeros(1, 3, 5, 5), torch.zeros(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"conv_affine: expected gamma and beta of shape \(4,\)"):
        conv_affine(x, w, None, torch.ones(3), torch.zeros(4))


def test_conv_affine_checks_the_convolution_like_conv2d():
    with pytest.raises(ValueError, match=r"conv_affine: expected x of shape \(N, C, H, W\)"):
        conv_affine(
            torch.zeros(3, 5, 5), torch.zeros(4, 3, 3, 3), None, torch.ones(4), torch.zeros(4)
        )


def test_conv_affine_rejects_gamma_of_another_dtype():
    x, w = torch.zeros(1, 3, 5, 5), torch.zeros(4, 3, 3, 3)
    gamma = torch.ones(4, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"conv_affine: expected bias, gamma and beta on x's torch.float32"
    ):
        conv_affine(x, w, None, gamma, torch.zeros(4))
