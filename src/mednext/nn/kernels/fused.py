"""A MedNeXt block's branch after its depthwise conv, fused for the CPU fast path.

The branch is group norm (one group per channel) -> 1x1 expansion -> GELU -> 1x1 compression,
plus the block's residual. On channels-last activations every step is a pass over memory, and on
a CPU the time goes to those passes and to the page faults of fresh large tensors rather than to
arithmetic. This module does the same arithmetic in fewer passes and with fewer large tensors:

- the norm's statistics are computed, but the normalised tensor is never built: per sample, the
  norm's scale and shift are folded into the expansion's weights and bias (``W * a``,
  ``W @ shift + b``), so the expansion GEMM reads the depthwise conv's output directly;
- the compression GEMM accumulates into ``residual + bias`` (one pass instead of two);
- backward: the norm's per-channel sums come from the expansion's weight-gradient GEMM
  (``sum_p dy * x = sum_k W[k, c] * (dz^T x)[k, c]``) and from the bias gradient, so the norm's
  input gradient is one element-wise pass plus one GEMM accumulated into it; GELU's backward
  writes over its input gradient;
- the expansion, GELU and compression (and in the backward everything that reads the expansion's
  gradient) run chunk by chunk, about 4 MiB of expansion per chunk, so a chunk stays in cache
  between them and no expansion-sized temporary is built beyond what the backward needs.

The block stores its depthwise output (C channels), the expansion output and GELU's output (R*C
each), one C-channel tensor less than the unfused path (the normalised features), and nothing
else of size; with ``recompute=True`` (the ``"cheap"`` checkpointing mode) it stores only the
depthwise output and recomputes the expansion and GELU in the backward pass.

Exact rewrite of the unfused arithmetic; tests/test_fused.py compares it with the plain path in
float64 and float32.
"""

from __future__ import annotations

import torch

from mednext.nn.kernels.cpu import channels_last, voxel_rows

__all__ = ["norm_expand_compress"]

# Rows per chunk of the variance pass: 256 KiB of one operand, so the centred chunk stays in cache.
_CHUNK_BYTES = 256 << 10
# Bytes of the expansion per chunk of the expansion, GELU and compression: a chunk stays in the L3
# cache between them.
_ROWS_BYTES = 4 << 20


def _unrows(r: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """(N, P, C) rows back to a channels-last (N, C, *S) view."""
    return r.view(r.shape[0], *spatial, r.shape[2]).movedim(-1, 1)


def _column_sums(r: torch.Tensor, last: int) -> torch.Tensor:
    """Sums over the voxels of (N, P, C) rows in two stages (the last spatial axis, then the rest),
    so that no float32 running sum is long."""
    n, p, c = r.shape
    return r.view(n, p // last, last, c).sum(dim=2).sum(dim=1)


def _moments(dr: torch.Tensor, last: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) mean and 1/sqrt(var + eps) of (N, P, C) rows, with the variance
    from centred values (two passes), in cache-sized chunks so the centred values are never a
    full-size tensor."""
    n, p, c = dr.shape
    mean = _column_sums(dr, last).div_(p)
    acc = torch.float64 if dr.dtype == torch.float64 else torch.float32
    sumsq = torch.zeros(n, c, dtype=torch.float64, device=dr.device)
    chunk = max(last, (_CHUNK_BYTES // (c * dr.element_size())) // last * last)
    for i in range(n):
        for start in range(0, p, chunk):
            block = dr[i, start : start + chunk] - mean[i]
            sumsq[i] += block.square_().view(-1, last, c).sum(dim=1).sum(dim=0, dtype=acc)
    var = sumsq.div_(p).to(dr.dtype)
    return mean, (var + eps).rsqrt_()


def _chunk_rows(p: int, last: int, width: int, itemsize: int) -> int:
    """Rows per chunk of the expansion: about ``_ROWS_BYTES`` of it, whole rows of the last spatial
    axis (so two-stage sums stay short), at most the ``p`` rows of a sample."""
    return min(p, max(last, (_ROWS_BYTES // (width * itemsize)) // last * last))


def _chunks(n: int, p: int, rows: int):
    """(sample, first row, end row) of every chunk of ``rows`` rows."""
    for i in range(n):
        for start in range(0, p, rows):
            yield i, start, min(p, start + rows)


def _expand_gelu(d, w_eff, b_eff, z_out, g_out=None):
    """A chunk's expansion ``d @ w_eff^T + b_eff`` into ``z_out`` and its GELU into ``g_out`` (over
    ``z_out`` in place when None); returns both."""
    z = torch.addmm(b_eff, d, w_eff.t(), out=z_out)
    return z, torch.ops.aten.gelu_(z) if g_out is None else torch.ops.aten.gelu.out(z, out=g_out)


def _folded(w2, b2, gamma, beta, mean, rstd):
    """The norm folded into the expansion: per-sample weights (N, H, C) and bias (N, H)."""
    a = rstd * gamma
    shift = beta - mean * a
    return a, shift, w2[None] * a[:, None, :], torch.addmm(b2, shift, w2.t())


def _forward(d, residual, gamma, beta, w2, b2, w3, b3, eps, keep):
    """The branch's forward on rows, chunk by chunk (expansion, GELU and compression of a chunk while
    it is in cache); returns the output rows, the statistics, and the expansion and GELU outputs when
    ``keep`` (else neither is ever built whole: a chunk-sized buffer serves every chunk)."""
    last = d.shape[-1]
    dr = voxel_rows(d)
    n, p, _ = dr.shape
    mean, rstd = _moments(dr, last, eps)
    _, _, w_eff, b_eff = _folded(w2, b2, gamma, beta, mean, rstd)
    h, co = w_eff.shape[1], w3.shape[0]
    base = b3.expand(n, p, co) if residual is None else voxel_rows(residual) + b3
    out = base.contiguous()  # the compression accumulates into residual + bias
    rows = _chunk_rows(p, last, h, dr.element_size())
    z = g = buf = None
    if keep:
        z, g = dr.new_empty((n, p, h)), dr.new_empty((n, p, h))
    else:
        buf = dr.new_empty((rows, h))
    w3t = w3.t()
    for i, start, end in _chunks(n, p, rows):
        z_out, g_out = (z[i, start:end], g[i, start:end]) if keep else (buf[: end - start], None)
        _, gc = _expand_gelu(dr[i, start:end], w_eff[i], b_eff[i], z_out, g_out)
        out[i, start:end].addmm_(gc, w3t)
    return out, mean, rstd, (z, g)


class _NormExpandCompress(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d, residual, gamma, beta, w2, b2, w3, b3, eps, recompute):
        out, mean, rstd, (z, g) = _forward(d, residual, gamma, beta, w2, b2, w3, b3, eps, not recompute)
        ctx.save_for_backward(d, gamma, beta, w2, b2, w3, mean, rstd, z, g)
        ctx.has_residual = residual is not None
        return _unrows(out, tuple(d.shape[2:]))

    @staticmethod
    def backward(ctx, gout):
        d, gamma, beta, w2, b2, w3, mean, rstd, z, g = ctx.saved_tensors
        spatial = tuple(d.shape[2:])
        last = spatial[-1]
        dr = voxel_rows(d)
        n, p, c = dr.shape
        h, co = w2.shape[0], w3.shape[0]
        a, shift, w_eff, b_eff = _folded(w2, b2, gamma, beta, mean, rstd)
        go = voxel_rows(channels_last(gout))
        db3 = _column_sums(go, last).sum(dim=0)
        dw3 = dr.new_zeros((co, h))
        gram = dr.new_zeros((n, h, c))  # per sample: sum over voxels of dz x d
        sdz = dr.new_zeros((n, h))
        dd = dr.new_empty((n, p, c))
        rows = _chunk_rows(p, last, h, dr.element_size())
        dz_buf = dr.new_empty((rows, h))
        if z is None:  # recompute: a chunk's expansion and GELU output, in cache like its gradient
            z_buf, g_buf = dr.new_empty((rows, h)), dr.new_empty((rows, h))
        # Chunk by chunk, so the expansion's gradient dz never leaves the cache: GELU's backward, its
        # sums and its GEMMs read it there.
        for i, start, end in _chunks(n, p, rows):
            m = end - start
            dri, goc = dr[i, start:end], go[i, start:end]
            if z is None:
                zc, gc = _expand_gelu(dri, w_eff[i], b_eff[i], z_buf[:m], g_buf[:m])
            else:
                zc, gc = z[i, start:end], g[i, start:end]
            dw3.addmm_(goc.t(), gc)
            dz = torch.mm(goc, w3, out=dz_buf[:m])  # gradient of GELU's output, then (in place) of its input
            torch.ops.aten.gelu_backward.grad_input(dz, zc, grad_input=dz)
            gram[i].addmm_(dz.t(), dri)
            sdz[i] += dz.view(-1, last, h).sum(dim=1).sum(dim=0)
            torch.mm(dz, w_eff[i], out=dd[i, start:end])
        del z, g, dz_buf
        dw2 = (gram * a[:, None, :]).sum(dim=0) + sdz.t() @ shift
        db2 = sdz.sum(dim=0)
        s_dy = sdz @ w2  # per (sample, channel): sum of the normalised features' gradient
        s_dyx = (gram * w2[None]).sum(dim=1)  # ... and of that gradient times the norm's input
        s_dyxhat = rstd * (s_dyx - mean * s_dy)
        dgamma, dbeta = s_dyxhat.sum(dim=0), s_dy.sum(dim=0)
        coef = -a * rstd * s_dyxhat / p
        const = -a * s_dy / p - coef * mean
        dd.addcmul_(dr, coef[:, None, :]).add_(const[:, None, :])
        gres = gout if ctx.has_residual else None
        return _unrows(dd, spatial), gres, dgamma, dbeta, dw2, db2, dw3, db3, None, None


def norm_expand_compress(
    d: torch.Tensor,
    residual: torch.Tensor | None,
    norm: torch.nn.GroupNorm,
    expand: torch.nn.Module,
    compress: torch.nn.Module,
    recompute: bool = False,
) -> torch.Tensor:
    """``residual + compress(GELU(expand(norm(d))))`` for channels-last ``d`` (and ``residual``),
    with ``norm`` a GroupNorm of one group per channel and ``expand``/``compress`` 1x1 convs.
    ``recompute=True`` stores only ``d`` and recomputes the expansion and GELU when backpropagating.
    Returns a channels-last tensor."""
    d = channels_last(d)  # rows need compact channels-last storage; a no-op when it is already
    if residual is not None:
        residual = channels_last(residual)
    args = (d, residual, norm.weight, norm.bias, expand.weight.flatten(1), expand.bias,
            compress.weight.flatten(1), compress.bias, norm.eps)  # fmt: skip
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _NormExpandCompress.apply(*args, recompute)
    return _unrows(_forward(*args, keep=False)[0], tuple(d.shape[2:]))
