"""Batch norm: gradients, running statistics and modules like torch's, memory, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facetag.gradcheck.core import TORCH_TOLERANCE, run_case
from facetag.gradcheck.norm import CASES
from facetag.layers.norm import (
    FUNCTIONS,
    BatchNorm1d,
    BatchNorm2d,
    batch_norm,
    channel_dot,
    channel_sum,
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_norm_case(case):
    result = run_case(case)
    assert result.passed, result


def _close(actual, expected):
    """Within the project's float32 tolerance against torch (relative to max(|x|, 1))."""
    scale = max(expected.abs().max().item(), 1.0)
    assert (actual - expected).abs().max().item() <= TORCH_TOLERANCE * scale


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "expanded", "1d"])
def test_channel_dot_matches_product_sum(layout):
    a, b = _randn(3, 4, 5, 6), _randn(3, 4, 5, 6, seed=1)
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded":
        b = torch.ones(1, 1, 1, 1).expand(3, 4, 5, 6)
    elif layout == "1d":
        a, b = a.view(3, 4, 30), b.view(3, 4, 30)
    expected = (a.double() * b.double()).sum(dim=(0, *range(2, a.ndim)))
    _close(channel_dot(a, b).double(), expected)
    _close(channel_sum(a).double(), a.double().sum(dim=(0, *range(2, a.ndim))))


@pytest.mark.parametrize(
    ("ours", "twin", "shape"),
    [
        (BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 5)),
        (BatchNorm1d, nn.BatchNorm1d, (6, 3)),
        (BatchNorm1d, nn.BatchNorm1d, (4, 3, 7)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_module_tracks_statistics_like_torch(ours, twin, shape, momentum):
    torch.manual_seed(0)
    a, b = ours(3, momentum=momentum), twin(3, momentum=momentum)
    assert a.state_dict().keys() == b.state_dict().keys()
    with torch.no_grad():
        b.weight.uniform_(0.5, 1.5)
        b.bias.uniform_(-1, 1)
    a.load_state_dict(b.state_dict())
    for step in range(3):
        x = _randn(*shape, seed=step)
        _close(a(x), b(x))
        assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == step + 1
        _close(a.running_mean, b.running_mean)
        _close(a.running_var, b.running_var)
    a.eval()
    b.eval()
    x = _randn(*shape, seed=9)
    _close(a(x), b(x))
    assert a.num_batches_tracked.item() == 3  # eval does not count


@pytest.mark.parametrize(
    "kwargs",
    [
        {"affine": False},
        {"bias": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
        {"eps": 1e-3, "momentum": 0.5},
    ],
    ids=repr,
)
def test_batch_norm2d_options_match_torch(kwargs):
    a, b = BatchNorm2d(3, **kwargs), nn.BatchNorm2d(3, **kwargs)
    assert repr(a) == repr(b)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    x = _randn(2, 3, 4, 4)
    _close(a(x), b(x))
    a.eval()
    b.eval()  # without running statistics eval mode still uses the batch's
    _close(a(x), b(x))


def test_batch_norm_eval_gradients_treat_statistics_as_constants():
    # In eval mode the op is a per-channel affine: grad_x = grad_out * weight * invstd.
    m = BatchNorm2d(2).eval()
    with torch.no_grad():
        m.running_var.copy_(torch.tensor([4.0, 0.25]) - m.eps)
        m.weight.copy_(torch.tensor([1.0, 3.0]))
    x = _randn(2, 2, 3, 3).requires_grad_()
    m(x).sum().backward()
    assert torch.allclose(x.grad[:, 0], torch.full((2, 3, 3), 0.5))
    assert torch.allclose(x.grad[:, 1], torch.full((2, 3, 3), 6.0))


def test_batch_norm_saves_only_its_input_at_full_size():
    x = _randn(2, 3, 4, 5).requires_grad_()
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        batch_norm(x, None, None, w, b, training=True)
    full = [t for t in saved if t is not None and t.numel() == x.numel()]
    assert len(full) == 1
    assert full[0] is x


def test_batch_norm_graph_holds_only_our_nodes():
    names = {f"{fn.__name__}Backward" for fn in FUNCTIONS}
    train, frozen = BatchNorm2d(3), BatchNorm2d(3).eval()
    out = frozen(train(_randn(2, 3, 2, 2).requires_grad_()))
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        seen.add(type(node).__name__)
        stack += [n for n, _ in node.next_functions if n is not None]
    assert seen == {"BatchNormFnBackward", "BatchNormEvalFnBackward", "AccumulateGrad"}
    assert seen <= names | {"AccumulateGrad"}


def test_batch_norm_matches_torch_on_a_large_offset_input():
    # mean 1000, std 1: the centred two-pass variance and the centred sums of the backward
    # keep float32 accurate where sum(x^2) - n * mean^2 would lose every digit.
    x = (_randn(8, 4, 16, 16) + 1000.0).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    grad = _randn(8, 4, 16, 16, seed=3)
    out = batch_norm(x, None, None, training=True)
    ref = F.batch_norm(x_ref, None, None, training=True)
    out.backward(grad)
    ref.backward(grad.double())
    _close(out.double(), ref.detach())
    _close(x.grad.double(), x_ref.grad)


def test_batch_norm2d_rejects_3d_input():
    with pytest.raises(ValueError, match=r"batch_norm2d: expected x of shape \(N, C, H, W\)"):
        BatchNorm2d(3)(torch.zeros(2, 3, 4))


def test_batch_norm1d_rejects_4d_input():
    with pytest.raises(ValueError, match=r"batch_norm1d: expected x of shape \(N, D\)"):
        BatchNorm1d(3)(torch.zeros(2, 3, 4, 4))


def test_batch_norm2d_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"batch_norm2d: expected 3 channels in dim 1"):
        BatchNorm2d(3)(torch.zeros(2, 4, 5, 5))


def test_batch_norm_rejects_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel"):
        BatchNorm1d(3)(torch.zeros(1, 3))


def test_batch_norm_rejects_half_running_statistics():
    with pytest.raises(ValueError, match=r"running_mean and running_var both given or both"):
        batch_norm(torch.zeros(2, 3), torch.zeros(3), None, training=True)


def test_batch_norm_rejects_eval_without_running_statistics():
    with pytest.raises(ValueError, match=r"expected running statistics with training=False"):
        batch_norm(torch.zeros(2, 3), None, None, training=False)


def test_batch_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match=r"batch_norm: expected weight of shape \(3,\)"):
        batch_norm(torch.zeros(2, 3), None, None, torch.ones(4), training=True)
