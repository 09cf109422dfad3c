"""Flatten: gradients, views versus copies, module, errors."""

import pytest
import torch
from torch import nn

from facetag.gradcheck.core import run_case
from facetag.gradcheck.shape import CASES
from facetag.layers import shape
from facetag.layers.shape import Flatten, flatten


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flatten_case(case):
    result = run_case(case)
    assert result.passed, result


def test_flatten_contiguous_input_gives_a_view():
    x = torch.randn(2, 3, 4, 5)
    assert flatten(x).data_ptr() == x.data_ptr()


def test_flatten_channels_last_matches_torch_order():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(flatten(x), torch.flatten(x, 1), rtol=0, atol=0)


def test_flatten_scalar_becomes_one_element():
    x = torch.tensor(3.0, requires_grad=True)
    y = flatten(x, 0)
    assert y.shape == (1,)
    y.backward(torch.tensor([2.0]))
    assert x.grad.shape == ()
    assert x.grad.item() == 2.0


def test_flatten_module_matches_torch():
    ours, twin = Flatten(), nn.Flatten()
    x = torch.randn(4, 8, 3, 3)
    assert torch.equal(ours(x), twin(x))
    assert (ours.start_dim, ours.end_dim) == (twin.start_dim, twin.end_dim)
    assert repr(ours) == "Flatten(start_dim=1, end_dim=-1)"


def test_flatten_functions_lists_every_function():
    assert (shape.FlattenFn,) == shape.FUNCTIONS


def test_flatten_rejects_dim_out_of_range():
    with pytest.raises(ValueError, match=r"flatten: expected start_dim and end_dim in \[-2, 1\]"):
        flatten(torch.zeros(2, 3), 2)


def test_flatten_rejects_start_after_end():
    with pytest.raises(ValueError, match=r"flatten: expected start_dim <= end_dim"):
        flatten(torch.zeros(2, 3, 4), 2, 1)
