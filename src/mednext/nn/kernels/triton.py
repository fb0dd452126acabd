"""Triton kernels for MedNeXt's depthwise convolutions and group norm on CUDA (channels-last
activations).

PyTorch's CUDA depthwise 3D convolution (its own kernel for NCDHW, cuDNN for channels-last)
is far below the GPU's arithmetic rate, and these convolutions are most of a MedNeXt training step
with large kernels. Two generic kernels cover every form MedNeXt needs:

- ``_dw_fwd``: ``y[o] = sum_k x[S*o + k - P] * w[k] (+ b)`` per channel and axis, for any kernel
  size, stride ``S`` and front padding ``P`` (zero outside the input), on tensors of any strides
  whose channel axis is contiguous. Forward of the stride-1 and strided convs; the input
  gradient of the transposed conv (a strided conv of the output gradient); and, phase by phase
  with sub-kernels, the transposed conv and the input gradient of every conv (polyphase form:
  only taps that meet a real voxel are computed, never the zeros of an upsampled grid).
- ``_dw_wgrad``: ``gw[k] = sum_o g[o] * x[S*o + k - P]``, the weight gradient of the convs (and,
  with the roles of ``x`` and ``g`` swapped, of the transposed conv), reduced in float32; for the
  stride-1 and strided convs it also sums ``g``, their bias gradient.

Accumulation is float32 for every input dtype; under CUDA autocast the activations run in the
autocast dtype like PyTorch's convolutions, the float32 weights are read as they are.

``group_norm`` (one group per channel, opt-in through ``mednext.config.set_cuda_route(norm="triton")``): two
read passes for exact statistics, one for the output; one pass for the backward's sums and one
for the input gradient; two small kernels do the per-channel arithmetic in between, so a norm is
seven launches forward and backward together.

tests/test_cuda_route.py checks every form against PyTorch (on the CPU through Triton's
interpreter when no GPU is present).
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from mednext import config
from mednext.nn.kernels.cpu import autocast_dtype, channels_last, voxel_rows
from mednext.nn.kernels.polyphase import sub_kernel, transposed_phase


@triton.jit
def _dw_fwd(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, ID, IH, IW, OD, OH, OW, OHB,
    sxn, sxc, sxd, sxh, sxw,
    syn, syc, syd, syh, syw,
    PD, PH, PW, KD, KH, SD, SH, SW,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_H consecutive output rows (n, od, oh0 .. oh0 + BLOCK_H - 1) x BLOCK_W voxels
    # x BLOCK_C channels. Each input row it reads feeds every output row of the block whose kernel
    # reaches it, so an input row is loaded once per (kd, kw) instead of once per output row and kh.
    # Weights are laid out (KD * KH * KW, C): one tap's weights are contiguous over channels.
    pid = tl.program_id(0).to(tl.int64)
    ohb = pid % OHB
    od = (pid // OHB) % OD
    n = pid // (OHB * OD)
    oh0 = ohb * BLOCK_H
    r = tl.arange(0, BLOCK_H)[:, None, None]
    ow = (tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :, None]
    c = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C))[None, None, :]
    cmask = c < C
    acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    x_base = x_ptr + n * sxn + c * sxc
    ih0 = oh0 * SH - PH
    for kd in range(KD):  # runtime loops over depth taps and input rows: one compiled kernel per KW
        idd = od * SD + kd - PD
        d_ok = (idd >= 0) & (idd < ID)
        for j in range((BLOCK_H - 1) * SH + KH):
            ih = ih0 + j
            row_ok = d_ok & (ih >= 0) & (ih < IH)
            kh = j - r * SH  # the tap that joins input row ih to output row oh0 + r
            w_ok = (kh >= 0) & (kh < KH) & cmask
            w_row = w_ptr + ((kd * KH + kh) * KW) * C + c
            for kw in tl.static_range(KW):
                iw = ow * SW + kw - PW
                m = (iw >= 0) & (iw < IW) & row_ok & cmask
                xv = tl.load(x_base + idd * sxd + ih * sxh + iw * sxw, mask=m, other=0.0)
                wv = tl.load(w_row + kw * C, mask=w_ok, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    oh = oh0 + r
    out = y_ptr + n * syn + od * syd + oh * syh + ow * syw + c * syc
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(oh < OH) & (ow < OW) & cmask)


@triton.jit
def _wtap(acc, x_row, gv, ow, om, cmask, kw: tl.constexpr, SW, PW, IW, sxw):
    iw = ow * SW + kw - PW
    m = om & (iw >= 0) & (iw < IW)
    xv = tl.load(x_row + iw[:, None] * sxw, mask=m[:, None] & cmask[None, :], other=0.0)
    return acc + gv * xv.to(tl.float32)


@triton.jit
def _wstore(part_row, acc, c, cmask, kw: tl.constexpr, C):
    tl.store(part_row + kw * C + c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _dw_wgrad(
    x_ptr, g_ptr, part_ptr, bpart_ptr,
    C, ID, IH, IW, OD, OH, OW, ROWS, ROWS_PER_PROG,
    sxn, sxc, sxd, sxh, sxw,
    sgn, sgc, sgd, sgh, sgw,
    PD, PH, PW, KD, KH, SD, SH, SW,
    KW: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One program: tap (kd, kh), one channel block, a chunk of output rows. The KW taps along the
    # last axis share every load of g, each with its own float32 accumulator (KW <= 7), reduced
    # over voxels once at the end. BIAS_GRAD: the programs of the centre tap (kd, kh) = (PD, PH),
    # which visit every row of g when the padding is k // 2, also sum g: the bias gradient.
    tap = tl.program_id(0)
    kd = tap // KH
    kh = tap % KH
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    chunk = tl.program_id(2)
    acc0 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    accb = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    r_start = chunk.to(tl.int64) * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG):
        row = r_start + i
        oh = row % OH
        od = (row // OH) % OD
        n = row // (OH * OD)
        idd = od * SD + kd - PD
        ih = oh * SH + kh - PH
        if (row < ROWS) & (idd >= 0) & (idd < ID) & (ih >= 0) & (ih < IH):
            g_row = g_ptr + n * sgn + od * sgd + oh * sgh + c[None, :] * sgc
            x_row = x_ptr + n * sxn + idd * sxd + ih * sxh + c[None, :] * sxc
            for w0 in range(0, OW, BLOCK_W):
                ow = w0 + tl.arange(0, BLOCK_W)
                om = ow < OW
                gv = tl.load(g_row + ow[:, None] * sgw, mask=om[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                if BIAS_GRAD:
                    accb += gv
                acc0 = _wtap(acc0, x_row, gv, ow, om, cmask, 0, SW, PW, IW, sxw)
                if KW > 1:
                    acc1 = _wtap(acc1, x_row, gv, ow, om, cmask, 1, SW, PW, IW, sxw)
                if KW > 2:
                    acc2 = _wtap(acc2, x_row, gv, ow, om, cmask, 2, SW, PW, IW, sxw)
                if KW > 3:
                    acc3 = _wtap(acc3, x_row, gv, ow, om, cmask, 3, SW, PW, IW, sxw)
                if KW > 4:
                    acc4 = _wtap(acc4, x_row, gv, ow, om, cmask, 4, SW, PW, IW, sxw)
                if KW > 5:
                    acc5 = _wtap(acc5, x_row, gv, ow, om, cmask, 5, SW, PW, IW, sxw)
                if KW > 6:
                    acc6 = _wtap(acc6, x_row, gv, ow, om, cmask, 6, SW, PW, IW, sxw)
    part_row = part_ptr + (chunk * (KD * KH) + tap) * KW * C
    _wstore(part_row, acc0, c, cmask, 0, C)
    if KW > 1:
        _wstore(part_row, acc1, c, cmask, 1, C)
    if KW > 2:
        _wstore(part_row, acc2, c, cmask, 2, C)
    if KW > 3:
        _wstore(part_row, acc3, c, cmask, 3, C)
    if KW > 4:
        _wstore(part_row, acc4, c, cmask, 4, C)
    if KW > 5:
        _wstore(part_row, acc5, c, cmask, 5, C)
    if KW > 6:
        _wstore(part_row, acc6, c, cmask, 6, C)
    if BIAS_GRAD:
        centre = (kd == PD) & (kh == PH)
        tl.store(bpart_ptr + chunk * C + c, tl.sum(accb, axis=0), mask=cmask & centre)


@triton.jit
def _gn_chunk_sum(
    part_ptr, n, c, cmask, slot, CHUNKS, C, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr
):
    # sum over chunks of part[n, chunk, slot, c] (part laid out (N, CHUNKS, 2, C))
    tot = tl.zeros((BLOCK_K, BLOCK_C), dtype=ACC)
    for k0 in range(0, CHUNKS, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = (k < CHUNKS)[:, None] & cmask[None, :]
        tot += tl.load(part_ptr + ((n * CHUNKS + k[:, None]) * 2 + slot) * C + c[None, :], mask=m, other=0.0)
    return tl.sum(tot, axis=0)


@triton.jit
def _gn_reduce(
    x_ptr, g_ptr, part_in_ptr, stats_ptr, part_ptr,
    S, C, CHUNK, CHUNKS, sxn, sxs, sgn, sgs,
    MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Per-channel sums over one chunk of voxels of one sample, on (N, S, C) views whose channel axis
    # is contiguous; part[n, chunk, 0 or 1, c] gets them, the chunks are added later. MODE 0: sum x.
    # MODE 1: sum (x - mean) and sum (x - mean)^2 (the second pass of an exact two-pass variance),
    # the mean from MODE 0's chunks (part_in). MODE 2 (backward): sum g and sum g * (x - mean) * rstd,
    # mean and rstd from stats (N, 2, C).
    pid = tl.program_id(0)
    n = pid // CHUNKS
    chunk = pid % CHUNKS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc1 = tl.zeros((BLOCK_V, BLOCK_C), dtype=ACC)
    acc2 = tl.zeros((BLOCK_V, BLOCK_C), dtype=ACC)
    if MODE == 1:
        mean = (_gn_chunk_sum(part_in_ptr, n, c, cmask, 0, CHUNKS, C, ACC, BLOCK_K, BLOCK_C) / S)[None, :]
    if MODE == 2:
        mean = tl.load(stats_ptr + (n * 2) * C + c, mask=cmask, other=0.0)[None, :]
        rstd = tl.load(stats_ptr + (n * 2 + 1) * C + c, mask=cmask, other=0.0)[None, :]
    x_base = x_ptr + n.to(tl.int64) * sxn + c[None, :]
    g_base = g_ptr + n.to(tl.int64) * sgn + c[None, :]
    start = chunk * CHUNK
    for v0 in range(start, start + CHUNK, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        m = (v < S)[:, None] & cmask[None, :]
        xv = tl.load(x_base + v[:, None].to(tl.int64) * sxs, mask=m, other=0.0).to(ACC)
        if MODE == 0:
            acc1 += xv
        elif MODE == 1:
            d = tl.where(m, xv - mean, 0.0)
            acc1 += d
            acc2 += d * d
        else:
            gv = tl.load(g_base + v[:, None].to(tl.int64) * sgs, mask=m, other=0.0).to(ACC)
            acc1 += gv
            acc2 += gv * ((xv - mean) * rstd)
    out = part_ptr + (pid * 2) * C + c
    tl.store(out, tl.sum(acc1, axis=0), mask=cmask)
    if MODE != 0:
        tl.store(out + C, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _gn_forward_stats(
    part0_ptr, part1_ptr, w_ptr, b_ptr, stats_ptr, coef_ptr, S, C, CHUNKS, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Program (n, channel block): mean and rstd (stats, kept for the backward) and the output's
    # per-(n, c) scale rstd * w and shift b - mean * scale (coef), from the two passes' chunks.
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = _gn_chunk_sum(part0_ptr, n, c, cmask, 0, CHUNKS, C, ACC, BLOCK_K, BLOCK_C) / S
    sd = _gn_chunk_sum(part1_ptr, n, c, cmask, 0, CHUNKS, C, ACC, BLOCK_K, BLOCK_C)
    sd2 = _gn_chunk_sum(part1_ptr, n, c, cmask, 1, CHUNKS, C, ACC, BLOCK_K, BLOCK_C)
    var = tl.maximum((sd2 - sd * sd / S) / S, 0.0)  # corrected two-pass variance
    mean = mean + sd / S
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = rstd * tl.load(w_ptr + c, mask=cmask, other=0.0).to(ACC)
    shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC) - mean * scale
    tl.store(stats_ptr + (n * 2) * C + c, mean, mask=cmask)
    tl.store(stats_ptr + (n * 2 + 1) * C + c, rstd, mask=cmask)
    tl.store(coef_ptr + (n * 3 + 1) * C + c, scale, mask=cmask)
    tl.store(coef_ptr + (n * 3 + 2) * C + c, shift, mask=cmask)


@triton.jit
def _gn_backward_stats(
    part_ptr, w_ptr, stats_ptr, coef_ptr, gw_ptr, gb_ptr, N, S, C, CHUNKS,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Program (channel block): per sample A = sum g, B = sum g * xhat; the input gradient's
    # coefficients a = rstd * w, b = -a * rstd * B / S, d = -a * A / S - b * mean (coef), and the
    # weight and bias gradients sum_n B and sum_n A.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(ACC)
    gw = tl.zeros((BLOCK_C,), dtype=ACC)
    gb = tl.zeros((BLOCK_C,), dtype=ACC)
    for n in range(N):
        sa = _gn_chunk_sum(part_ptr, n, c, cmask, 0, CHUNKS, C, ACC, BLOCK_K, BLOCK_C)
        sb = _gn_chunk_sum(part_ptr, n, c, cmask, 1, CHUNKS, C, ACC, BLOCK_K, BLOCK_C)
        mean = tl.load(stats_ptr + (n * 2) * C + c, mask=cmask, other=0.0)
        rstd = tl.load(stats_ptr + (n * 2 + 1) * C + c, mask=cmask, other=0.0)
        a = rstd * w
        b = -a * rstd * sb / S
        tl.store(coef_ptr + (n * 3) * C + c, a, mask=cmask)
        tl.store(coef_ptr + (n * 3 + 1) * C + c, b, mask=cmask)
        tl.store(coef_ptr + (n * 3 + 2) * C + c, -a * sa / S - b * mean, mask=cmask)
        gw += sb
        gb += sa
    tl.store(gw_ptr + c, gw, mask=cmask)
    tl.store(gb_ptr + c, gb, mask=cmask)


@triton.jit
def _gn_apply(
    x_ptr, g_ptr, coef_ptr, y_ptr,
    S, C, VB, sxn, sxs, sgn, sgs, syn, sys,
    HAS_G: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # y = coef[n, 1, c] * x + coef[n, 2, c] (+ coef[n, 0, c] * g): the group norm's output (scale,
    # shift) or its input gradient (a, b, d), computed in ACC and stored in y's dtype.
    pid = tl.program_id(0)
    n = pid // VB
    v = (pid % VB) * BLOCK_V + tl.arange(0, BLOCK_V)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    m = (v < S)[:, None] & cmask[None, :]
    nl, vl = n.to(tl.int64), v[:, None].to(tl.int64)
    coef = coef_ptr + (n * 3) * C + c
    xv = tl.load(x_ptr + nl * sxn + vl * sxs + c[None, :], mask=m, other=0.0).to(ACC)
    y = xv * tl.load(coef + C, mask=cmask, other=0.0)[None, :] + tl.load(coef + 2 * C, mask=cmask, other=0.0)[None, :]
    if HAS_G:
        gv = tl.load(g_ptr + nl * sgn + vl * sgs + c[None, :], mask=m, other=0.0).to(ACC)
        y += gv * tl.load(coef, mask=cmask, other=0.0)[None, :]
    tl.store(y_ptr + nl * syn + vl * sys + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


MAX_LAST_TAPS = 7  # _dw_wgrad keeps one accumulator per tap along the last axis
# Every Triton kernel the launchers below start (benchmarks/count_launches.py and the CUDA-graph test
# replace them with stand-ins that launch nothing)
KERNELS = ("_dw_fwd", "_dw_wgrad", "_gn_reduce", "_gn_forward_stats", "_gn_backward_stats", "_gn_apply")


# ----------------------------------------------------------------------------- launchers


# Output rows per forward program for layers of at most 32 channels (the input rows they share are
# loaded once); wider layers use one. Weight-gradient programs per multiprocessor: enough to fill the
# GPU while each program still sums a long run of rows.
FWD_ROWS = 2
WGRAD_PROGRAMS_PER_SM = 16
# Voxels x channels per forward-kernel program, and warps per program of each kernel (Triton's
# default is 4); benchmarks/gpu_explore.py's "candidates" section times other choices.
FWD_TILE = 1024
FWD_WARPS = 4
WGRAD_WARPS = 4


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (2 for the CPU interpreter); asked once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _channel_block(channels: int) -> int:
    """Channels per program of every kernel: 32 for MedNeXt's first stage, 64 beyond; few distinct
    tiles keep the number of compiled kernel variants small."""
    return 32 if channels <= 32 else 64


def _blocks(channels: int) -> tuple[int, int]:
    """Forward tile (voxels along the last axis, channels): 32 x 32 for MedNeXt's first stage,
    16 x 64 beyond."""
    block_c = _channel_block(channels)
    return FWD_TILE // block_c, block_c


def _taps_by_channel(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, kd, kh, kw) weights as (kd * kh * kw, C): one tap's weights contiguous."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def _five(t: torch.Tensor) -> torch.Tensor:
    """2D tensors as 3D ones with depth 1 (a free view)."""
    return t.unsqueeze(2) if t.ndim == 4 else t


def conv_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    out: torch.Tensor,
) -> torch.Tensor:
    """``out[o] = sum_k x[s*o + k - p] * w[k] (+ b)``, written into ``out`` (any strides, sized by
    the caller); padding is the front padding per axis, zeros beyond the input on both sides."""
    x5, o5, w5 = _five(x), _five(out), _five(weight)
    st = (1,) * (5 - x.ndim) + tuple(stride)
    pad = (0,) * (5 - x.ndim) + tuple(padding)
    n, c, i_d, i_h, i_w = x5.shape
    _, _, o_d, o_h, o_w = o5.shape
    if o5.numel() == 0:
        return out
    block_w, block_c = _blocks(c)
    block_h = min(FWD_ROWS if c <= 32 else 1, triton.next_power_of_2(o_h))
    ohb = triton.cdiv(o_h, block_h)
    grid = (n * o_d * ohb, triton.cdiv(o_w, block_w), triton.cdiv(c, block_c))
    taps = _taps_by_channel(w5)
    _dw_fwd[grid](
        x5, taps, bias if bias is not None else taps, o5,
        c, i_d, i_h, i_w, o_d, o_h, o_w, ohb,
        *x5.stride(), *o5.stride(), *pad, w5.shape[2], w5.shape[3], *st,
        KW=w5.shape[4], HAS_BIAS=bias is not None, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
        num_warps=FWD_WARPS,
    )  # fmt: skip
    return out


def weight_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``gw[c, k] = sum_o grad[o] * x[s*o + k - p]`` in float32, shape (C, 1, *kernel); with
    ``bias_grad`` (padding k // 2 on the first two axes) also ``sum_o grad[o]`` per channel, from the
    same loads of ``grad``; else None."""
    x5, g5 = _five(x), _five(grad)
    kern = (1,) * (5 - x.ndim) + tuple(kernel)
    st = (1,) * (5 - x.ndim) + tuple(stride)
    pad = (0,) * (5 - x.ndim) + tuple(padding)
    n, c, i_d, i_h, i_w = x5.shape
    _, _, o_d, o_h, o_w = g5.shape
    rows = n * o_d * o_h
    if kern[2] > MAX_LAST_TAPS:
        raise ValueError(f"the Triton weight gradient takes at most {MAX_LAST_TAPS} taps along the last axis")
    block_c = _channel_block(c)
    block_w = 512 // block_c  # KW float32 accumulators of block_w x block_c
    taps, cblocks = kern[0] * kern[1], triton.cdiv(c, block_c)
    sms = _multiprocessors(x.device)
    target = WGRAD_PROGRAMS_PER_SM * sms
    chunks = max(1, min(rows, triton.cdiv(target, taps * cblocks)))
    per_prog = triton.cdiv(rows, chunks)
    chunks = triton.cdiv(rows, per_prog)
    part = torch.empty((chunks, taps, kern[2], c), device=x.device, dtype=torch.float32)
    bpart = torch.empty((chunks, c), device=x.device, dtype=torch.float32) if bias_grad else part
    if bias_grad and (pad[0], pad[1]) != (kern[0] // 2, kern[1] // 2):
        raise ValueError("the fused bias gradient needs padding k // 2 (the centre tap sees every row)")
    _dw_wgrad[(taps, cblocks, chunks)](
        x5, g5, part, bpart,
        c, i_d, i_h, i_w, o_d, o_h, o_w, rows, per_prog,
        *x5.stride(), *g5.stride(), *pad, kern[0], kern[1], *st,
        KW=kern[2], BIAS_GRAD=bias_grad, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=WGRAD_WARPS,
    )  # fmt: skip
    gw = part.sum(dim=0)  # (KD*KH, KW, C)
    return gw.permute(2, 0, 1).reshape(c, 1, *kernel), bpart.sum(dim=0) if bias_grad else None


def _channels_last_empty(like: torch.Tensor, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    fmt = torch.channels_last_3d if len(size) == 5 else torch.channels_last
    return torch.empty(size, device=like.device, dtype=dtype, memory_format=fmt)


def transposed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...], out_size: tuple[int, ...]
) -> torch.Tensor:
    """``out[i] = sum_m x[m] * w[i + k//2 - s*m] (+ b)`` for ``i < out_size``: the transposed conv
    (padding k//2) and the input gradient of a conv, computed phase by phase (polyphase)."""
    kernel = tuple(weight.shape[2:])
    n, c = x.shape[:2]
    out = _channels_last_empty(x, (n, c, *out_size), x.dtype)
    phases = list(itertools.product(*(range(s) for s in stride)))
    parts = {ph: [transposed_phase(k, s, r) for k, s, r in zip(kernel, stride, ph)] for ph in phases}
    if any(p is None for ps in parts.values() for p in ps):  # k < s: some outputs get no tap at all
        out.zero_()
        if bias is not None:
            out += bias.view(1, -1, *(1,) * len(stride))
    for ph in phases:
        ps = parts[ph]
        if any(p is None for p in ps) or any(r >= o for r, o in zip(ph, out_size)):
            continue
        sub = sub_kernel(weight, [p[0] for p in ps])
        view = out[(slice(None), slice(None), *(slice(r, None, s) for r, s in zip(ph, stride)))]
        conv_forward(x, sub, bias, (1,) * len(stride), tuple(p[1] for p in ps), view)
    return out


GN_PROGRAMS_PER_SM = 8  # reduction programs per multiprocessor (chunks of voxels x channel blocks)


def _gn_view(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) with a contiguous channel axis as an (N, S, C) view."""
    if t.stride(1) != 1:
        raise ValueError("the Triton group norm needs a channels-last tensor (channel stride 1)")
    return voxel_rows(t)


def _gn_tiles(c: int) -> tuple[int, int]:
    block_c = _channel_block(c)
    return 2048 // block_c, block_c


_GN_BLOCK_K = 16  # chunks summed per step by the statistics kernels


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _gn_reduce_launch(x3, g3, part_in, stats, mode: int, acc: torch.dtype, chunks: int | None = None) -> torch.Tensor:
    """``_gn_reduce`` over (N, S, C) views; returns its chunks' sums, shape (N, chunks, 2, C)."""
    n, s, c = x3.shape
    block_v, block_c = _gn_tiles(c)
    cblocks = triton.cdiv(c, block_c)
    if chunks is None:
        sms = _multiprocessors(x3.device)
        chunks = max(1, min(triton.cdiv(s, block_v), triton.cdiv(GN_PROGRAMS_PER_SM * sms, n * cblocks)))
    chunk = triton.cdiv(triton.cdiv(s, chunks), block_v) * block_v
    chunks = triton.cdiv(s, chunk)
    part = torch.empty((n, chunks, 2, c), device=x3.device, dtype=acc)  # mode 0 fills [:, :, 0] only
    g3 = x3 if g3 is None else g3
    _gn_reduce[(n * chunks, cblocks)](
        x3, g3, part if part_in is None else part_in, part if stats is None else stats, part,
        s, c, chunk, chunks, x3.stride(0), x3.stride(1), g3.stride(0), g3.stride(1),
        MODE=mode, ACC=_acc_type(acc), BLOCK_V=block_v, BLOCK_C=block_c, BLOCK_K=_GN_BLOCK_K,
    )  # fmt: skip
    return part


def _gn_apply_launch(x3: torch.Tensor, g3, coef: torch.Tensor, out3: torch.Tensor) -> None:
    n, s, c = x3.shape
    block_v, block_c = _gn_tiles(c)
    vb = triton.cdiv(s, block_v)
    g3 = x3 if g3 is None else g3
    _gn_apply[(n * vb, triton.cdiv(c, block_c))](
        x3, g3, coef, out3,
        s, c, vb, x3.stride(0), x3.stride(1), g3.stride(0), g3.stride(1), out3.stride(0), out3.stride(1),
        HAS_G=g3 is not x3, ACC=_acc_type(coef.dtype), BLOCK_V=block_v, BLOCK_C=block_c,
    )  # fmt: skip


class _GroupNorm(torch.autograd.Function):
    """GroupNorm with one group per channel on a channels-last tensor in seven kernel launches:
    forward two read passes (exact two-pass statistics), a statistics kernel and the output pass;
    backward one read pass for its sums, a statistics kernel (which also gives the weight and bias
    gradients) and the input-gradient pass. Stores only the input and the per-sample statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        n, c = x.shape[:2]
        x3 = _gn_view(x)
        s = x3.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        part0 = _gn_reduce_launch(x3, None, None, None, 0, acc)
        part1 = _gn_reduce_launch(x3, None, part0, None, 1, acc, chunks=part0.shape[1])
        stats = torch.empty((n, 2, c), device=x.device, dtype=acc)
        coef = torch.empty((n, 3, c), device=x.device, dtype=acc)
        block_c = _gn_tiles(c)[1]
        _gn_forward_stats[(n, triton.cdiv(c, block_c))](
            part0, part1, weight, bias, stats, coef, s, c, part0.shape[1], eps,
            ACC=_acc_type(acc), BLOCK_C=block_c, BLOCK_K=_GN_BLOCK_K,
        )  # fmt: skip
        out = _channels_last_empty(x, tuple(x.shape), out_dtype)
        _gn_apply_launch(x3, None, coef, _gn_view(out))
        ctx.save_for_backward(x, weight, stats)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, stats = ctx.saved_tensors
        n, c = x.shape[:2]
        x3, g3 = _gn_view(x), _gn_view(channels_last(grad))
        s = x3.shape[1]
        part = _gn_reduce_launch(x3, g3, None, stats, 2, stats.dtype)
        coef = torch.empty((n, 3, c), device=x.device, dtype=stats.dtype)
        gw = torch.empty(c, device=x.device, dtype=stats.dtype)
        gb = torch.empty(c, device=x.device, dtype=stats.dtype)
        block_c = _gn_tiles(c)[1]
        _gn_backward_stats[(triton.cdiv(c, block_c),)](
            part, weight, stats, coef, gw, gb, n, s, c, part.shape[1],
            ACC=_acc_type(stats.dtype), BLOCK_C=block_c, BLOCK_K=_GN_BLOCK_K,
        )  # fmt: skip
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _channels_last_empty(x, tuple(x.shape), x.dtype)
            _gn_apply_launch(x3, g3, coef, _gn_view(gx))
        return gx, gw.to(weight.dtype), gb.to(weight.dtype), None, None


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm with one group per channel (MedNeXt's norm) of a channels-last tensor, statistics in
    float32 (float64 for float64 input). Under autocast the output is in autocast's dtype, which is
    what the next 1x1 convolution casts PyTorch's float32 group norm output to."""
    out_dtype = autocast_dtype(x.device.type) or x.dtype
    return _GroupNorm.apply(x, weight, bias, float(eps), out_dtype)


def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Under autocast the activations run in autocast's dtype, as with PyTorch's convolutions. With
    ``cuda_route.dw_weights == "float32"`` the float32 weights and bias go to the kernels as they
    are (the kernels read them as float32 anyway): no cast launch each way per conv, and the weight
    and bias gradients come back in float32. "autocast" rounds them to autocast's dtype first, as
    PyTorch's convolutions see them."""
    dtype = autocast_dtype(x.device.type) or x.dtype
    if config.get().cuda_route.dw_weights == "float32" and weight.dtype in (torch.float32, dtype):
        return x.to(dtype), weight, bias
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _bias_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return grad.sum(dim=(0, *range(2, grad.ndim)), dtype=torch.float32).to(weight.dtype)


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise conv, odd kernel, padding k//2, any stride (output (N-1)//s+1 per axis)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        kernel = tuple(weight.shape[2:])
        padding = tuple(k // 2 for k in kernel)
        size = tuple((v - 1) // s + 1 for v, s in zip(x.shape[2:], stride))
        out = _channels_last_empty(x, (*x.shape[:2], *size), x.dtype)
        conv_forward(x, weight, bias, stride, padding, out)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernel = tuple(weight.shape[2:])
        padding = tuple(k // 2 for k in kernel)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = transposed(grad, weight, None, ctx.stride, tuple(x.shape[2:]))
        want_gb = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:  # the bias gradient from the same pass over grad
            gw, gb = weight_grad(x, grad, kernel, ctx.stride, padding, bias_grad=want_gb)
            gw, gb = gw.to(weight.dtype), None if gb is None else gb.to(weight.dtype)
        elif want_gb:
            gb = _bias_grad(grad, weight)
        return gx, gw, gb, None


class _DepthwiseConvTranspose(torch.autograd.Function):
    """Depthwise transposed conv, odd kernel, padding k//2 (output (N-1)*s+1 per axis)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        size = tuple((v - 1) * s + 1 for v, s in zip(x.shape[2:], stride))
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        return transposed(x, weight, bias, stride, size)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernel = tuple(weight.shape[2:])
        padding = tuple(k // 2 for k in kernel)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # a strided conv of the output gradient
            gx = _channels_last_empty(x, tuple(x.shape), grad.dtype)
            conv_forward(grad, weight, None, ctx.stride, padding, gx)
        if ctx.needs_input_grad[1]:  # the strided conv's weight gradient with x and grad swapped
            gw = weight_grad(grad, x, kernel, ctx.stride, padding)[0].to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = _bias_grad(grad, weight)
        return gx, gw, gb, None


def depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """Depthwise conv (odd kernel, padding k//2, stride ``stride``) through the Triton kernels."""
    return _DepthwiseConv.apply(*_autocast(x, weight, bias), tuple(stride))


def depthwise_conv_transpose(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """Depthwise transposed conv (odd kernel, padding k//2) through the Triton kernels."""
    return _DepthwiseConvTranspose.apply(*_autocast(x, weight, bias), tuple(stride))


__all__ = ["conv_forward", "depthwise_conv", "depthwise_conv_transpose", "group_norm", "transposed", "weight_grad"]
