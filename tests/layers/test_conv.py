"""Conv2d: gradients (cases), the module against nn.Conv2d, layouts, memory, errors."""

import pytest
import torch
from torch import nn

from facetag.gradcheck.conv import CASES
from facetag.gradcheck.core import run_case
from facetag.layers import conv, conv_fast
from facetag.layers.conv import Conv2d, Conv2dFn, conv2d, conv2d_grad_weight, conv2d_grad_x

LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conv2d_case(case):
    result = run_case(case)
    assert result.passed, result


def _pair_of_modules(memory_format=torch.contiguous_format, **kw):
    """(ours, torch's twin) with the same parameters."""
    twin = nn.Conv2d(**kw).to(memory_format=memory_format)
    ours = Conv2d(**kw).to(memory_format=memory_format)
    ours.load_state_dict(twin.state_dict())
    return ours, twin


def _step(module, x, grad_out):
    """(y, grad_x, grad_weight, grad_bias) of one forward + backward on a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(x.requires_grad)
    module.zero_grad(set_to_none=True)
    y = module(leaf)
    y.backward(grad_out)
    bias_grad = None if module.bias is None else module.bias.grad
    return y, leaf.grad, module.weight.grad, bias_grad


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize(
    "kw",
    [
        {"in_channels": 3, "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"in_channels": 16, "out_channels": 8, "kernel_size": 3, "stride": 2, "bias": False},
        {"in_channels": 8, "out_channels": 16, "kernel_size": (3, 2), "dilation": (1, 2)},
        {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "groups": 8, "padding": 1},
        {"in_channels": 8, "out_channels": 12, "kernel_size": 3, "groups": 4, "padding": "same"},
    ],
    ids=["k3-pad1", "stride2-nobias", "rect-dilation", "depthwise", "groups4-same"],
)
def test_conv2d_module_matches_torch(memory_format, kw):
    # float32, a realistic size: output and all three gradients against nn.Conv2d, and the
    # gradients keep the input's memory format as torch's do.
    torch.manual_seed(0)
    ours, twin = _pair_of_modules(memory_format, **kw)
    x = torch.randn(4, kw["in_channels"], 13, 12).contiguous(memory_format=memory_format)
    x.requires_grad_()
    grad_out = torch.randn_like(twin(x)).contiguous(memory_format=memory_format)
    got, expected = _step(ours, x, grad_out), _step(twin, x, grad_out)
    for a, b in zip(got, expected, strict=True):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert got[0].is_contiguous(memory_format=memory_format)
    assert got[1].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("method", ["im2col", "corr"])
@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("block_bytes", [4096, 40_000], ids=["image-rows", "several-images"])
def test_conv2d_grad_weight_blocks_sum_like_torch(monkeypatch, method, memory_format, block_bytes):
    # Small blocks: the im2col loop splits an image into row slices (4 KiB) or groups
    # several images (40 kB) per matmul; every block must be counted once.
    monkeypatch.setattr(conv_fast, "IM2COL_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, 9, 7, generator=g).contiguous(memory_format=memory_format)
    weight = torch.randn(8, 8, 3, 3, generator=g)
    grad_out = torch.randn(5, 8, 5, 4, generator=g).contiguous(memory_format=memory_format)
    got = conv2d_grad_weight(grad_out, x, weight.shape, (2, 2), (1, 1), (1, 1), 2, method=method)
    expected = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, 2, 1, 1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("block_bytes", [1, 1 << 20], ids=["image-per-block", "one-block"])
@pytest.mark.parametrize(("H", "W", "padding"), [(9, 7, 1), (8, 8, 0)])
def test_conv2d_grad_weight_winograd_matches_torch(
    monkeypatch, memory_format, block_bytes, H, W, padding
):
    # Plain tensors (no autograd recording), as in the backward: Winograd takes its
    # one-pass out= branch here (the gradchecks differentiate it and take the other).
    monkeypatch.setattr(conv_fast, "WINOGRAD_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, H, W, generator=g).contiguous(memory_format=memory_format)
    out = H + 2 * padding - 2
    grad_out = torch.randn(5, 8, out, W + 2 * padding - 2, generator=g)
    grad_out = grad_out.contiguous(memory_format=memory_format)
    args = (grad_out, x, (8, 64, 3, 3), (1, 1), (padding, padding), (1, 1), 1)
    got = conv2d_grad_weight(*args, method="winograd")
    expected = torch.nn.grad.conv2d_weight(x, (8, 64, 3, 3), grad_out, 1, padding)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_conv2d_grad_weight_auto_takes_torchs_kernel_on_the_cpu(monkeypatch):
    calls = []
    for name in ("grad_weight_kernel", "grad_weight_corr", "grad_weight_im2col"):
        monkeypatch.setattr(conv, name, lambda *a, name=name: calls.append(name))
    monkeypatch.setattr(conv, "grad_weight_winograd", lambda *a: calls.append("winograd"))
    for C, side, stride in [(3, 96, 1), (64, 200, 1), (64, 200, 2), (256, 60, 1)]:
        out = (side - 1) // stride + 1
        conv2d_grad_weight(torch.zeros(1, 4, out, out), torch.zeros(1, C, side, side),
                           (4, C, 3, 3), (stride, stride), (1, 1), (1, 1), 1)  # fmt: skip
    assert calls == ["grad_weight_kernel"] * 4


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_conv2d_grad_weight_every_method_agrees_with_the_reference_correlation(memory_format):
    # The kernel evaluates the formula of grad_weight_corr; each formulation must agree.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 10, 9, generator=g).contiguous(memory_format=memory_format)
    grad_out = torch.randn(4, 8, 10, 9, generator=g).contiguous(memory_format=memory_format)
    args = (grad_out, x, (8, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    expected = conv2d_grad_weight(*args, method="corr")
    for method in ("kernel", "im2col", "winograd", "auto"):
        got = conv2d_grad_weight(*args, method=method)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=method)


def test_conv2d_grad_weight_rejects_winograd_for_strided_conv():
    with pytest.raises(ValueError, match="expected a 3x3 kernel, stride 1, dilation 1"):
        conv2d_grad_weight(
            torch.zeros(1, 2, 2, 2),
            torch.zeros(1, 1, 5, 5),
            (2, 1, 3, 3),
            (2, 2),
            (0, 0),
            (1, 1),
            1,
            method="winograd",
        )


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_conv2d_grad_weight_im2col_large_images_like_torch(monkeypatch, memory_format):
    # From 1024 output positions an NCHW grad_out is taken one image per block (a view)
    # even when the block budget would hold several.
    monkeypatch.setattr(conv_fast, "IM2COL_BLOCK_BYTES", 1 << 20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 32, 33, generator=g).contiguous(memory_format=memory_format)
    grad_out = torch.randn(3, 5, 32, 33, generator=g)
    got = conv2d_grad_weight(grad_out, x, (5, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, method="im2col")
    expected = torch.nn.grad.conv2d_weight(x, (5, 4, 3, 3), grad_out, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["im2col", "winograd"])
def test_conv2d_grad_weight_is_differentiable_over_several_blocks(monkeypatch, method):
    # Under autograd (only when the gradient function itself is checked) the blocks must
    # not share buffers, since each block's matmul keeps its operands for the backward.
    monkeypatch.setattr(conv_fast, "IM2COL_BLOCK_BYTES", 1)
    monkeypatch.setattr(conv_fast, "WINOGRAD_BLOCK_BYTES", 1)
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(go, xx):
        return conv2d_grad_weight(go, xx, (2, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1, method=method)

    assert torch.autograd.gradcheck(fn, (grad_out, x))


def test_conv2d_grad_weight_mixed_layouts():
    # A channels_last x with an NCHW grad_out (and the reverse) still agrees with torch.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 6, 6, generator=g)
    grad_out = torch.randn(3, 4, 6, 6, generator=g)
    expected = torch.nn.grad.conv2d_weight(x, (4, 8, 3, 3), grad_out, 1, 1)
    cl = torch.channels_last
    for xx, gg in (
        (x.contiguous(memory_format=cl), grad_out),
        (x, grad_out.contiguous(memory_format=cl)),
    ):
        got = conv2d_grad_weight(gg, xx, (4, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_conv2d_grad_x_recovers_rows_the_stride_skips():
    # H = 8, K = 3, S = 3: windows start at rows 0 and 3, so rows 6 and 7 (and columns) meet
    # no window; their gradient is 0 and grad_x still has x's full shape.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=g)
    grad_out = torch.randn(2, 4, 2, 2, generator=g)
    got = conv2d_grad_x(grad_out, weight, (2, 3, 8, 8), (3, 3), (0, 0), (1, 1), 1)
    expected = torch.nn.grad.conv2d_input((2, 3, 8, 8), weight, grad_out, 3)
    assert got.shape == (2, 3, 8, 8)
    torch.testing.assert_close(got, expected)
    assert not got[:, :, 6:, :].any()
    assert not got[:, :, :, 6:].any()
    assert got[:, :, :6, :6].abs().min() > 0


def test_conv2d_expanded_grad_out_like_torch():
    # y.sum() hands the backward an expanded (stride 0) grad_out.
    torch.manual_seed(0)
    ours, twin = _pair_of_modules(in_channels=3, out_channels=4, kernel_size=3)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    ours(x).sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    twin(x).sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(ours.weight.grad, twin.weight.grad)
    torch.testing.assert_close(ours.bias.grad, twin.bias.grad)


def test_conv2d_skips_grad_x_for_the_input_image(monkeypatch):
    # The first layer's x is the image batch: the backward must not compute its gradient.
    def fail(*args, **kwargs):
        raise AssertionError("conv2d_grad_x called for an x that needs no gradient")

    monkeypatch.setattr(conv, "conv2d_grad_x", fail)
    layer = Conv2d(3, 4, 3, padding=1)
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert layer.weight.grad is not None


def test_conv2d_saves_only_x_and_weight():
    # Memory: the forward keeps x and the weight for the backward, nothing else.
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    layer = Conv2d(3, 4, 3, padding=1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), layer.weight.data_ptr()]
    assert type(y.grad_fn).__name__ == "Conv2dFnBackward"
    assert (Conv2dFn,) == conv.FUNCTIONS


def test_conv2d_init_and_state_dict_match_torch():
    torch.manual_seed(3)
    twin = nn.Conv2d(6, 4, (3, 5), groups=2)
    torch.manual_seed(3)
    ours = Conv2d(6, 4, (3, 5), groups=2)
    assert list(ours.state_dict()) == list(twin.state_dict()) == ["weight", "bias"]
    assert torch.equal(ours.weight, twin.weight)
    assert torch.equal(ours.bias, twin.bias)
    twin.load_state_dict(Conv2d(6, 4, (3, 5), groups=2, bias=True).state_dict())
    assert list(Conv2d(3, 4, 3, bias=False).state_dict()) == ["weight"]
    assert repr(ours) == repr(twin)
    kw = {"stride": 2, "padding": 1, "dilation": 2, "bias": False}
    assert repr(Conv2d(3, 4, 3, **kw)) == repr(nn.Conv2d(3, 4, 3, **kw))


def test_conv2d_float64_module_gradcheck():
    layer = Conv2d(2, 3, 3, stride=2, padding=1, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_conv2d_rejects_3d_input():
    with pytest.raises(ValueError, match=r"conv2d: expected x of shape \(N, C, H, W\)"):
        conv2d(torch.zeros(3, 5, 5), torch.zeros(4, 3, 3, 3))


def test_conv2d_rejects_channel_mismatch():
    with pytest.raises(
        ValueError, match=r"conv2d: expected x with weight.shape\[1\] \* groups = 3"
    ):
        conv2d(torch.zeros(2, 1, 5, 5), torch.zeros(4, 3, 3, 3))


def test_conv2d_rejects_groups_not_dividing_filters():
    with pytest.raises(ValueError, match="divisible by groups = 2"):
        conv2d(torch.zeros(2, 4, 5, 5), torch.zeros(3, 2, 3, 3), groups=2)


def test_conv2d_rejects_bad_arguments():
    x, w = torch.zeros(1, 3, 5, 5), torch.zeros(4, 3, 3, 3)
    with pytest.raises(ValueError, match="conv2d: expected stride and dilation >= 1"):
        conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="conv2d: expected stride to be an int or a pair"):
        conv2d(x, w, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="conv2d: expected padding >= 0"):
        conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="conv2d: expected padding 'same', 'valid'"):
        conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="conv2d: expected stride 1 with padding='same'"):
        conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="conv2d: expected groups to be an int >= 1"):
        conv2d(x, w, groups=0)
    with pytest.raises(ValueError, match=r"conv2d: expected bias of shape \(4,\)"):
        conv2d(x, w, torch.zeros(3))
    with pytest.raises(ValueError, match=r"conv2d: expected weight on x's torch\.float32"):
        conv2d(x, w.double())
    with pytest.raises(ValueError, match="conv2d: expected an output of at least 1x1, got 0x0"):
        conv2d(torch.zeros(1, 3, 2, 2), w)


def test_conv2d_module_rejects_padding_mode_and_groups():
    with pytest.raises(ValueError, match="Conv2d: expected padding_mode 'zeros', got 'reflect'"):
        Conv2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="Conv2d: expected in_channels and out_channels divisible"):
        Conv2d(3, 4, 3, groups=2)


def test_conv2d_grad_weight_rejects_unknown_method():
    with pytest.raises(ValueError, match="conv2d_grad_weight: expected method in"):
        conv2d_grad_weight(
            torch.zeros(1, 2, 3, 3),
            torch.zeros(1, 1, 3, 3),
            (2, 1, 1, 1),
            (1, 1),
            (0, 0),
            (1, 1),
            1,
            method="fft",
        )
