"""2-D convolution (cross-correlation, as torch) with a hand-written backward.

x (N, C, H, W), weight (F, C/groups, KH, KW), optional bias (F,) -> y (N, F, H_out, W_out):

    y[n, f, i, j] = bias[f] + sum_{c in f's group, u, v}
                    weight[f, c, u, v] * x_pad[n, c, i*S + u*D, j*S + v*D]
    H_out = (H + 2*P - D*(KH - 1) - 1) // S + 1          (W_out likewise)

with S the stride, P the zero padding and D the dilation of each spatial dimension. The
forward is F.conv2d (autograd is off inside Function.forward). The backward is ours:

- grad_x is a transposed convolution of grad_out with the same weight
  (``conv2d_grad_x``): every x element receives grad_out times each weight it met;
- grad_weight is a correlation of x with grad_out, summed over the batch
  (``conv2d_grad_weight``). The formula is ours and written out three ways (one
  convolution with batch and channels swapped; blocked im2col + matmul; Winograd
  F(2x2, 3x3)); on the CPU it is evaluated by torch's kernel for exactly this
  correlation (oneDNN's weight-gradient primitive), 2-4x faster than any of the three,
  and on CUDA by the swapped convolution (that function says why);
- grad_bias sums grad_out over (N, H_out, W_out).

Both gradient functions are plain functions so that a fused op (conv + batch norm) can
call them, and facetag.gradcheck.conv checks them on their own as well.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from facetag.layers._util import (
    IntPair,
    Pair,
    init_like_torch,
    memory_format,
    pair,
    weight_and_bias,
)
from facetag.layers.conv_fast import (
    grad_weight_im2col,
    grad_weight_winograd,
    winograd_applies,
)

GRAD_WEIGHT_METHODS = ("auto", "kernel", "im2col", "winograd", "corr")


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """H_out = (H + 2*P - D*(K - 1) - 1) // S + 1 along one dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_grad_x(
    grad_out: Tensor,
    weight: Tensor,
    x_shape: tuple[int, ...],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """dL/dx of a convolution: grad_out (N, F, H_out, W_out), weight (F, C/groups, KH, KW)
    -> grad_x (N, C, H, W) = x_shape, in the given memory format.

    x[n, c, h, w] enters y[n, f, i, j] through weight[f, c, u, v] wherever
    h = i*S + u*D - P, so grad_x[n, c, h, w] = sum_{f, i, j} grad_out[n, f, i, j] *
    weight[f, c, u, v] over those (i, u): that is a transposed convolution of grad_out with
    the same weight, stride and dilation. Its natural output is (H_out - 1)*S - 2P +
    D*(KH - 1) + 1 rows, which misses the last (H + 2P - D*(KH - 1) - 1) % S rows of x when
    the stride skipped them; output_padding adds them back (they get zero gradient).
    """
    H, W = x_shape[2], x_shape[3]
    H_out, W_out = grad_out.shape[2], grad_out.shape[3]
    KH, KW = weight.shape[2], weight.shape[3]
    output_padding = (
        H - ((H_out - 1) * stride[0] - 2 * padding[0] + dilation[0] * (KH - 1) + 1),
        W - ((W_out - 1) * stride[1] - 2 * padding[1] + dilation[1] * (KW - 1) + 1),
    )
    grad_x = F.conv_transpose2d(
        grad_out, weight, None, stride, padding, output_padding, groups, dilation
    )  # (N, C, H, W)
    return grad_x.contiguous(memory_format=memory_format)


def grad_weight_corr(
    grad_out: Tensor,
    x: Tensor,
    weight_shape: tuple[int, ...],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Tensor:
    """grad_weight as one convolution: x with batch and channels swapped, grad_out as kernel.

    grad_weight[f, c, u, v] = sum_{n, i, j} grad_out[n, f, i, j] * x_pad[n, c, i*S + u*D,
    j*S + v*D] is a correlation over (n, i, j), so conv2d(input=x^T (C, N, H, W),
    weight=grad_out^T (F, N, H_out, W_out)) gives it, with stride D and dilation S swapped;
    its output can be a few taps larger than K when the stride skipped the last rows, and
    those are cropped. Groups: the input channels become (group, n) so that group g only
    meets grad_out's group g.
    """
    N, _, H, W = x.shape
    F_, Cg, KH, KW = weight_shape
    G, Fg = groups, F_ // groups
    H_out, W_out = grad_out.shape[2], grad_out.shape[3]
    xt = x.unflatten(1, (G, Cg)).permute(2, 1, 0, 3, 4).reshape(Cg, G * N, H, W)  # (Cg, G*N, H, W)
    gt = grad_out.unflatten(1, (G, Fg)).transpose(0, 1).transpose(1, 2)  # (G, Fg, N, H_out, W_out)
    gt = gt.reshape(F_, N, H_out, W_out)  # (F, N, H_out, W_out)
    out = F.conv2d(xt, gt, None, dilation, padding, stride, G)  # (Cg, F, >= KH, >= KW)
    return out[:, :, :KH, :KW].transpose(0, 1).contiguous()  # (F, Cg, KH, KW)


def grad_weight_kernel(
    grad_out: Tensor,
    x: Tensor,
    weight_shape: tuple[int, ...],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Tensor:
    """The same correlation (grad_weight_corr's formula) evaluated by torch's kernel for it,
    torch.nn.grad.conv2d_weight: oneDNN's weight-gradient primitive on the CPU, which
    reduces over (n, i, j) in its own blocked layouts with one call's threads, where
    grad_weight_corr must first re-block grad_out as a kernel and our blocked paths issue
    a call per block (experiments/LOG.md: 2-4x faster, and no stalls on a busy machine).
    """
    from torch.nn.grad import conv2d_weight

    grad_weight: Tensor = conv2d_weight(
        x, weight_shape, grad_out, stride, padding, dilation, groups
    )
    return grad_weight


def conv2d_grad_weight(
    grad_out: Tensor,
    x: Tensor,
    weight_shape: tuple[int, ...],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    method: str = "auto",
) -> Tensor:
    """dL/dweight of a convolution: grad_out (N, F, H_out, W_out), x (N, C, H, W)
    -> grad_weight (F, C/groups, KH, KW) = weight_shape.

    Methods (all exact up to float rounding; experiments/bench_conv.py times them):
    - "kernel": torch's weight-gradient kernel for the correlation (grad_weight_kernel);
    - "im2col": receptive fields built a block at a time, then one matmul per block;
    - "winograd": F(2x2, 3x3) Winograd, 16/36 of the multiply-adds for a few elementwise
      passes (3x3 kernels, stride 1, dilation 1, groups 1 only);
    - "corr": one convolution with the batch as the reduced channel axis. On CPU oneDNN
      must first transpose and re-block grad_out as a kernel, which costs more than the
      convolution; on CUDA cuDNN takes it directly and a loop over blocks would be slow.
    "auto": "corr" on CUDA, "kernel" on the CPU: 2-4x faster than "im2col" and
    "winograd" on every layer of both embedders, in either layout (experiments/LOG.md),
    and one call whose threads do not stall on a busy machine. (The one case measured
    the other way: a channels-first batch of 3 channels into a 3x3 stride-1 conv, 25 ms
    against im2col's 10.5, because oneDNN re-blocks such an x per call; facetag trains
    its CNN channels_last on the CPU, where that layer takes 7.4 ms.)
    """
    if method == "auto":
        method = "corr" if grad_out.is_cuda else "kernel"
    if method == "winograd":
        if not winograd_applies(weight_shape, stride, dilation, groups):
            raise ValueError(
                "conv2d_grad_weight: expected a 3x3 kernel, stride 1, dilation 1 and groups 1 "
                f"for method 'winograd', got weight {tuple(weight_shape)}, stride={stride}, "
                f"dilation={dilation}, groups={groups}; use method 'im2col'"
            )
        return grad_weight_winograd(grad_out, x, padding)
    if method == "im2col":
        return grad_weight_im2col(grad_out, x, weight_shape, stride, padding, dilation, groups)
    if method == "corr":
        return grad_weight_corr(grad_out, x, weight_shape, stride, padding, dilation, groups)
    if method == "kernel":
        return grad_weight_kernel(grad_out, x, weight_shape, stride, padding, dilation, groups)
    raise ValueError(
        f"conv2d_grad_weight: expected method in {GRAD_WEIGHT_METHODS}, got {method!r}"
    )


class Conv2dFn(torch.autograd.Function):
    """x (N, C, H, W), weight (F, C/groups, KH, KW), bias (F,) or None -> y (N, F, H_out, W_out)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        groups: int,
    ) -> Tensor:
        # Only x and weight are saved: grad_bias needs grad_out alone.
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # (N, F, H_out, W_out)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = grad_weight = grad_bias = None
        # The first layer's x is the image batch, which needs no gradient: skip grad_x there.
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_grad_x(
                grad_out, weight, x.shape, stride, padding, dilation, groups, memory_format(x)
            )  # (N, C, H, W)
        if ctx.needs_input_grad[1]:
            grad_weight = conv2d_grad_weight(
                grad_out, x, weight.shape, stride, padding, dilation, groups
            )  # (F, C/groups, KH, KW)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))  # (F,)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _resolve_padding(
    padding: IntPair | str, kernel: Pair, dilation: Pair, stride: Pair, op: str = "conv2d"
) -> Pair:
    """Padding as a pair; "valid" is 0 and "same" keeps H_out == H (stride 1, even span)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(
                f"{op}: expected stride 1 with padding='same', got stride={stride}; "
                "give the padding as numbers"
            )
        spans = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(s % 2 for s in spans):
            raise ValueError(
                f"{op}: expected an odd dilated kernel with padding='same', got "
                f"kernel_size={kernel}, dilation={dilation}; pad the input with F.pad instead"
            )
        return (spans[0] // 2, spans[1] // 2)
    if isinstance(padding, str):
        raise ValueError(
            f"{op}: expected padding 'same', 'valid', an int or a pair of ints, got {padding!r}"
        )
    return pair(padding, op, "padding")


def check_conv_args(
    op: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: IntPair,
    padding: IntPair | str,
    dilation: IntPair,
    groups: int,
) -> tuple[Pair, Pair, Pair]:
    """conv2d's argument checks (ValueError naming ``op``), and (stride, padding, dilation)
    as pairs with padding resolved."""
    if x.ndim != 4:
        raise ValueError(f"{op}: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(
            f"{op}: expected weight of shape (F, C/groups, KH, KW), got {tuple(weight.shape)}"
        )
    S = pair(stride, op, "stride")
    D = pair(dilation, op, "dilation")
    K = (weight.shape[2], weight.shape[3])
    if min(S) < 1 or min(D) < 1:
        raise ValueError(f"{op}: expected stride and dilation >= 1, got stride={S}, dilation={D}")
    P = _resolve_padding(padding, K, D, S, op)
    if min(P) < 0:
        raise ValueError(f"{op}: expected padding >= 0, got {P}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: expected groups to be an int >= 1, got {groups!r}")
    _, C, H, W = x.shape
    F_ = weight.shape[0]
    if C % groups or F_ % groups or weight.shape[1] * groups != C:
        raise ValueError(
            f"{op}: expected x with weight.shape[1] * groups = {weight.shape[1] * groups} "
            f"channels and F = {F_} divisible by groups = {groups}, got x of shape "
            f"{tuple(x.shape)}; check in_channels and groups"
        )
    if bias is not None and tuple(bias.shape) != (F_,):
        raise ValueError(f"{op}: expected bias of shape ({F_},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"{op}: expected weight on x's {x.dtype} {x.device}, got {weight.dtype} "
            f"{weight.device}; move the module with .to(x)"
        )
    H_out = conv2d_output_size(H, K[0], S[0], P[0], D[0])
    W_out = conv2d_output_size(W, K[1], S[1], P[1], D[1])
    if H_out < 1 or W_out < 1:
        raise ValueError(
            f"{op}: expected an output of at least 1x1, got {H_out}x{W_out} for x of shape "
            f"{tuple(x.shape)} with kernel_size={K}, stride={S}, padding={P}, dilation={D}; "
            "use a larger input or more padding"
        )
    return S, P, D


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """2-D convolution, as F.conv2d, with our backward.

    x (N, C, H, W), weight (F, C/groups, KH, KW), bias (F,) or None -> y (N, F, H_out, W_out)
    with H_out = (H + 2*padding - dilation*(KH - 1) - 1) // stride + 1 (W_out likewise).
    padding may also be "valid" (0) or "same" (stride 1, odd dilated kernel).
    """
    S, P, D = check_conv_args("conv2d", x, weight, bias, stride, padding, dilation, groups)
    return cast(Tensor, Conv2dFn.apply(x, weight, bias, S, P, D, groups))  # .apply is untyped


class Conv2d(nn.Module):
    """nn.Conv2d with our backward: same constructor, parameters and initialisation.

    weight (out_channels, in_channels/groups, KH, KW) and bias (out_channels,), both drawn
    as torch draws them, so ``ours.load_state_dict(twin.state_dict())`` works both ways and
    the same seed gives the same parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair | str = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"Conv2d: expected in_channels and out_channels divisible by groups, got "
                f"in_channels={in_channels}, out_channels={out_channels}, groups={groups}"
            )
        if padding_mode != "zeros":
            raise ValueError(
                f"Conv2d: expected padding_mode 'zeros', got {padding_mode!r}; pad the input "
                "with F.pad and use padding=0"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "Conv2d", "kernel_size")
        self.stride = pair(stride, "Conv2d", "stride")
        self.padding = padding if isinstance(padding, str) else pair(padding, "Conv2d", "padding")
        self.dilation = pair(dilation, "Conv2d", "dilation")
        self.groups = groups
        self.padding_mode = padding_mode
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight: nn.Parameter
        self.bias: nn.Parameter | None
        weight_and_bias(
            self, (out_channels, in_channels // groups, *self.kernel_size), bias, factory
        )

    def reset_parameters(self) -> None:
        """torch's init (facetag.layers._util.init_like_torch)."""
        init_like_torch(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


FUNCTIONS = (Conv2dFn,)
