"""Batch normalisation: BatchNorm1d on (N, D) or (N, D, L), BatchNorm2d on (N, C, H, W).

Training (batch statistics), per channel c over the n = N * H * W values x[:, c]:

    mean = sum(x) / n,  var = sum((x - mean)^2) / n  (biased),  invstd = 1 / sqrt(var + eps)
    x_hat = (x - mean) * invstd,  y = weight * x_hat + bias

and, under no_grad as torch does, running_mean += momentum * (mean - running_mean) and the
same for running_var with the unbiased variance var * n / (n - 1). Evaluation uses the
running statistics, which makes the op a per-channel affine ``y = x * scale + shift`` with a
backward of its own. Shapes are unchanged: x (N, C, *) -> y (N, C, *).

Memory: like torch, the training op saves only its input x plus (C,) statistics; every
full-size buffer it allocates is reused for its result (see ``batch_norm_backward``).
"""

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from facetag.layers._util import channel_view


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Every dim of x but the channel dim 1."""
    return (0, *range(2, x.ndim))


def channel_sum(x: Tensor) -> Tensor:
    """Sum over every dim but the channel dim 1: (N, C, *) -> (C,)."""
    return x.sum(dim=_reduce_dims(x))


def channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel dot product sum over n, * of a * b: (N, C, *), (N, C, *) -> (C,).

    For contiguous (N, C, L) tensors each (n, c) plane is one contiguous row, so the N * C
    plane dot products are a batch of (1, L) @ (L, 1) matmuls: one read of a and b and no
    (N, C, *) temporary (the product a * b would be a fresh allocation, and a fresh
    allocation costs more than the arithmetic: every page is faulted in and zeroed).
    Under torch.compile the plain product-and-sum is kept, which the compiler fuses.
    """
    if (
        a.ndim >= 3
        and a.is_contiguous()
        and b.is_contiguous()
        and a.numel() > 0
        and not torch.compiler.is_compiling()
    ):
        N, C = a.shape[:2]
        L = a.numel() // (N * C)
        planes = torch.bmm(a.view(N * C, 1, L), b.view(N * C, L, 1))  # (N*C, 1, 1)
        return planes.view(N, C).sum(0)  # (C,)
    return (a * b).sum(dim=_reduce_dims(a))


def batch_norm_stats_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalise x with its own batch statistics.

    x (N, C, *), weight and bias (C,) or None -> y (N, C, *), mean (C,), biased var (C,),
    invstd (C,). Two passes for the statistics (mean, then the sum of squares of x - mean,
    which does not cancel the way sum(x^2) - n * mean^2 does) and one in-place pass for y.
    """
    C = x.shape[1]
    n = x.numel() // C
    mean = channel_sum(x) / n  # (C,)
    y = x - channel_view(mean, x.ndim)  # (N, C, *): fresh, centred, becomes the output
    var = channel_dot(y, y) / n  # (C,)
    invstd = torch.rsqrt(var + eps)  # (C,)
    return centred_affine(y, invstd, weight, bias, out=y), mean, var, invstd


def centred_affine(
    xc: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    out: Tensor | None = None,
) -> Tensor:
    """y = xc * (weight * invstd) + bias for centred xc = x - mean (N, C, *) -> (N, C, *).

    The one formula for y, so that a backward recomputing y from xc gets the forward's
    bits (the sign of y decides an activation's gradient). ``out`` may be ``xc``.
    """
    scale = invstd if weight is None else weight * invstd  # (C,)
    if bias is None:
        return torch.mul(xc, channel_view(scale, xc.ndim), out=out)
    return torch.addcmul(channel_view(bias, xc.ndim), xc, channel_view(scale, xc.ndim), out=out)


def running_affine(
    x: Tensor,
    running_mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    out: Tensor | None = None,
) -> Tensor:
    """Eval-mode y = x * scale + shift with scale = weight * invstd and
    shift = bias - running_mean * scale, all (C,): one pass, x (N, C, *) -> y (N, C, *)."""
    scale = invstd if weight is None else weight * invstd  # (C,)
    shift = -running_mean * scale if bias is None else bias - running_mean * scale  # (C,)
    return torch.addcmul(channel_view(shift, x.ndim), x, channel_view(scale, x.ndim), out=out)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, n: int, momentum: float
) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place, as torch does.

    The variance that enters the running average is the unbiased one, var * n / (n - 1).
    """
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var, alpha=momentum * n / (n - 1))


def batch_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_x: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    centred: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of training-mode batch norm (batch statistics).

    grad_out, x (N, C, *); mean, invstd, weight (C,) -> grad_x (N, C, *), grad_weight (C,),
    grad_bias (C,); each None when not needed. ``centred``, when the caller has it, is
    x - mean in a buffer this function may overwrite (it then becomes grad_x).

    With k = weight * invstd and sums over the n values of a channel:
    grad_bias = sum(g), grad_weight = sum(g * x_hat), and since mean and invstd depend on
    every x of the channel (d mean / dx = 1/n, d invstd / dx = -invstd^3 (x - mean) / n),
    grad_x = k * (g - sum(g) / n - x_hat * sum(g * x_hat) / n).
    The one full-size buffer is x - mean (fresh), which is overwritten with grad_x.
    """
    grad_x = grad_weight = grad_bias = None
    C = x.shape[1]
    n = x.numel() // C
    sum_g = channel_sum(grad_out)  # (C,)
    if need_bias:
        grad_bias = sum_g
    if not (need_x or need_weight):
        return grad_x, grad_weight, grad_bias
    xc = x - channel_view(mean, x.ndim) if centred is None else centred  # (N, C, *)
    sum_g_xhat = channel_dot(grad_out, xc) * invstd  # (C,)
    if need_weight:
        grad_weight = sum_g_xhat
    if need_x:
        k = invstd if weight is None else weight * invstd  # (C,)
        # grad_x = k * g + (-k * sum_g / n) + xc * (-k * invstd * sum_g_xhat / n)
        shift = channel_view(-k * sum_g / n, x.ndim)
        slope = channel_view(-k * invstd * sum_g_xhat / n, x.ndim)
        torch.addcmul(shift, xc, slope, out=xc)
        grad_x = xc.addcmul_(grad_out, channel_view(k, x.ndim))
    return grad_x, grad_weight, grad_bias


def batch_norm_eval_backward(
    grad_out: Tensor,
    x: Tensor,
    running_mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_x: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of eval-mode batch norm y = weight * (x - running_mean) * invstd + bias.

    The statistics are constants here, so this is a per-channel affine:
    grad_x = grad_out * weight * invstd, grad_weight = sum(g * x_hat), grad_bias = sum(g).
    grad_out, x (N, C, *); running_mean, invstd, weight (C,) -> like batch_norm_backward.
    """
    grad_x = grad_weight = grad_bias = None
    if need_x:
        k = invstd if weight is None else weight * invstd  # (C,)
        grad_x = grad_out * channel_view(k, x.ndim)  # (N, C, *)
    if need_weight:
        xc = x - channel_view(running_mean, x.ndim)  # (N, C, *)
        grad_weight = channel_dot(grad_out, xc) * invstd  # (C,)
    if need_bias:
        grad_bias = channel_sum(grad_out)  # (C,)
    return grad_x, grad_weight, grad_bias


class BatchNormFn(torch.autograd.Function):
    """Training mode: x (N, C, *), weight/bias (C,) or None, running stats (C,) or None
    (updated in place) -> y (N, C, *)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        y, mean, var, invstd = batch_norm_stats_forward(x, weight, bias, eps)
        if running_mean is not None and running_var is not None:
            n = x.numel() // x.shape[1]
            update_running_stats(running_mean, running_var, mean, var, n, momentum)
        ctx.save_for_backward(x, weight, mean, invstd)  # like torch: x, not x_hat
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = batch_norm_backward(
            grad_out, x, mean, invstd, weight, need[0], need[1], need[2]
        )
        return grad_x, grad_weight, grad_bias, None, None, None, None


class BatchNormEvalFn(torch.autograd.Function):
    """Eval mode: x (N, C, *), weight/bias (C,) or None, running stats (C,) -> y (N, C, *)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        invstd = torch.rsqrt(running_var + eps)  # (C,)
        ctx.save_for_backward(x, weight, running_mean, invstd)
        return running_affine(x, running_mean, invstd, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, running_mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = batch_norm_eval_backward(
            grad_out, x, running_mean, invstd, weight, need[0], need[1], need[2]
        )
        return grad_x, grad_weight, grad_bias, None, None, None


def check_batch_norm_args(
    op: str,
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_batch_stats: bool,
) -> None:
    """Raise ValueError, naming ``op``, for arguments batch norm cannot use."""
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(
            f"{op}: expected a floating-point x of shape (N, C, *), got {tuple(x.shape)} "
            f"of dtype {x.dtype}"
        )
    C = x.shape[1]
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and (t.shape != (C,) or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(
                f"{op}: expected {name} of shape ({C},) on {x.device} with dtype {x.dtype} "
                f"to match x of shape {tuple(x.shape)}, got {tuple(t.shape)} on {t.device} "
                f"with dtype {t.dtype}; check num_features and move the module with .to(x)"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{op}: expected running_mean and running_var both given or both None, got "
            f"only {'running_mean' if running_var is None else 'running_var'}"
        )
    if not use_batch_stats and running_mean is None:
        raise ValueError(
            f"{op}: expected running statistics with training=False, got None; pass "
            f"training=True to normalise with batch statistics"
        )
    if use_batch_stats and x.numel() // max(C, 1) <= 1:
        raise ValueError(
            f"{op}: expected more than 1 value per channel in training, got x of shape "
            f"{tuple(x.shape)}; use a larger batch or call .eval()"
        )


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch norm with torch.nn.functional.batch_norm's signature and semantics.

    x (N, C, *); running_mean, running_var, weight, bias (C,) or None -> y (N, C, *).
    training=True normalises with batch statistics and, when given, updates the running
    statistics in place with ``momentum``; training=False uses the running statistics.
    """
    check_batch_norm_args("batch_norm", x, running_mean, running_var, weight, bias, training)
    if training:
        return cast(
            Tensor, BatchNormFn.apply(x, weight, bias, running_mean, running_var, momentum, eps)
        )
    return cast(Tensor, BatchNormEvalFn.apply(x, weight, bias, running_mean, running_var, eps))


class _BatchNorm(nn.Module):
    """Shared by BatchNorm1d and BatchNorm2d; same parameters, buffers and behaviour as
    torch.nn's (momentum=None is the cumulative average over num_batches_tracked)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def _check_channels(self, op: str, x: Tensor) -> None:
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{op}: expected {self.num_features} channels in dim 1, got x of shape "
                f"{tuple(x.shape)}; set num_features to {x.shape[1]}"
            )

    def stats_args(self) -> tuple[Tensor | None, Tensor | None, bool, float]:
        """(running_mean, running_var, use_batch_stats, momentum) for this call, as torch:
        counts the batch when training with tracked statistics."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        if self.training and not self.track_running_stats:
            return None, None, use_batch_stats, momentum
        return self.running_mean, self.running_var, use_batch_stats, momentum

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        running_mean, running_var, use_batch_stats, momentum = self.stats_args()
        return batch_norm(
            x,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, D) or (N, D, L): statistics per feature D (torch.nn.BatchNorm1d)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.ndim not in (2, 3):
            raise ValueError(
                f"batch_norm1d: expected x of shape (N, D) or (N, D, L), got {tuple(x.shape)}"
            )
        self._check_channels("batch_norm1d", x)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W): statistics per channel C (torch.nn.BatchNorm2d)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"batch_norm2d: expected x of shape (N, C, H, W), got {tuple(x.shape)}"
            )
        self._check_channels("batch_norm2d", x)


FUNCTIONS = (BatchNormFn, BatchNormEvalFn)
