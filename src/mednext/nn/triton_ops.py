"""Triton kernels for MedNeXt's depthwise convolutions on CUDA (channels-last activations).

PyTorch's CUDA depthwise 3D convolution (its own kernel for NCDHW, cuDNN for channels-last)
runs near 1 TFLOP/s: on an H200, one 5x5x5 depthwise conv of 2x32x128^3 in float16 takes 14 ms
forward and 80 ms forward + backward, and these convolutions are two thirds of a MedNeXt-L k5
training step (docs/benchmarks.md). Two generic kernels cover every form MedNeXt needs:

- ``_dw_fwd``: ``y[o] = sum_k x[S*o + k - P] * w[k] (+ b)`` per channel and axis, for any kernel
  size, stride ``S`` and front padding ``P`` (zero outside the input), on tensors of any strides
  whose channel axis is contiguous. Forward of the stride-1 and strided convs; the input
  gradient of the transposed conv (a strided conv of the output gradient); and, phase by phase
  with sub-kernels, the transposed conv and the input gradient of every conv (polyphase form:
  only taps that meet a real voxel are computed, never the zeros of an upsampled grid).
- ``_dw_wgrad``: ``gw[k] = sum_o g[o] * x[S*o + k - P]``, the weight gradient of the convs (and,
  with the roles of ``x`` and ``g`` swapped, of the transposed conv), reduced in float32.

Accumulation is float32 for every input dtype; under CUDA autocast the wrappers run in the
autocast dtype like PyTorch's convolutions. tests/test_cuda_route.py checks every form against
PyTorch's convolutions (on the CPU through Triton's interpreter when no GPU is present).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from mednext.nn.ops import _autocast_dtype, _sub_kernel, _transposed_phase


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
    x_ptr, g_ptr, part_ptr,
    C, ID, IH, IW, OD, OH, OW, ROWS, ROWS_PER_PROG,
    sxn, sxc, sxd, sxh, sxw,
    sgn, sgc, sgd, sgh, sgw,
    PD, PH, PW, KD, KH, SD, SH, SW,
    KW: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One program: tap (kd, kh), one channel block, a chunk of output rows. The KW taps along the
    # last axis share every load of g, each with its own float32 accumulator (KW <= 7), reduced
    # over voxels once at the end.
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


MAX_LAST_TAPS = 7  # _dw_wgrad keeps one accumulator per tap along the last axis


# ----------------------------------------------------------------------------- launchers


# Output rows per forward program for layers of at most 32 channels (the input rows they share are
# loaded once); wider layers use one. Weight-gradient programs per multiprocessor. Measured on an
# H200 (docs/benchmarks.md): 5x5x5 on 2x32x128^3 took 3.6 ms with 2 rows against 4.0 with 1 and
# 5.5 with 4; on 2x64x64^3, 1.0 ms with 1 row against 1.6 with 2.
FWD_ROWS = 2
WGRAD_PROGRAMS_PER_SM = 16


def _blocks(channels: int) -> tuple[int, int]:
    """Tile (voxels along the last axis, channels): 32 x 32 for MedNeXt's first stage, 16 x 64
    beyond; few distinct tiles keep the number of compiled kernel variants small."""
    block_c = 32 if channels <= 32 else 64
    return 1024 // block_c, block_c


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
    )  # fmt: skip
    return out


def weight_grad(
    x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...]
) -> torch.Tensor:
    """``gw[c, k] = sum_o grad[o] * x[s*o + k - p]`` in float32, shape (C, 1, *kernel)."""
    x5, g5 = _five(x), _five(grad)
    kern = (1,) * (5 - x.ndim) + tuple(kernel)
    st = (1,) * (5 - x.ndim) + tuple(stride)
    pad = (0,) * (5 - x.ndim) + tuple(padding)
    n, c, i_d, i_h, i_w = x5.shape
    _, _, o_d, o_h, o_w = g5.shape
    rows = n * o_d * o_h
    if kern[2] > MAX_LAST_TAPS:
        raise ValueError(f"the Triton weight gradient takes at most {MAX_LAST_TAPS} taps along the last axis")
    block_c = 32 if c <= 32 else 64
    block_w = 512 // block_c  # KW float32 accumulators of block_w x block_c
    taps, cblocks = kern[0] * kern[1], triton.cdiv(c, block_c)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    target = WGRAD_PROGRAMS_PER_SM * sms
    chunks = max(1, min(rows, triton.cdiv(target, taps * cblocks)))
    per_prog = triton.cdiv(rows, chunks)
    chunks = triton.cdiv(rows, per_prog)
    part = torch.empty((chunks, taps, kern[2], c), device=x.device, dtype=torch.float32)
    _dw_wgrad[(taps, cblocks, chunks)](
        x5, g5, part,
        c, i_d, i_h, i_w, o_d, o_h, o_w, rows, per_prog,
        *x5.stride(), *g5.stride(), *pad, kern[0], kern[1], *st,
        KW=kern[2], BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    gw = part.sum(dim=0)  # (KD*KH, KW, C)
    return gw.permute(2, 0, 1).reshape(c, 1, *kernel)


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
    parts = {ph: [_transposed_phase(k, s, r) for k, s, r in zip(kernel, stride, ph)] for ph in phases}
    if any(p is None for ps in parts.values() for p in ps):  # k < s: some outputs get no tap at all
        out.zero_()
        if bias is not None:
            out += bias.view(1, -1, *(1,) * len(stride))
    for ph in phases:
        ps = parts[ph]
        if any(p is None for p in ps) or any(r >= o for r, o in zip(ph, out_size)):
            continue
        sub = _sub_kernel(weight, [p[0] for p in ps])
        view = out[(slice(None), slice(None), *(slice(r, None, s) for r, s in zip(ph, stride)))]
        conv_forward(x, sub, bias, (1,) * len(stride), tuple(p[1] for p in ps), view)
    return out


def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    dtype = _autocast_dtype(x.device.type) or x.dtype
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
        if ctx.needs_input_grad[1]:
            gw = weight_grad(x, grad, kernel, ctx.stride, padding).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
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
            gw = weight_grad(grad, x, kernel, ctx.stride, padding).to(weight.dtype)
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


__all__ = ["conv_forward", "depthwise_conv", "depthwise_conv_transpose", "transposed", "weight_grad"]
