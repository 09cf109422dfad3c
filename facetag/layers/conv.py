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
  (``conv2d_grad_weight``): on CPU by blocked im2col + matmul, or for 3x3 stride-1 layers
  with many channels by Winograd F(2x2, 3x3) (fewer multiply-adds); on CUDA by a
  convolution with the batch and channel axes swapped (that function says why);
- grad_bias sums grad_out over (N, H_out, W_out).

Both gradient functions are plain functions so that a fused op (conv + batch norm) can
call them, and facetag.gradcheck.conv checks them on their own as well.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

IntPair = int | tuple[int, int]
Pair = tuple[int, int]

GRAD_WEIGHT_METHODS = ("auto", "im2col", "winograd", "corr")

# Bytes of im2col columns built per matmul in conv2d_grad_weight: small enough that a block
# is still in cache when the matmul reads it, large enough that the Python loop costs
# little (64 blocks for a 64x32x48x48 input). On the 2-core dev box 1-4 MiB were fastest;
# 8 MiB was up to 25% slower and one block for everything up to 2x.
IM2COL_BLOCK_BYTES = 4 << 20


def _pair(value: IntPair, op: str, name: str) -> Pair:
    """(a, b) from an int or a pair of ints; ValueError naming the op otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")
    return cast(Pair, pair)


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """H_out = (H + 2*P - D*(K - 1) - 1) // S + 1 along one dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _is_channels_last(t: Tensor) -> bool:
    """True when t is laid out (N, H, W, C) in memory and not also plain contiguous."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(t) else torch.contiguous_format


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


def _windows(x: Tensor, kernel: Pair, stride: Pair, dilation: Pair) -> Tensor:
    """Every receptive field of (already padded) x as a view: (N, C, Hp, Wp) ->
    (N, C, H_out, W_out, KH, KW), element (u, v) of window (i, j) being
    x[n, c, i*S + u*D, j*S + v*D]. Overlapping strided windows: nothing is copied.
    """
    span_h = dilation[0] * (kernel[0] - 1) + 1
    span_w = dilation[1] * (kernel[1] - 1) + 1
    win = x.unfold(2, span_h, stride[0])[..., :: dilation[0]]  # (N, C, H_out, Wp, KH)
    return win.unfold(3, span_w, stride[1])[..., :: dilation[1]]  # (N, C, H_out, W_out, KH, KW)


def _blocks(N: int, H_out: int, rows: int) -> Iterator[tuple[int, int, int, int]]:
    """(n0, n1, i0, i1) blocks of about `rows` output rows: whole images, or slices of one."""
    if rows >= H_out:
        step = rows // H_out
        for n0 in range(0, N, step):
            yield n0, min(N, n0 + step), 0, H_out
    else:
        for n in range(N):
            for i0 in range(0, H_out, rows):
                yield n, n + 1, i0, min(H_out, i0 + rows)


def _recording(*tensors: Tensor) -> bool:
    """True when autograd records ops on these tensors (a gradcheck of a gradient function
    itself; inside Conv2dFn.backward it never does). Reused buffers must then be fresh per
    block: the matmul saved the previous block's for its own backward."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _grad_weight_im2col(
    grad_out: Tensor,
    x: Tensor,
    weight_shape: tuple[int, ...],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Tensor:
    """grad_weight = sum over positions of grad_out (x) receptive field, block by block.

    With cols[(c, u, v), r] the receptive field of output position r = (n, i, j) and
    g[r, f] = grad_out[n, f, i, j], grad_weight[f, (c, u, v)] = sum_r cols[..., r] g[r, f]:
    one matmul (per group) whose inner dimension runs over all N*H_out*W_out positions.
    Materialising cols whole costs KH*KW copies of x in memory traffic; building it a few
    image rows at a time keeps each block in cache from its copy to its matmul. The zero
    padding is built per block too: the block's input rows go into a small buffer whose
    border stays zero, so x is never copied whole.

    Layouts, so that every copy moves contiguous runs and g is a view where possible:
    channels_last x with C/groups >= 8 gives cols rows (n, i, j) x (u, v, c) (runs of C
    floats) and a channels_last grad_weight; otherwise cols is (c, u, v) x (n, i, j) (runs
    of W_out floats). A channels_last grad_out is (R, F) as it lies; an NCHW one is (F, R)
    per image (a small copy per block when a block holds more).
    """
    N, C, H, W = x.shape
    F_, Cg, KH, KW = weight_shape
    G, Fg = groups, F_ // groups
    H_out, W_out = grad_out.shape[2], grad_out.shape[3]
    KKC = KH * KW * Cg
    rows_major = _is_channels_last(x) and Cg >= 8
    if not (_is_channels_last(grad_out) or grad_out.is_contiguous()):
        grad_out = grad_out.contiguous()  # e.g. the expanded ones of a .sum() upstream
    go_rows = _is_channels_last(grad_out)
    if go_rows:
        g = grad_out.permute(0, 2, 3, 1).unflatten(3, (G, Fg))  # (N, H_out, W_out, G, Fg)
    else:
        g = grad_out.unflatten(1, (G, Fg)).permute(1, 2, 0, 3, 4)  # (G, Fg, N, H_out, W_out)
    rows = max(1, IM2COL_BLOCK_BYTES // (x.element_size() * KKC * G * W_out))
    if not go_rows and rows > H_out and H_out * W_out >= 1024:
        # An NCHW grad_out block spanning several images is a copy; one image already gives
        # the matmul a long enough inner dimension, and keeps it a view.
        rows = H_out
    b_max, rows_max = max(1, rows // H_out), min(rows, H_out)  # images, output rows per block
    # Buffers reused by every block (a fresh multi-MiB tensor per block costs page faults):
    # `slab` holds a block's zero-padded input rows, `buf` its columns.
    S_h, P_h = stride[0], padding[0]
    span_h = dilation[0] * (KH - 1) + 1
    Wp = W + 2 * padding[1]
    slab_rows = (rows_max - 1) * S_h + span_h

    def buffers() -> tuple[Tensor, Tensor]:
        if rows_major:
            slab = x.new_zeros(b_max, slab_rows, Wp, C).permute(0, 3, 1, 2)  # channels_last
            return slab, x.new_empty(b_max * rows_max * W_out, G, KKC)  # (R, G, KKC)
        return x.new_zeros(b_max, C, slab_rows, Wp), x.new_empty(G, KKC, b_max * rows_max * W_out)

    slab_buf, buf = buffers()
    # Accumulate grad_weight transposed, (KKC, Fg) per group: with Fg and KKC small (the
    # first layer: 32 and 27) MKL's matmul runs 20-25% faster in this orientation.
    gw_t = grad_out.new_zeros(G, KKC, Fg)  # (G, KKC, Fg), KKC in cols' order
    for n0, n1, i0, i1 in _blocks(N, H_out, rows):
        if _recording(x, grad_out) and (n0, i0) != (0, 0):
            slab_buf, buf = buffers()  # autograd saved the last block's: no reuse
        b, R = n1 - n0, (n1 - n0) * (i1 - i0) * W_out
        r0, r1 = i0 * S_h - P_h, (i1 - 1) * S_h - P_h + span_h  # the x rows the block reads
        lo, hi = min(max(r0, 0), r1), max(min(r1, H), r0)  # of which inside x
        slab = slab_buf[:b, :, : r1 - r0]  # (b, C, r1 - r0, Wp); columns outside x stay 0
        slab[:, :, : lo - r0].zero_()
        slab[:, :, hi - r0 :].zero_()
        if hi > lo:
            slab[:, :, lo - r0 : hi - r0, padding[1] : padding[1] + W].copy_(x[n0:n1, :, lo:hi])
        win = _windows(slab, (KH, KW), stride, dilation)  # (b, C, i1 - i0, W_out, KH, KW)
        win = win.unflatten(1, (G, Cg))  # (b, G, Cg, i1 - i0, W_out, KH, KW)
        if rows_major:
            blk = buf[:R]  # (R, G, KKC)
            blk.view(b, i1 - i0, W_out, G, KH, KW, Cg).copy_(win.permute(0, 3, 4, 1, 5, 6, 2))
            cols = blk.permute(1, 2, 0)  # (G, KKC, R)
        else:
            cols = buf[:, :, :R]  # (G, KKC, R)
            cols.unflatten(1, (Cg, KH, KW)).unflatten(4, (b, i1 - i0, W_out)).copy_(
                win.permute(1, 2, 5, 6, 0, 3, 4)  # (G, Cg, KH, KW, b, i1 - i0, W_out)
            )
        if go_rows:
            g_blk = g[n0:n1, i0:i1].reshape(-1, G, Fg).transpose(0, 1)  # (G, R, Fg), a view
        else:
            g_blk = g[:, :, n0:n1, i0:i1].reshape(G, Fg, -1).transpose(1, 2)  # (G, R, Fg)
        if G == 1:
            gw_t[0].addmm_(cols[0], g_blk[0])
        else:
            gw_t.baddbmm_(cols, g_blk)
    gw = gw_t.transpose(1, 2)  # (G, Fg, KKC)
    if rows_major:
        gw = gw.reshape(F_, KH, KW, Cg)  # (F, KH, KW, Cg)
        return gw.permute(0, 3, 1, 2)  # (F, Cg, KH, KW) in channels_last
    return gw.reshape(F_, Cg, KH, KW)


# F(2x2, 3x3) Winograd matrices (Lavin & Gray 2016): for a 4x4 input tile d, 3x3 weight w
# and 2x2 output tile, y = A^T [(G w G^T) * (B^T d B)] A. Columns of A and rows of B^T are
# spelled out as the sums in _grad_weight_winograd; G is used as a matrix at the end. The
# last row of G is negated because that function stores the 4th row of A g A^T as +g1
# (A's is -g1), which saves a pass.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, -1.0))

# Bytes of transformed tiles (both operands) built per batched matmul in the Winograd path.
WINOGRAD_BLOCK_BYTES = 8 << 20
# "auto" uses Winograd from this many input channels: in experiments/bench_conv.py it beat
# im2col from the 64 -> 128 layer on (by 10-30%) and lost below (32 -> 64: by 5-10%).
WINOGRAD_MIN_C = 64


def _combine(out: Tensor, a: Tensor, b: Tensor | None = None, alpha: float = 1.0) -> None:
    """out = a + alpha * b (or out = a) in one pass over a preallocated buffer.

    NOTE: torch's out= variants are not differentiable; when autograd records (a gradcheck
    of conv2d_grad_weight itself, never inside the backward) copy + in-place add is used.
    """
    if b is None:
        out.copy_(a)
    elif _recording(a, b):
        out.copy_(a).add_(b, alpha=alpha)
    else:
        torch.add(a, b, alpha=alpha, out=out)


def _grad_weight_winograd(grad_out: Tensor, x: Tensor, padding: Pair) -> Tensor:
    """grad_weight of a 3x3, stride-1, undilated, ungrouped conv by Winograd F(2x2, 3x3).

    y is linear in w: y = A^T [(G w G^T) * V] A per tile, with V = B^T d B, so
    dL/dw = G^T [(A g A^T) * V] G for the tile's 2x2 grad_out g, and over all tiles and
    channel pairs: grad_weight[f, c] = G^T M[:, :, f, c] G with
    M[s, t, f, c] = sum_tiles U[s, t, tile, f] * V[s, t, tile, c], U = A g A^T.
    That is 16 matmuls of (F, tiles) @ (tiles, C): 16/36 of the multiply-adds of the direct
    correlation, for a few elementwise passes that build U and V a few images at a time.
    An odd H_out or W_out is padded with zero grad_out (and x with a zero row or column);
    x is zero-padded a block of images at a time, in a reused buffer.
    """
    N, C = x.shape[0], x.shape[1]
    F_, H_out, W_out = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
    A, B = (H_out + 1) // 2, (W_out + 1) // 2  # tiles down and across
    eh, ew = 2 * A - H_out, 2 * B - W_out
    if eh or ew:
        grad_out = F.pad(grad_out, (0, ew, 0, eh))  # (N, F, 2A, 2B)
    H, W = x.shape[2], x.shape[3]
    Hp, Wp = 2 * A + 2, 2 * B + 2  # = H + 2P (+1 when H_out is odd)
    cl = _is_channels_last(grad_out)
    g6 = grad_out.unflatten(2, (A, 2)).unflatten(4, (B, 2))  # (N, F, A, 2, B, 2)
    tile_bytes = 16 * A * B * (F_ + C) * x.element_size()
    nb = max(1, min(N, WINOGRAD_BLOCK_BYTES // tile_bytes))  # images per block

    def buffers() -> tuple[Tensor, ...]:
        """Buffers reused by every block, laid out so each elementwise pass writes the
        operand's fastest axis (F or C for channels_last, W otherwise) contiguously. The
        first holds a block of images zero-padded: its border is never written, so stays 0.
        """
        if cl:
            return (
                x.new_zeros(nb, Hp, Wp, C).permute(0, 3, 1, 2),  # (nb, C, Hp, Wp)
                x.new_empty(4, nb, A, B, 2, F_).permute(0, 1, 5, 2, 3, 4),  # (4, nb, F, A, B, 2)
                x.new_empty(4, 4, nb, A, B, F_).permute(0, 1, 2, 5, 3, 4),  # (4, 4, nb, F, A, B)
                x.new_empty(4, nb, A, Wp, C).permute(0, 1, 4, 2, 3),  # (4, nb, C, A, Wp)
                x.new_empty(4, 4, nb, A, B, C).permute(0, 1, 2, 5, 3, 4),  # (4, 4, nb, C, A, B)
            )
        return (
            x.new_zeros(nb, C, Hp, Wp),
            x.new_empty(4, nb, F_, A, B, 2),
            x.new_empty(4, 4, F_, nb, A, B).transpose(2, 3),  # (4, 4, nb, F, A, B)
            x.new_empty(4, nb, C, A, Wp),
            x.new_empty(4, 4, C, nb, A, B).transpose(2, 3),  # (4, 4, nb, C, A, B)
        )

    xp_buf, uh_buf, u_buf, vh_buf, v_buf = buffers()
    M = x.new_zeros(16, F_, C)  # (4*4, F, C)
    for n0 in range(0, N, nb):
        if _recording(x, grad_out) and n0 > 0:
            xp_buf, uh_buf, u_buf, vh_buf, v_buf = buffers()  # autograd saved the last ones
        n = min(N, n0 + nb) - n0
        uh, U, vh, V = uh_buf[:, :n], u_buf[:, :, :n], vh_buf[:, :n], v_buf[:, :, :n]
        # U = A g A^T, rows then columns: (g0, g1) -> (g0, g0 + g1, g0 - g1, g1)
        g0, g1 = g6[n0 : n0 + n, :, :, 0], g6[n0 : n0 + n, :, :, 1]  # (n, F, A, B, 2)
        _combine(uh[0], g0)
        _combine(uh[1], g0, g1)
        _combine(uh[2], g0, g1, -1.0)
        _combine(uh[3], g1)
        h0, h1 = uh[..., 0], uh[..., 1]  # (4, n, F, A, B)
        _combine(U[:, 0], h0)
        _combine(U[:, 1], h0, h1)
        _combine(U[:, 2], h0, h1, -1.0)
        _combine(U[:, 3], h1)
        # V = B^T d B on overlapping 4x4 tiles (stride 2): (d0..d3) -> (d0 - d2, d1 + d2,
        # d2 - d1, d1 - d3), rows then columns
        xb = xp_buf[:n]  # (n, C, Hp, Wp)
        xb[:, :, padding[0] : padding[0] + H, padding[1] : padding[1] + W].copy_(x[n0 : n0 + n])
        r0, r1, r2, r3 = (xb[:, :, k : k + 2 * A : 2] for k in range(4))  # (n, C, A, Wp)
        _combine(vh[0], r0, r2, -1.0)
        _combine(vh[1], r1, r2)
        _combine(vh[2], r2, r1, -1.0)
        _combine(vh[3], r1, r3, -1.0)
        c0, c1, c2, c3 = (vh[..., k : k + 2 * B : 2] for k in range(4))  # (4, n, C, A, B)
        _combine(V[:, 0], c0, c2, -1.0)
        _combine(V[:, 1], c1, c2)
        _combine(V[:, 2], c2, c1, -1.0)
        _combine(V[:, 3], c1, c3, -1.0)
        # M accumulates as (F, C) per (s, t): 10-20% faster in MKL than (C, F) here
        if cl:
            Um = U.permute(0, 1, 2, 4, 5, 3).reshape(16, -1, F_)  # (16, n*A*B, F), a view
            Vm = V.permute(0, 1, 2, 4, 5, 3).reshape(16, -1, C)  # (16, n*A*B, C), a view
            M.baddbmm_(Um.transpose(1, 2), Vm)
        else:
            Um = U.transpose(2, 3).reshape(16, F_, -1)  # (16, F, n*A*B), a view
            Vm = V.transpose(2, 3).reshape(16, C, -1)  # (16, C, n*A*B), a view
            M.baddbmm_(Um, Vm.transpose(1, 2))
    G = torch.tensor(_WINOGRAD_G, dtype=x.dtype, device=x.device)  # (4, 3)
    gw = torch.einsum("su,stfc,tv->fcuv", G, M.view(4, 4, F_, C), G)  # (F, C, 3, 3)
    return gw.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _grad_weight_corr(
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


def winograd_applies(
    weight_shape: tuple[int, ...], stride: Pair, dilation: Pair, groups: int
) -> bool:
    """Whether conv2d_grad_weight's "winograd" method handles this convolution."""
    return (
        tuple(weight_shape[2:]) == (3, 3)
        and stride == (1, 1)
        and dilation == (1, 1)
        and groups == 1
    )


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
    - "im2col": receptive fields built a block at a time, then one matmul per block;
    - "winograd": F(2x2, 3x3) Winograd, 16/36 of the multiply-adds for a few elementwise
      passes (3x3 kernels, stride 1, dilation 1, groups 1 only);
    - "corr": one convolution with the batch as the reduced channel axis. On CPU oneDNN
      must first transpose and re-block grad_out as a kernel, which costs more than the
      convolution; on CUDA cuDNN takes it directly and a loop over blocks would be slow.
    "auto": "corr" on CUDA; on CPU "winograd" where it applies and C >= WINOGRAD_MIN_C
    (enough channels that its (C, tiles) @ (tiles, F) matmuls run at full speed), else
    "im2col".
    """
    if method == "auto":
        if grad_out.is_cuda:
            method = "corr"
        elif x.shape[1] >= WINOGRAD_MIN_C and winograd_applies(
            weight_shape, stride, dilation, groups
        ):
            method = "winograd"
        else:
            method = "im2col"
    if method == "winograd":
        if not winograd_applies(weight_shape, stride, dilation, groups):
            raise ValueError(
                "conv2d_grad_weight: expected a 3x3 kernel, stride 1, dilation 1 and groups 1 "
                f"for method 'winograd', got weight {tuple(weight_shape)}, stride={stride}, "
                f"dilation={dilation}, groups={groups}; use method 'im2col'"
            )
        return _grad_weight_winograd(grad_out, x, padding)
    if method == "im2col":
        return _grad_weight_im2col(grad_out, x, weight_shape, stride, padding, dilation, groups)
    if method == "corr":
        return _grad_weight_corr(grad_out, x, weight_shape, stride, padding, dilation, groups)
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
                grad_out, weight, x.shape, stride, padding, dilation, groups, _memory_format(x)
            )  # (N, C, H, W)
        if ctx.needs_input_grad[1]:
            grad_weight = conv2d_grad_weight(
                grad_out, x, weight.shape, stride, padding, dilation, groups
            )  # (F, C/groups, KH, KW)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))  # (F,)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _resolve_padding(padding: IntPair | str, kernel: Pair, dilation: Pair, stride: Pair) -> Pair:
    """Padding as a pair; "valid" is 0 and "same" keeps H_out == H (stride 1, even span)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(
                f"conv2d: expected stride 1 with padding='same', got stride={stride}; "
                "give the padding as numbers"
            )
        spans = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(s % 2 for s in spans):
            raise ValueError(
                f"conv2d: expected an odd dilated kernel with padding='same', got "
                f"kernel_size={kernel}, dilation={dilation}; pad the input with F.pad instead"
            )
        return (spans[0] // 2, spans[1] // 2)
    if isinstance(padding, str):
        raise ValueError(
            f"conv2d: expected padding 'same', 'valid', an int or a pair of ints, got {padding!r}"
        )
    return _pair(padding, "conv2d", "padding")


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
    if x.ndim != 4:
        raise ValueError(f"conv2d: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(
            f"conv2d: expected weight of shape (F, C/groups, KH, KW), got {tuple(weight.shape)}"
        )
    S = _pair(stride, "conv2d", "stride")
    D = _pair(dilation, "conv2d", "dilation")
    K = (weight.shape[2], weight.shape[3])
    if min(S) < 1 or min(D) < 1:
        raise ValueError(f"conv2d: expected stride and dilation >= 1, got stride={S}, dilation={D}")
    P = _resolve_padding(padding, K, D, S)
    if min(P) < 0:
        raise ValueError(f"conv2d: expected padding >= 0, got {P}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d: expected groups to be an int >= 1, got {groups!r}")
    _, C, H, W = x.shape
    F_ = weight.shape[0]
    if C % groups or F_ % groups or weight.shape[1] * groups != C:
        raise ValueError(
            f"conv2d: expected x with weight.shape[1] * groups = {weight.shape[1] * groups} "
            f"channels and F = {F_} divisible by groups = {groups}, got x of shape "
            f"{tuple(x.shape)}; check in_channels and groups"
        )
    if bias is not None and tuple(bias.shape) != (F_,):
        raise ValueError(f"conv2d: expected bias of shape ({F_},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"conv2d: expected weight on x's {x.dtype} {x.device}, got {weight.dtype} "
            f"{weight.device}; move the module with .to(x)"
        )
    H_out = conv2d_output_size(H, K[0], S[0], P[0], D[0])
    W_out = conv2d_output_size(W, K[1], S[1], P[1], D[1])
    if H_out < 1 or W_out < 1:
        raise ValueError(
            f"conv2d: expected an output of at least 1x1, got {H_out}x{W_out} for x of shape "
            f"{tuple(x.shape)} with kernel_size={K}, stride={S}, padding={P}, dilation={D}; "
            "use a larger input or more padding"
        )
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
        self.kernel_size = _pair(kernel_size, "Conv2d", "kernel_size")
        self.stride = _pair(stride, "Conv2d", "stride")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "Conv2d", "padding")
        self.dilation = _pair(dilation, "Conv2d", "dilation")
        self.groups = groups
        self.padding_mode = padding_mode
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's init: kaiming_uniform(a=sqrt(5)) weight, U(-1/sqrt(fan_in), ..) bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

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
