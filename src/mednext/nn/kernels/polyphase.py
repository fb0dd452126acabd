"""Polyphase forms of the strided and transposed depthwise convolutions.

A stride-s depthwise conv (or transposed conv) is a sum (or an interleave) of s^d stride-1
depthwise convs with sub-kernels on the s^d phases of the input (or output). These forms do
1/s^d of the zero-insertion form's multiply-adds and need only stride-1 kernels, which are the
fast ones in every backend. Exact rewrites; tests compare them with PyTorch's convolutions in
float64.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from mednext.nn.kernels.cpu import channels_last, pytorch_depthwise_conv

__all__ = [
    "depthwise_conv_strided_polyphase",
    "depthwise_conv_transpose_polyphase",
    "strided_phase",
    "sub_kernel",
    "transposed_phase",
]


def transposed_phase(k: int, s: int, r: int) -> tuple[list[int], int, int] | None:
    """Output phase ``r`` of a stride-``s`` transposed conv (odd kernel ``k``, padding k//2) as a
    correlation over the input: kernel indices in correlation order, front and back padding."""
    p = k // 2
    ts = [t for t in range(-k, k + 1) if 0 <= s * t + r + p <= k - 1]
    if not ts:
        return None
    lo, hi = min(ts), max(ts)
    return [s * t + r + p for t in range(hi, lo - 1, -1)], hi, -lo


def strided_phase(k: int, s: int, q: int, n: int, m: int) -> tuple[list[int], int, int] | None:
    """Input phase ``q`` of a stride-``s`` conv (odd kernel ``k``, padding k//2, ``n`` inputs and
    ``m`` outputs along the axis) as a correlation over ``x[q::s]``: kernel indices, padding."""
    p = k // 2
    taps = [t for t in range(k) if (t - p - q) % s == 0]
    length = len(range(q, n, s))
    if not taps or length == 0:
        return None
    a_lo, a_hi = (taps[0] - p - q) // s, (taps[-1] - p - q) // s
    return taps, -a_lo, (m - 1 + a_hi) - (length - 1)


def _pad_args(pads: list[tuple[int, int]]) -> tuple[int, ...]:
    return tuple(v for front, back in reversed(pads) for v in (front, back))


def sub_kernel(weight: torch.Tensor, index: list[list[int]]) -> torch.Tensor:
    """The taps ``index[axis]`` (each an arithmetic progression) of every spatial axis, by slicing: no
    index tensor is copied to the device, so the ops can be captured in a CUDA graph."""
    for axis, idx in enumerate(index):
        ascending = sorted(idx)
        step = ascending[1] - ascending[0] if len(idx) > 1 else 1
        if step < 1 or ascending != list(range(ascending[0], ascending[-1] + 1, step)):
            raise ValueError(f"sub-kernel taps {idx} are not evenly spaced")
        weight = weight[(slice(None),) * (2 + axis) + (slice(ascending[0], ascending[-1] + 1, step),)]
        if list(idx) != ascending:
            weight = weight.flip(2 + axis)
    return weight.contiguous()


def depthwise_conv_transpose_polyphase(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...], conv=None
) -> torch.Tensor:
    """Depthwise transposed conv (odd kernel, padding k//2, output (N-1)*s+1 per axis) as s^d
    stride-1 depthwise convs of the input with sub-kernels, interleaved into the output.
    ``conv(x, w)`` is the stride-1, unpadded depthwise conv to use (default: PyTorch's)."""
    conv = conv or (lambda t, w: pytorch_depthwise_conv(t, w, None, (0,) * (t.ndim - 2)))
    n, c, *spatial = x.shape
    kernel = weight.shape[2:]
    out_size = [(v - 1) * s + 1 for v, s in zip(spatial, stride)]
    phases = []
    for phase in itertools.product(*(range(s) for s in stride)):
        parts = [transposed_phase(k, s, r) for k, s, r in zip(kernel, stride, phase)]
        if any(part is None for part in parts) or any(r > o - 1 for r, o in zip(phase, out_size)):
            continue
        w = sub_kernel(weight, [part[0] for part in parts])
        y = conv(F.pad(x, _pad_args([(part[1], part[2]) for part in parts])), w)
        counts = [(o - 1 - r) // s + 1 for o, r, s in zip(out_size, phase, stride)]
        phases.append((phase, y[(slice(None), slice(None), *(slice(0, m) for m in counts))]))
    dtype = phases[0][1].dtype if phases else x.dtype  # autocast may have lowered the convs' dtype
    out = x.new_zeros((n, c, *out_size), dtype=dtype)
    if x.movedim(1, -1).is_contiguous():
        out = channels_last(out)
    if bias is not None:
        out += bias.to(dtype).view(1, -1, *(1,) * len(stride))
    for phase, y in phases:
        out[(slice(None), slice(None), *(slice(r, None, s) for r, s in zip(phase, stride)))] += y
    return out


def depthwise_conv_strided_polyphase(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...], conv=None
) -> torch.Tensor:
    """Strided depthwise conv (odd kernel, padding k//2) as the sum of s^d stride-1 depthwise
    convs of the input's phases ``x[q::s]`` with sub-kernels."""
    conv = conv or (lambda t, w: pytorch_depthwise_conv(t, w, None, (0,) * (t.ndim - 2)))
    spatial = x.shape[2:]
    kernel = weight.shape[2:]
    out_size = [(v - 1) // s + 1 for v, s in zip(spatial, stride)]
    out = None
    for phase in itertools.product(*(range(s) for s in stride)):
        parts = [strided_phase(k, s, q, v, m) for k, s, q, v, m in zip(kernel, stride, phase, spatial, out_size)]
        if any(part is None for part in parts):
            continue
        w = sub_kernel(weight, [part[0] for part in parts])
        xq = x[(slice(None), slice(None), *(slice(q, None, s) for q, s in zip(phase, stride)))]
        y = conv(F.pad(xq, _pad_args([(part[1], part[2]) for part in parts])), w)
        out = y if out is None else out + y
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, *(1,) * len(stride))
    return out
