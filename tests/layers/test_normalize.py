"""L2 normalisation: gradients, the eps clamp (torch's convention), module, errors."""

import pytest
import torch
import torch.nn.functional as F

from facetag.gradcheck.core import run_case
from facetag.gradcheck.normalize import CASES
from facetag.layers import normalize
from facetag.layers.normalize import L2Norm, l2_normalize


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_l2_normalize_case(case):
    result = run_case(case)
    assert result.passed, result


def _grads(fn, x, grad_out):
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    out.backward(grad_out)
    return out, leaf.grad


@pytest.mark.parametrize(
    ("row", "eps"),
    [
        ([0.0, 0.0, 0.0], 1e-12),
        ([1e-13, 0.0, -1e-13], 1e-12),
        ([0.3, 0.4, 0.0], 0.5),
        ([0.3, 0.4, 0.0], 0.4),
    ],
    ids=["zero", "below-eps", "norm-equals-eps", "above-eps"],
)
def test_l2_normalize_eps_clamp_like_torch(row, eps):
    # ||(0.3, 0.4, 0)|| == 0.5 exactly: torch's clamp_min has zero gradient at the bound, so
    # there the norm is treated as the constant eps (grad_x = g / eps), and so do we.
    x = torch.tensor([row], dtype=torch.float64)
    grad_out = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    ours, grad_ours = _grads(lambda t: l2_normalize(t, eps=eps), x, grad_out)
    ref, grad_ref = _grads(lambda t: F.normalize(t, eps=eps), x, grad_out)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-15, atol=0)


def test_l2_normalize_rows_have_unit_norm():
    y = l2_normalize(torch.randn(16, 128) * 10)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(16))


def test_l2_norm_module():
    layer = L2Norm(dim=-1, eps=1e-6)
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(layer(x), F.normalize(x, dim=-1, eps=1e-6))
    assert repr(layer) == "L2Norm(dim=-1, eps=1e-06)"
    assert not list(layer.parameters())


def test_l2_normalize_functions_lists_every_function():
    assert (normalize.L2NormalizeFn,) == normalize.FUNCTIONS


def test_l2_normalize_rejects_dim_out_of_range():
    with pytest.raises(ValueError, match=r"l2_normalize: expected dim in \[-2, 1\]"):
        l2_normalize(torch.zeros(2, 3), dim=2)


def test_l2_normalize_rejects_negative_eps():
    with pytest.raises(ValueError, match=r"l2_normalize: expected eps >= 0"):
        l2_normalize(torch.ones(2, 3), eps=-1.0)
