"""Two more formulations of the convolution's grad_weight (facetag.layers.conv has the
reference formula, ``grad_weight_corr``, and the kernel its "auto" takes on the CPU:
oneDNN's weight-gradient primitive, 2-4x faster than either of these).

Both compute exactly grad_weight[f, c, u, v] = sum_{n, i, j} grad_out[n, f, i, j] *
x_pad[n, c, i*S + u*D, j*S + v*D], the correlation of x with grad_out, in fewer or
cheaper passes than a convolution with batch and channels swapped:

- ``grad_weight_im2col``: receptive fields built a block at a time (a few MiB, still in
  cache when the matmul reads them), one matmul per block;
- ``grad_weight_winograd``: F(2x2, 3x3) Winograd for 3x3 stride-1 kernels, 16/36 of the
  multiply-adds for a few elementwise passes.

experiments/bench_conv.py times them against the correlation; tests/layers/test_conv.py
checks each against it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.layers import _threads as threads
from facetag.layers._util import Pair, is_channels_last

# Bytes of im2col columns built per matmul in conv2d_grad_weight: small enough that a block
# is still in cache when the matmul reads it, large enough that the Python loop costs
# little (64 blocks for a 64x32x48x48 input). On the 2-core dev box 1-4 MiB were fastest;
# 8 MiB was up to 25% slower and one block for everything up to 2x.
IM2COL_BLOCK_BYTES = 4 << 20


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


def grad_weight_im2col(
    grad_out: Tensor,
    x: Tensor,
    weight_shape: tuple[int, ...],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Tensor:
    """grad_weight = sum over positions of grad_out (x) receptive field, block by block.

    NOTE: one function of ~110 lines on purpose: the two layouts, the per-worker block
    buffers and the block loop share their index arithmetic, which split apart would be
    harder to check against the formula than read in one place.

    With cols[(c, u, v), r] the receptive field of output position r = (n, i, j) and
    g[r, f] = grad_out[n, f, i, j], grad_weight[f, (c, u, v)] = sum_r cols[..., r] g[r, f]:
    one matmul (per group) whose inner dimension runs over all N*H_out*W_out positions.
    Materialising cols whole costs KH*KW copies of x in memory traffic; building it a few
    image rows at a time keeps each block in cache from its copy to its matmul. The zero
    padding is built per block too: the block's input rows go into a small buffer whose
    border stays zero, so x is never copied whole. The blocks run block-parallel
    (facetag.layers._threads): each worker builds and multiplies whole blocks with one
    intra-op thread, each chunk of blocks sums into its own slot, the slots are added last.

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
    rows_major = is_channels_last(x) and Cg >= 8
    if not (is_channels_last(grad_out) or grad_out.is_contiguous()):
        grad_out = grad_out.contiguous()  # e.g. the expanded ones of a .sum() upstream
    go_rows = is_channels_last(grad_out)
    if go_rows:
        g = grad_out.permute(0, 2, 3, 1).unflatten(3, (G, Fg))  # (N, H_out, W_out, G, Fg)
    else:
        g = grad_out.unflatten(1, (G, Fg)).permute(1, 2, 0, 3, 4)  # (G, Fg, N, H_out, W_out)
    n_workers = threads.workers()
    rows = max(1, IM2COL_BLOCK_BYTES // (x.element_size() * KKC * G * W_out))
    rows = min(rows, -(-N * H_out // n_workers))  # at least one block per worker
    if not go_rows and rows > H_out and H_out * W_out >= 1024:
        # An NCHW grad_out block spanning several images is a copy; one image already gives
        # the matmul a long enough inner dimension, and keeps it a view.
        rows = H_out
    blocks = list(_blocks(N, H_out, rows))
    b_max, rows_max = max(1, rows // H_out), min(rows, H_out)  # images, output rows per block
    # Each worker reuses its own buffers block after block (a fresh multi-MiB tensor per
    # block costs page faults): `slab` holds a block's zero-padded input rows, `buf` its
    # columns.
    S_h, P_h = stride[0], padding[0]
    span_h = dilation[0] * (KH - 1) + 1
    Wp = W + 2 * padding[1]
    slab_rows = (rows_max - 1) * S_h + span_h
    recording = _recording(x, grad_out)

    def buffers() -> tuple[Tensor, Tensor]:
        if rows_major:
            slab = x.new_zeros(b_max, slab_rows, Wp, C).permute(0, 3, 1, 2)  # channels_last
            return slab, x.new_empty(b_max * rows_max * W_out, G, KKC)  # (R, G, KKC)
        return x.new_zeros(b_max, C, slab_rows, Wp), x.new_empty(G, KKC, b_max * rows_max * W_out)

    per_worker: dict[int, tuple[Tensor, Tensor]] = {}
    # grad_weight is accumulated transposed, (KKC, Fg) per group: with Fg and KKC small (the
    # first layer: 32 and 27) MKL's matmul runs 20-25% faster in this orientation.
    parts = threads.chunks(len(blocks), n_workers)
    gw_parts = grad_out.new_empty(len(parts), G, KKC, Fg)  # (K, G, KKC, Fg), KKC in cols' order

    def block(worker: int, n0: int, n1: int, i0: int, i1: int, acc: Tensor, first: bool) -> None:
        if recording or worker not in per_worker:
            per_worker[worker] = buffers()  # recording: autograd saved the last ones
        slab_buf, buf = per_worker[worker]
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
        beta = 0.0 if first else 1.0  # beta 0: the slot's old contents are ignored
        if G == 1:
            acc[0].addmm_(cols[0], g_blk[0], beta=beta)
        else:
            acc.baddbmm_(cols, g_blk, beta=beta)

    def chunk(worker: int, k: int) -> None:
        for j in parts[k]:
            block(worker, *blocks[j], gw_parts[k], j == parts[k][0])

    threads.for_each(len(parts), chunk, parallel=not recording)
    gw = (gw_parts.sum(0) if len(parts) > 1 else gw_parts[0]).transpose(1, 2)  # (G, Fg, KKC)
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


def grad_weight_winograd(grad_out: Tensor, x: Tensor, padding: Pair) -> Tensor:
    """grad_weight of a 3x3, stride-1, undilated, ungrouped conv by Winograd F(2x2, 3x3).

    NOTE: ~100 lines on purpose, like grad_weight_im2col: the tile transforms and the block
    loop over them share one set of buffers and offsets.

    y is linear in w: y = A^T [(G w G^T) * V] A per tile, with V = B^T d B, so
    dL/dw = G^T [(A g A^T) * V] G for the tile's 2x2 grad_out g, and over all tiles and
    channel pairs: grad_weight[f, c] = G^T M[:, :, f, c] G with
    M[s, t, f, c] = sum_tiles U[s, t, tile, f] * V[s, t, tile, c], U = A g A^T.
    That is 16 matmuls of (F, tiles) @ (tiles, C): 16/36 of the multiply-adds of the direct
    correlation, for a few elementwise passes that build U and V a few images at a time.
    An odd H_out or W_out is padded with zero grad_out (and x with a zero row or column);
    x is zero-padded a block of images at a time, in a reused buffer. The blocks run
    block-parallel (facetag.layers._threads), each chunk of blocks summing into its own M.
    """
    N, C = x.shape[0], x.shape[1]
    F_, H_out, W_out = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
    A, B = (H_out + 1) // 2, (W_out + 1) // 2  # tiles down and across
    eh, ew = 2 * A - H_out, 2 * B - W_out
    if eh or ew:
        grad_out = F.pad(grad_out, (0, ew, 0, eh))  # (N, F, 2A, 2B)
    H, W = x.shape[2], x.shape[3]
    Hp, Wp = 2 * A + 2, 2 * B + 2  # = H + 2P (+1 when H_out is odd)
    cl = is_channels_last(grad_out)
    g6 = grad_out.unflatten(2, (A, 2)).unflatten(4, (B, 2))  # (N, F, A, 2, B, 2)
    tile_bytes = 16 * A * B * (F_ + C) * x.element_size()
    n_workers = threads.workers()
    # Blocks of equal size (the loop's end waits for the largest), at least one per worker.
    n_blocks = min(N, max(-(-N * tile_bytes // WINOGRAD_BLOCK_BYTES), n_workers))
    nb = -(-N // n_blocks)  # images per block
    recording = _recording(x, grad_out)

    def buffers() -> tuple[Tensor, ...]:
        """Buffers a worker reuses block after block, laid out so each elementwise pass
        writes the operand's fastest axis (F or C for channels_last, W otherwise)
        contiguously. The first holds a block of images zero-padded: its border is never
        written, so stays 0.
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

    per_worker: dict[int, tuple[Tensor, ...]] = {}
    starts = range(0, N, nb)
    parts = threads.chunks(len(starts), n_workers)
    M_parts = x.new_empty(len(parts), 16, F_, C)  # (K, 4*4, F, C)

    def block(worker: int, n0: int, M: Tensor, first: bool) -> None:
        if recording or worker not in per_worker:
            per_worker[worker] = buffers()  # recording: autograd saved the last ones
        xp_buf, uh_buf, u_buf, vh_buf, v_buf = per_worker[worker]
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
        beta = 0.0 if first else 1.0  # beta 0: the slot's old contents are ignored
        if cl:
            Um = U.permute(0, 1, 2, 4, 5, 3).reshape(16, -1, F_)  # (16, n*A*B, F), a view
            Vm = V.permute(0, 1, 2, 4, 5, 3).reshape(16, -1, C)  # (16, n*A*B, C), a view
            M.baddbmm_(Um.transpose(1, 2), Vm, beta=beta)
        else:
            Um = U.transpose(2, 3).reshape(16, F_, -1)  # (16, F, n*A*B), a view
            Vm = V.transpose(2, 3).reshape(16, C, -1)  # (16, C, n*A*B), a view
            M.baddbmm_(Um, Vm.transpose(1, 2), beta=beta)

    def chunk(worker: int, k: int) -> None:
        for j in parts[k]:
            block(worker, starts[j], M_parts[k], j == parts[k][0])

    threads.for_each(len(parts), chunk, parallel=not recording)
    M = M_parts.sum(0) if len(parts) > 1 else M_parts[0]  # (16, F, C)
    G = torch.tensor(_WINOGRAD_G, dtype=x.dtype, device=x.device)  # (4, 3)
    gw = torch.einsum("su,stfc,tv->fcuv", G, M.view(4, 4, F_, C), G)  # (F, C, 3, 3)
    return gw.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


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
