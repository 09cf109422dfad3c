"""Max, average and global average pooling: gradients, torch conventions, modules, errors."""

import inspect
import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facetag.gradcheck.core import run_case
from facetag.gradcheck.pool import CASES
from facetag.layers import pool
from facetag.layers.pool import (
    AvgPool2d,
    GlobalAvgPool2d,
    MaxPool2d,
    avg_pool2d,
    global_avg_pool2d,
    max_pool2d,
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pool_case(case):
    result = run_case(case)
    assert result.passed, result


def _grads(fn, x, grad_out=None):
    """(output, grad_x) of fn at a fresh leaf copy of x (its layout kept)."""
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out.to(out.dtype))
    return out, leaf.grad


LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding"), [(2, 2, 0), (3, 1, 1), (3, 2, 1), (2, 1, 0)]
)
def test_max_pool2d_ties_route_like_torch(memory_format, kernel_size, stride, padding):
    # Values from {0, 1, 2} (and whole windows of ReLU zeros) tie everywhere: torch sends
    # the gradient to the first maximum in row-major window order, and so must we.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (2, 3, 7, 8), generator=g).float()
    x[:, :, :4, :4] = 0.0
    x = x.contiguous(memory_format=memory_format)
    ours, grad_ours = _grads(lambda t: max_pool2d(t, kernel_size, stride, padding), x)
    ref, grad_ref = _grads(lambda t: F.max_pool2d(t, kernel_size, stride, padding), x)
    assert torch.equal(ours, ref)
    assert torch.equal(grad_ours, grad_ref)


def test_max_pool2d_nan_routes_like_torch():
    x = torch.arange(32.0).view(1, 2, 4, 4)
    x[0, 0, 0, 1] = float("nan")
    ours, grad_ours = _grads(lambda t: max_pool2d(t, 2), x)
    ref, grad_ref = _grads(lambda t: F.max_pool2d(t, 2), x)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    assert torch.equal(grad_ours, grad_ref)


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize(("C", "H"), [(32, 24), (64, 12), (256, 6)])
def test_max_pool2d_benchmark_shapes_match_torch(memory_format, C, H):
    # The benchmark network's MaxPool2d(2) shapes at a small batch, both layouts; the
    # gradient keeps x's layout, as torch's does.
    x = torch.randn(3, C, H, H).contiguous(memory_format=memory_format)
    ours, grad_ours = _grads(lambda t: max_pool2d(t, 2), x)
    ref, grad_ref = _grads(lambda t: F.max_pool2d(t, 2), x)
    assert torch.equal(ours, ref)
    assert torch.equal(grad_ours, grad_ref)
    assert grad_ours.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_max_pool2d_return_indices_match_torch(memory_format):
    x = torch.randn(2, 3, 7, 6).contiguous(memory_format=memory_format).requires_grad_()
    y, idx = max_pool2d(x, 3, 2, 1, return_indices=True)
    y_ref, idx_ref = F.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)
    assert torch.equal(y, y_ref)
    assert torch.equal(idx, idx_ref)
    assert not idx.requires_grad
    y.backward(torch.ones_like(y))
    # The backward must not have rewritten the indices handed to the caller.
    assert torch.equal(idx, idx_ref)
    _, grad_ref = _grads(lambda t: F.max_pool2d(t, 3, 2, 1), x, torch.ones_like(y))
    assert torch.equal(x.grad, grad_ref)


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_max_pool2d_backward_twice_accumulates(memory_format):
    # retain_graph reuses the saved argmax positions: they must survive the first backward.
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=memory_format).requires_grad_()
    y = max_pool2d(x, 2)
    grad_out = torch.randn_like(y)
    y.backward(grad_out, retain_graph=True)
    once = x.grad.clone()
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, 2 * once)


def test_max_pool2d_without_grad_matches_torch():
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(max_pool2d(x, 3, 2, 1, ceil_mode=True), F.max_pool2d(x, 3, 2, 1, 1, True))


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize(("H", "W"), [(8, 6), (9, 7), (1, 4)])
@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding"), [(2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)]
)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool2d_without_grad_needs_no_argmax_and_matches_torch(
    memory_format, H, W, kernel_size, stride, padding, ceil_mode
):
    if min(H, W) + 2 * padding < kernel_size:
        pytest.skip("no window fits")
    x = torch.randn(2, 3, H, W).contiguous(memory_format=memory_format)
    x[0, 0, 0, 0] = float("nan")  # NaN wins its windows, as in torch
    x[1, 2, :2, :2] = 5.0  # a tie
    calls = []
    real = pool.max_pool_no_argmax
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pool, "max_pool_no_argmax", lambda *a: calls.append(1) or real(*a))
        y = max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)
    assert calls == [1]  # the argmax-free path ran
    ref = F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)
    torch.testing.assert_close(y, ref, equal_nan=True)
    assert y.is_contiguous(memory_format=memory_format)
    # scratch: x may be written over (only where windows do not overlap along H), into out
    K, S, P = (kernel_size,) * 2, (stride,) * 2, (padding,) * 2
    scratch = x.clone()
    out = torch.full((3, *ref.shape), 7.0)[1]  # a slice of a larger buffer
    got = real(scratch, K, S, P, ceil_mode, scratch=True, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ref, equal_nan=True)
    if kernel_size > stride or padding:
        torch.testing.assert_close(scratch, x, equal_nan=True)  # a copy was used instead


def test_max_pool2d_with_grad_keeps_torch_pooling(monkeypatch):
    monkeypatch.setattr(pool, "max_pool_no_argmax", lambda *a: pytest.fail("argmax needed"))
    x = torch.randn(1, 2, 7, 7, requires_grad=True)
    max_pool2d(x, 2, 2, ceil_mode=True).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_avg_pool2d_matches_torch_for_every_option(memory_format):
    g = torch.Generator().manual_seed(0)
    checked = 0
    for (H, W), K, S, P, ceil_mode, count_include_pad, divisor in itertools.product(
        [(5, 5), (7, 6), (8, 8)],
        [1, 2, 3],
        [1, 2, 3],
        [0, 1],
        [False, True],
        [False, True],
        [None, 4],
    ):
        if P > K // 2:
            continue
        x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
        x = x.contiguous(memory_format=memory_format)
        args = (K, S, P, ceil_mode, count_include_pad, divisor)
        grad_out = torch.randn(F.avg_pool2d(x, *args).shape, generator=g, dtype=torch.float64)
        ours, grad_ours = _grads(lambda t, args=args: avg_pool2d(t, *args), x, grad_out)
        ref, grad_ref = _grads(lambda t, args=args: F.avg_pool2d(t, *args), x, grad_out)
        torch.testing.assert_close(ours, ref, msg=f"forward, args {args}, {(H, W)}")
        torch.testing.assert_close(grad_ours, grad_ref, msg=f"grad, args {args}, {(H, W)}")
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_global_avg_pool2d_gradient_keeps_layout(memory_format):
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=memory_format)
    ours, grad_ours = _grads(global_avg_pool2d, x)
    ref, grad_ref = _grads(lambda t: F.adaptive_avg_pool2d(t, 1).flatten(1), x)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad_ours, grad_ref)
    assert grad_ours.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize(
    ("ours", "twin"),
    [
        (MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (MaxPool2d(2), nn.MaxPool2d(2)),
        (
            AvgPool2d(3, 2, 1, count_include_pad=False),
            nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        ),
        (
            AvgPool2d(2, ceil_mode=True, divisor_override=3),
            nn.AvgPool2d(2, ceil_mode=True, divisor_override=3),
        ),
    ],
    ids=["max-k3", "max-k2", "avg-k3", "avg-k2"],
)
def test_pool_module_matches_torch(ours, twin):
    assert ours.stride == twin.stride
    assert ours.state_dict().keys() == twin.state_dict().keys()
    x = torch.randn(2, 3, 9, 8)
    out, grad = _grads(ours, x)
    out_twin, grad_twin = _grads(twin, x)
    torch.testing.assert_close(out, out_twin)
    torch.testing.assert_close(grad, grad_twin)
    assert "kernel_size=" in repr(ours)


def test_max_pool2d_module_return_indices():
    x = torch.randn(1, 2, 6, 6)
    y, idx = MaxPool2d(2, return_indices=True)(x)
    y_ref, idx_ref = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(y, y_ref)
    assert torch.equal(idx, idx_ref)


def test_global_avg_pool2d_module_shape():
    assert GlobalAvgPool2d()(torch.randn(4, 256, 6, 6)).shape == (4, 256)


def test_pool_functions_lists_every_function():
    defined = {
        obj
        for obj in vars(pool).values()
        if inspect.isclass(obj)
        and issubclass(obj, torch.autograd.Function)
        and obj.__module__ == pool.__name__
    }
    assert set(pool.FUNCTIONS) == defined


def test_max_pool2d_rejects_3d_input():
    with pytest.raises(ValueError, match=r"max_pool2d: expected x of shape \(N, C, H, W\)"):
        max_pool2d(torch.zeros(3, 8, 8), 2)


def test_max_pool2d_rejects_padding_over_half_kernel():
    with pytest.raises(ValueError, match=r"max_pool2d: expected 0 <= padding <= kernel_size // 2"):
        max_pool2d(torch.zeros(1, 1, 8, 8), 2, padding=2)


def test_max_pool2d_rejects_kernel_larger_than_input():
    with pytest.raises(ValueError, match=r"max_pool2d: expected an output of at least 1x1"):
        max_pool2d(torch.zeros(1, 1, 3, 3), 4)


def test_avg_pool2d_rejects_bad_kernel_size():
    with pytest.raises(ValueError, match=r"avg_pool2d: expected kernel_size to be an int or"):
        avg_pool2d(torch.zeros(1, 1, 8, 8), (2, 2, 2))
    with pytest.raises(ValueError, match=r"avg_pool2d: expected kernel_size, stride and dilat"):
        avg_pool2d(torch.zeros(1, 1, 8, 8), 0)


def test_avg_pool2d_rejects_zero_divisor():
    with pytest.raises(ValueError, match=r"avg_pool2d: expected divisor_override to be a non"):
        avg_pool2d(torch.zeros(1, 1, 8, 8), 2, divisor_override=0)


def test_global_avg_pool2d_rejects_2d_input():
    with pytest.raises(ValueError, match=r"global_avg_pool2d: expected x of shape \(N, C, H, W"):
        global_avg_pool2d(torch.zeros(4, 8))


BENCH_SHAPES = [(64, 32, 96, 96), (64, 64, 48, 48), (64, 128, 24, 24), (64, 256, 12, 12)]


def _paired_ratio(ours, twin, x, rounds):
    """Median over rounds of t(ours) / t(twin), forward + backward, run A B A B."""
    grad_out = torch.randn_like(twin(x))
    times = {id(ours): [], id(twin): []}
    for _ in range(rounds + 1):  # the first round warms up
        for layer in (ours, twin):
            x.grad = None
            start = time.perf_counter()
            layer(x).backward(grad_out)
            times[id(layer)].append(time.perf_counter() - start)
    ratios = sorted(a / b for a, b in zip(times[id(ours)][1:], times[id(twin)][1:], strict=True))
    return ratios[len(ratios) // 2], sorted(times[id(twin)][1:])[rounds // 2]


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_max_pool2d_speed_matches_torch(shape, memory_format):
    # The benchmark network's pools, batch 64. Timing on a shared CPU is noisy, so the
    # check is the median of per-round ratios (adjacent runs see the same load), with 15%
    # allowance for that noise. Run with -s to see the numbers.
    x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
    ratio, twin_s = _paired_ratio(MaxPool2d(2), nn.MaxPool2d(2), x, rounds=9)
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
    print(f"\nmax_pool2d {shape} {layout}: ours/torch {ratio:.2f} (torch {twin_s * 1e3:.1f} ms)")
    assert ratio < 1.15
