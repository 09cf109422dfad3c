"""BatchNorm2d followed by ReLU, LeakyReLU or PReLU, as one op.

    y = weight * (x - mean) * invstd + bias        (batch norm, see facetag.layers.norm)
    z = y if y > 0 else slope[c] * y               (ReLU: slope 0, LeakyReLU, PReLU)

Why fuse: on a CPU these layers are limited by memory traffic, and above all by fresh
allocations (a new (N, C, H, W) buffer costs a page fault per 4 KiB, several times the cost
of the arithmetic on it). torch's BatchNorm2d + PReLU allocates 2 full-size tensors in the
forward and 3 in the backward (PReLU's weight gradient is a full-size tensor before it is
summed) and keeps 2 alive between them (x for BN, y for PReLU). This op keeps only x (the
output z belongs to the next layer) and recomputes y from it in the backward.

Two ways to run the same formulas:
- eager: the plain functions below, written with in-place updates on the buffers they
  allocate (forward: 1 full-size allocation; backward: 2, plus a bool mask);
- compiled: the same functions through torch.compile, which fuses them into one pass for
  each reduction group and one elementwise pass (forward: read x twice for the statistics,
  once for z; backward: read grad_out and x once for the sums, once for grad_x; 1
  allocation each). It is used for float tensors with at least ``COMPILE_MIN_NUMEL``
  elements in a standard layout; dynamic shapes, so a new batch size does not recompile.
  If compiling fails (no C++ compiler, no triton) the op warns once and stays eager.

Parameters: BatchNormAct2d holds a facetag BatchNorm2d as ``bn`` and the activation as
``act``, so its state_dict keys are ``bn.weight, bn.bias, bn.running_mean, bn.running_var,
bn.num_batches_tracked`` and, for PReLU, ``act.weight``: load a torch twin
``nn.Sequential(nn.BatchNorm2d(C), nn.PReLU(C))`` with
``ours.bn.load_state_dict(twin[0].state_dict()); ours.act.load_state_dict(twin[1].state_dict())``.
"""

from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from facetag.layers._util import channel_view
from facetag.layers.activation import (
    LeakyReLU,
    PReLU,
    ReLU,
    leaky_relu_backward,
    prelu_input_grad,
    prelu_weight_grad,
    relu_backward,
)
from facetag.layers.compile import MaybeCompiled
from facetag.layers.norm import (
    BatchNorm2d,
    batch_norm_backward,
    batch_norm_eval_backward,
    batch_norm_stats_forward,
    centred_affine,
    check_batch_norm_args,
    running_affine,
    update_running_stats,
)

Activation = Literal["relu", "leaky_relu", "prelu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)

# Below this many elements the eager formulas are as fast and need no compile time.
COMPILE_MIN_NUMEL = 1 << 16
_COMPILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _prelu_(z: Tensor, x: Tensor, scale: Tensor, shift: Tensor, prelu_weight: Tensor) -> Tensor:
    """PReLU in place on z = y = x * scale + shift (scale, shift (C,)); returns z.

    prelu(y) = (1 - a) * relu(y) + a * y, and a * y = (a * scale) * x + a * shift comes from
    x, so the buffer never holds y and relu(y) at once: 3 in-place passes and no copy.
    """
    a = prelu_weight.expand(x.shape[1])  # (C,)
    z.relu_()
    torch.addcmul(channel_view(a * shift, x.ndim), z, channel_view(1 - a, x.ndim), out=z)
    return z.addcmul_(x, channel_view(a * scale, x.ndim))


def bn_act_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    prelu_weight: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """z = act(batch_norm(x)); x (N, C, *) -> z (N, C, *), mean, var, invstd (C,).

    With batch statistics var is the biased batch variance (for the running update);
    otherwise mean and invstd come from the running statistics and var is running_var.
    """
    if use_batch_stats:
        z, mean, var, invstd = batch_norm_stats_forward(x, weight, bias, eps)  # z holds y
    else:
        assert running_mean is not None
        assert running_var is not None
        mean, var = running_mean, running_var
        invstd = torch.rsqrt(running_var + eps)  # (C,)
        z = running_affine(x, mean, invstd, weight, bias)  # (N, C, *)
    if activation == "relu":
        z.relu_()
    elif activation == "leaky_relu":
        torch.nn.functional.leaky_relu_(z, negative_slope)
    else:
        assert prelu_weight is not None
        scale = invstd if weight is None else weight * invstd  # (C,)
        shift = -mean * scale if bias is None else bias - mean * scale  # (C,)
        _prelu_(z, x, scale, shift, prelu_weight)
    return z, mean, var, invstd


def bn_act_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    prelu_weight: Tensor | None,
    use_batch_stats: bool,
    activation: str,
    negative_slope: float,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of z = act(batch_norm(x)): the activation's backward, then batch norm's.

    grad_out, x (N, C, *); mean, invstd, weight, bias (C,); prelu_weight (P,).
    ``needs`` says which of (x, weight, bias, prelu_weight) to differentiate.
    Returns grad_x (N, C, *), grad_weight, grad_bias (C,), grad_prelu_weight (P,).
    """
    need_x, need_weight, need_bias, need_prelu = needs
    # The pre-activation y is recomputed, not saved (one tensor fewer kept alive between
    # forward and backward), with the forward's own formula so that its sign, which picks
    # the activation's gradient, is the forward's. Its buffer then takes grad_y in place.
    xc = x - channel_view(mean, x.ndim) if use_batch_stats else None  # (N, C, *): becomes grad_x

    def preactivation(out: Tensor | None = None) -> Tensor:
        if xc is not None:
            return centred_affine(xc, invstd, weight, bias, out=out)
        return running_affine(x, mean, invstd, weight, bias, out=out)

    y = preactivation()  # (N, C, *): fresh
    grad_prelu = None
    if activation == "relu":
        grad_y = relu_backward(grad_out, y, out=y)
    elif activation == "leaky_relu":
        grad_y = leaky_relu_backward(grad_out, y, negative_slope, out=y)
    else:
        assert prelu_weight is not None
        if need_prelu:  # min(y, 0) overwrites y, which one more pass brings back
            grad_prelu = prelu_weight_grad(grad_out, y, prelu_weight.numel(), scratch=y)
            preactivation(out=y)
        grad_y = prelu_input_grad(grad_out, y, prelu_weight, out=y)
    if use_batch_stats:
        grad_x, grad_weight, grad_bias = batch_norm_backward(
            grad_y, x, mean, invstd, weight, need_x, need_weight, need_bias, centred=xc
        )
    else:
        grad_x, grad_weight, grad_bias = batch_norm_eval_backward(
            grad_y, x, mean, invstd, weight, need_x, need_weight, need_bias
        )
    return grad_x, grad_weight, grad_bias, grad_prelu


_forward = MaybeCompiled(bn_act_forward, "batch_norm_act")
_backward = MaybeCompiled(bn_act_backward, "batch_norm_act")


def compile_failures() -> dict[str, str]:
    """Why compiling was turned off, per function and key; empty when it never failed."""
    return {
        f"{k.fn.__name__}[{key}]": why
        for k in (_forward, _backward)
        for key, why in k.failures.items()
    }


def _compile_key(
    x: Tensor, use_compile: bool, activation: str, use_batch_stats: bool
) -> str | None:
    """The compiled variant to use for x, or None for the eager formulas."""
    worth = (
        use_compile
        and x.numel() >= COMPILE_MIN_NUMEL
        and x.dtype in _COMPILE_DTYPES
        and x.device.type in ("cpu", "cuda")
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    )
    return f"{activation}_{'batch' if use_batch_stats else 'running'}" if worth else None


def _plain(*tensors: Tensor | None) -> list[Tensor | None]:
    """Detached views: a compiled graph guards on the argument types, so a Parameter and a
    plain tensor would compile twice (autograd is off inside a Function anyway)."""
    return [None if t is None else t.detach() for t in tensors]


class BatchNormActFn(torch.autograd.Function):
    """x (N, C, *), weight/bias (C,) or None, prelu_weight (P,) or None, running stats (C,)
    or None -> z (N, C, *). With batch statistics the running stats are updated in place."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        prelu_weight: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        use_batch_stats: bool,
        momentum: float,
        eps: float,
        activation: str,
        negative_slope: float,
        use_compile: bool,
    ) -> Tensor:
        key = _compile_key(x, use_compile, activation, use_batch_stats)
        z, mean, var, invstd = _forward(
            key,
            *_plain(x, weight, bias, prelu_weight, running_mean, running_var),
            use_batch_stats,
            eps,
            activation,
            negative_slope,
        )
        if use_batch_stats and running_mean is not None and running_var is not None:
            n = x.numel() // x.shape[1]
            update_running_stats(running_mean, running_var, mean, var, n, momentum)
        ctx.save_for_backward(x, weight, bias, prelu_weight, mean, invstd)
        ctx.use_batch_stats = use_batch_stats
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.use_compile = use_compile
        return cast(Tensor, z)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, prelu_weight, mean, invstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        key = _compile_key(x, ctx.use_compile, ctx.activation, ctx.use_batch_stats)
        if not (
            grad_out.is_contiguous() or grad_out.is_contiguous(memory_format=torch.channels_last)
        ):
            key = None
        grads = _backward(
            key,
            *_plain(grad_out, x, mean, invstd, weight, bias, prelu_weight),
            ctx.use_batch_stats,
            ctx.activation,
            ctx.negative_slope,
            needs,
        )
        return (*grads, None, None, None, None, None, None, None, None)


def batch_norm_act(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: Activation = "relu",
    negative_slope: float = 0.01,
    prelu_weight: Tensor | None = None,
    *,
    use_compile: bool = True,
) -> Tensor:
    """act(batch_norm(x, ...)) in one op; batch_norm's arguments are F.batch_norm's.

    x (N, C, *); running_mean, running_var, weight, bias (C,) or None; prelu_weight (P,)
    with P in {1, C}, only for activation="prelu" -> z (N, C, *).
    activation: "relu", "leaky_relu" (with negative_slope) or "prelu" (with prelu_weight).
    use_compile=False keeps the eager formulas even for large float tensors.
    """
    check_batch_norm_args("batch_norm_act", x, running_mean, running_var, weight, bias, training)
    C = x.shape[1]
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"batch_norm_act: expected activation in {ACTIVATIONS}, got {activation!r}"
        )
    if activation == "prelu":
        if (
            prelu_weight is None
            or prelu_weight.ndim != 1
            or prelu_weight.numel() not in (1, C)
            or prelu_weight.dtype != x.dtype
            or prelu_weight.device != x.device
        ):
            got = None if prelu_weight is None else tuple(prelu_weight.shape)
            raise ValueError(
                f"batch_norm_act: expected prelu_weight of shape (1,) or ({C},) with dtype "
                f"{x.dtype} on {x.device} for activation='prelu', got {got}"
            )
    elif prelu_weight is not None:
        raise ValueError(
            f"batch_norm_act: expected prelu_weight=None for activation={activation!r}, got a "
            f"tensor; use activation='prelu'"
        )
    return cast(
        Tensor,
        BatchNormActFn.apply(
            x,
            weight,
            bias,
            prelu_weight,
            running_mean,
            running_var,
            training,
            momentum,
            eps,
            activation,
            float(negative_slope),
            use_compile,
        ),
    )


class BatchNormAct2d(nn.Module):
    """BatchNorm2d then an activation, fused: x (N, C, H, W) -> z (N, C, H, W).

    ``bn`` is a facetag BatchNorm2d (same constructor arguments as torch's) and ``act`` the
    activation module (ReLU, LeakyReLU or PReLU), so the state_dict matches a torch
    ``nn.Sequential(BatchNorm2d, act)`` under the prefixes ``bn.`` and ``act.``.
    num_parameters is the PReLU's: None means one slope per channel (torch.nn.PReLU's own
    default is 1, a single shared slope: pass num_parameters=1 to mirror that).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: Activation = "relu",
        negative_slope: float = 0.01,
        num_parameters: int | None = None,
        init: float = 0.25,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        use_compile: bool = True,
    ) -> None:
        super().__init__()
        self.bn = BatchNorm2d(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.activation = activation
        self.act: nn.Module
        if activation == "relu":
            self.act = ReLU()
        elif activation == "leaky_relu":
            self.act = LeakyReLU(negative_slope)
        elif activation == "prelu":
            P = num_features if num_parameters is None else num_parameters
            self.act = PReLU(P, init, device=device, dtype=dtype)
        else:
            raise ValueError(
                f"BatchNormAct2d: expected activation in {ACTIVATIONS}, got {activation!r}"
            )
        self.use_compile = use_compile

    def forward(self, x: Tensor) -> Tensor:
        self.bn._check_input_dim(x)
        running_mean, running_var, use_batch_stats, momentum = self.bn.stats_args()
        negative_slope = self.act.negative_slope if isinstance(self.act, LeakyReLU) else 0.0
        prelu_weight = self.act.weight if isinstance(self.act, PReLU) else None
        return batch_norm_act(
            x,
            running_mean,
            running_var,
            self.bn.weight,
            self.bn.bias,
            use_batch_stats,
            momentum,
            self.bn.eps,
            self.activation,
            negative_slope,
            prelu_weight,
            use_compile=self.use_compile,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, use_compile={self.use_compile}"


FUNCTIONS = (BatchNormActFn,)
