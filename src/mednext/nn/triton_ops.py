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
autocast dtype like PyTorch's convolutions. tests/test_triton_ops.py checks every form against
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
    C, ID, IH, IW, OD, OH, OW,
    sxn, sxc, sxd, sxh, sxw,
    syn, syc, syd, syh, syw,
    PD, PH, PW, KD, KH, SD, SH, SW,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # one output row (n, od, oh)
    oh = row % OH
    od = (row // OH) % OD
    n = row // (OH * OD)
    ow = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    x_row = x_ptr + n * sxn + c[None, :] * sxc
    for kd in range(KD):  # runtime loops over depth and height taps keep one compiled kernel per KW
        idd = od * SD + kd - PD
        for kh in range(KH):
            ih = oh * SH + kh - PH
            row_ok = (idd >= 0) & (idd < ID) & (ih >= 0) & (ih < IH)
            for kw in tl.static_range(KW):
                iw = ow * SW + kw - PW
                m = (iw >= 0) & (iw < IW) & row_ok
                xv = tl.load(
                    x_row + idd * sxd + ih * sxh + iw[:, None] * sxw, mask=m[:, None] & cmask[None, :], other=0.0
                )
                wv = tl.load(w_ptr + c * (KD * KH * KW) + ((kd * KH + kh) * KW + kw), mask=cmask, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + n * syn + od * syd + oh * syh + ow[:, None] * syw + c[None, :] * syc
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(ow < OW)[:, None] & cmask[None, :])


@triton.jit
def _dw_wgrad(
    x_ptr, g_ptr, part_ptr,
    C, ID, IH, IW, OD, OH, OW, ROWS, ROWS_PER_PROG,
    sxn, sxc, sxd, sxh, sxw,
    sgn, sgc, sgd, sgh, sgw,
    PD, PH, PW, KD, KH, SD, SH, SW,
    KW: tl.constexpr, KW_PAD: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    tap = tl.program_id(0)  # kd * KH + kh; the KW taps along the last axis share every load of g
    kd = tap // KH
    kh = tap % KH
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    chunk = tl.program_id(2)
    kwi = tl.arange(0, KW_PAD)
    # one float32 partial sum per (tap along the last axis, voxel, channel), reduced once at the end
    acc = tl.zeros((KW_PAD, BLOCK_W, BLOCK_C), dtype=tl.float32)
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
            x_row = x_ptr + n * sxn + idd * sxd + ih * sxh + c[None, None, :] * sxc
            for w0 in range(0, OW, BLOCK_W):
                ow = w0 + tl.arange(0, BLOCK_W)
                om = ow < OW
                gv = tl.load(g_row + ow[:, None] * sgw, mask=om[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                iw = ow[None, :] * SW + kwi[:, None] - PW  # (KW_PAD, BLOCK_W)
                m = om[None, :] & (iw >= 0) & (iw < IW) & (kwi[:, None] < KW)
                xv = tl.load(x_row + iw[:, :, None] * sxw, mask=m[:, :, None] & cmask[None, None, :], other=0.0)
                acc += gv[None, :, :] * xv.to(tl.float32)
    part = tl.sum(acc, axis=1)  # (KW_PAD, BLOCK_C)
    out = part_ptr + ((chunk * (KD * KH) + tap) * KW_PAD + kwi[:, None]) * C + c[None, :]
    tl.store(out, part, mask=(kwi < KW)[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------- launchers


def _blocks(channels: int) -> tuple[int, int]:
    """Tile (voxels along the last axis, channels): 32 x 32 for MedNeXt's first stage, 16 x 64
    beyond; few distinct tiles keep the number of compiled kernel variants small."""
    block_c = 32 if channels <= 32 else 64
    return 1024 // block_c, block_c


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
    x5, o5, w5 = _five(x), _five(out), _five(weight).contiguous()
    st = (1,) * (5 - x.ndim) + tuple(stride)
    pad = (0,) * (5 - x.ndim) + tuple(padding)
    n, c, i_d, i_h, i_w = x5.shape
    _, _, o_d, o_h, o_w = o5.shape
    if o5.numel() == 0:
        return out
    block_w, block_c = _blocks(c)
    grid = (n * o_d * o_h, triton.cdiv(o_w, block_w), triton.cdiv(c, block_c))
    _dw_fwd[grid](
        x5, w5, bias if bias is not None else w5, o5,
        c, i_d, i_h, i_w, o_d, o_h, o_w,
        *x5.stride(), *o5.stride(), *pad, w5.shape[2], w5.shape[3], *st,
        KW=w5.shape[4], HAS_BIAS=bias is not None, BLOCK_W=block_w, BLOCK_C=block_c,
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
    kw_pad = triton.next_power_of_2(kern[2])
    block_c = 32 if c <= 32 else 64
    block_w = max(1, 4096 // (block_c * kw_pad))  # a float32 accumulator of 4096 values
    taps, cblocks = kern[0] * kern[1], triton.cdiv(c, block_c)
    target = 4 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2)
    chunks = max(1, min(rows, triton.cdiv(target, taps * cblocks)))
    per_prog = triton.cdiv(rows, chunks)
    chunks = triton.cdiv(rows, per_prog)
    part = torch.empty((chunks, taps, kw_pad, c), device=x.device, dtype=torch.float32)
    _dw_wgrad[(taps, cblocks, chunks)](
        x5, g5, part,
        c, i_d, i_h, i_w, o_d, o_h, o_w, rows, per_prog,
        *x5.stride(), *g5.stride(), *pad, kern[0], kern[1], *st,
        KW=kern[2], KW_PAD=kw_pad, BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    gw = part[:, :, : kern[2]].sum(dim=0)  # (KD*KH, KW, C)
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
