"""Fast channels-last kernels for the depthwise convolutions of the fast path.

PyTorch's CPU depthwise convolution is fast forward in channels-last layout, but its backward
is not (its weight gradient takes many times the forward's time). Here every depthwise conv of
MedNeXt (stride 1, strided down, transposed up) becomes one stride-1 depthwise conv whose
backward is

- input gradient: a stride-1 depthwise conv of the output gradient with the flipped kernel
  (the same fast forward kernel), valid for odd kernels with padding k//2;
- weight gradient: for each kernel tap, a dot product per channel between the output gradient
  and the shifted input, over the voxels where the shifted input is inside the volume; both are
  views of the channels-last tensors, taken slab by slab so each slab stays in cache.

Strided convs are the stride-1 conv subsampled; transposed convs are the stride-1 conv (flipped
kernel) of the zero-inserted input. Both are exact rewrites; tests compare them with PyTorch's
own convolutions in float64. Also here: the channels-last group norm with float32-accurate
statistics, and the layout helpers the other kernels share.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "autocast_dtype",
    "channel_group_norm",
    "channels_last",
    "depthwise_conv",
    "depthwise_conv_strided",
    "depthwise_conv_transpose",
    "depthwise_weight_grad",
    "pytorch_depthwise_conv",
    "voxel_rows",
]

# Bytes of the gradient per slab of the weight gradient: a slab and the input window it meets stay
# in a core's L2 cache across all kernel taps.
_CHUNK_BYTES = 2 << 20


def pytorch_depthwise_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    padding: tuple[int, ...],
    stride: tuple[int, ...] | int = 1,
) -> torch.Tensor:
    """PyTorch's depthwise conv (one group per channel), 2D or 3D, channels-last for channels-last
    ``x``: PyTorch's CPU conv returns channels-first under bfloat16 autocast, and for some small
    kernels with one thread, which would take the blocks after it off the fast path."""
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    y = conv(x, w, b, stride=stride, padding=padding, groups=x.shape[1])
    return channels_last(y) if x.movedim(1, -1).is_contiguous() else y


def _tap_range(alpha: int, beta: int, n_g: int, gamma: int, delta: int, n_x: int) -> tuple[int, int]:
    """The q with 0 <= alpha*q + beta < n_g and 0 <= gamma*q + delta < n_x, as [lo, hi)."""
    lo = max(-(beta // alpha), -(delta // gamma))  # ceil(-beta / alpha), ceil(-delta / gamma)
    hi = min((n_g - 1 - beta) // alpha, (n_x - 1 - delta) // gamma) + 1
    return lo, hi


def depthwise_weight_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...] | None = None,
    mode: str = "conv",
) -> torch.Tensor:
    """Gradient of a depthwise conv's weight (odd kernel, padding k//2), shape (C, 1, *kernel), for
    channels-last input ``x`` and output gradient ``grad``.

    ``mode`` "conv": the conv with ``stride`` (default 1), output voxel q reading input s*q + t - p
    at tap t. "transpose": the transposed conv with ``stride``, written as the stride-1 conv with
    the flipped kernel of the input with s-1 zeros inserted between voxels; only the products with
    input voxels count, output voxel s*q - t + p meets input voxel q at (flipped) tap t.

    Per tap, the sum over voxels of the gradient times the input it meets: both are strided views
    clipped to the voxels inside the volume, so no padded, zero-inserted or subsampled copy is made
    and no product with a zero is taken. The work goes slab by slab along the first spatial axis,
    about 2 MiB of the gradient per slab, so a slab stays in cache across the taps."""
    padding = [k // 2 for k in kernel]
    stride = tuple(stride or (1,) * len(kernel))
    xs, gs = x.movedim(1, -1), grad.movedim(1, -1)  # (N, *S, C) views
    n, *n_x, c = xs.shape
    n_g = gs.shape[1:-1]
    taps = list(itertools.product(*(range(k) for k in kernel)))
    # per tap and axis: g index alpha*q + beta, x index gamma*q + delta
    if mode == "conv":
        maps = [[(1, 0, s, t - p) for t, p, s in zip(tap, padding, stride)] for tap in taps]
    elif mode == "transpose":
        maps = [[(s, p - t, 1, 0) for t, p, s in zip(tap, padding, stride)] for tap in taps]
    else:
        raise ValueError(f"mode={mode!r}: use 'conv' or 'transpose'")
    ranges = [[_tap_range(*m[a][:2], n_g[a], *m[a][2:], n_x[a]) for a in range(len(kernel))] for m in maps]
    acc = torch.zeros(len(taps), c, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    slab_bytes = n * math.prod(n_g[1:]) * c * grad.element_size()
    planes = max(1, _CHUNK_BYTES // slab_bytes)  # gradient planes per slab
    for start in range(0, n_g[0], planes):
        stop = start + planes
        for i, (m, r) in enumerate(zip(maps, ranges)):
            (alpha, beta, gamma, delta), (lo, hi) = m[0], r[0]
            # the q whose gradient plane alpha*q + beta falls in [start, stop)
            lo = max(lo, -((beta - start) // alpha))
            hi = min(hi, (stop - 1 - beta) // alpha + 1)
            if lo >= hi or any(a >= b for a, b in r[1:]):
                continue
            g_idx = [slice(alpha * lo + beta, alpha * (hi - 1) + beta + 1, alpha)]
            x_idx = [slice(gamma * lo + delta, gamma * (hi - 1) + delta + 1, gamma)]
            for (al, be, ga, de), (a, b) in zip(m[1:], r[1:]):
                g_idx.append(slice(al * a + be, al * (b - 1) + be + 1, al))
                x_idx.append(slice(ga * a + de, ga * (b - 1) + de + 1, ga))
            prod = torch.mul(gs[(slice(None), *g_idx)], xs[(slice(None), *x_idx)])
            acc[i] += prod.view(-1, c).sum(dim=0)
    out = acc.t().reshape(c, 1, *kernel).to(x.dtype)
    return out.flip(tuple(range(2, out.ndim))) if mode == "transpose" else out


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs convolutions in on this device, or None when it is off."""
    if device_type not in ("cpu", "cuda"):  # e.g. the meta device of the MAC and memory estimates
        return None
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4 has no per-device queries
        return None


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stride-1 depthwise conv with padding k//2 (odd kernels), fast backward. Under autocast it
    runs in autocast's dtype, like PyTorch's convolutions (the backward then sees one dtype)."""
    return _DepthwiseConv.apply(*_autocast_args(x, weight, bias), (1,) * (x.ndim - 2), False)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d if t.ndim == 5 else torch.channels_last)


def voxel_rows(t: torch.Tensor) -> torch.Tensor:
    """Channels-last (N, C, *S) as (N, P, C), P the number of voxels (a view for compact storage)."""
    return t.movedim(1, -1).reshape(t.shape[0], -1, t.shape[1])


def _zero_inserted(t: torch.Tensor, stride: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    """Channels-last (N, C, *size) zeros with ``t`` on every s-th voxel from the first."""
    n, c = t.shape[:2]
    up = t.new_zeros((n, *size, c)).movedim(-1, 1)
    up[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = t
    return up


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise conv (odd kernel, padding k//2) on channels-last tensors, stride-1, strided or
    transposed (output (N-1)*s+1 per axis); it stores its input and weight only.

    Forward: PyTorch's (strided) conv; the transposed conv is the stride-1 conv, flipped kernel,
    of the zero-inserted input. Backward: the input gradient of the (strided) conv is the stride-1
    conv, flipped kernel, of the (zero-inserted) output gradient, and that of the transposed conv
    the strided conv of the output gradient with the kernel itself; the weight gradient takes only
    the products that exist (:func:`depthwise_weight_grad`), none with inserted zeros."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, transposed):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.transposed, ctx.has_bias = stride, transposed, bias is not None
        padding = tuple(k // 2 for k in weight.shape[2:])
        if not transposed:
            return pytorch_depthwise_conv(x, weight, bias, padding, stride)
        size = tuple((v - 1) * s + 1 for v, s in zip(x.shape[2:], stride))
        return pytorch_depthwise_conv(
            _zero_inserted(x, stride, size), weight.flip(tuple(range(2, weight.ndim))), bias, padding
        )

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernel = tuple(weight.shape[2:])
        padding = tuple(k // 2 for k in kernel)
        stride = ctx.stride
        grad = channels_last(grad)
        spatial = tuple(range(2, grad.ndim))
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if ctx.transposed:
                gx = pytorch_depthwise_conv(grad, weight, None, padding, stride)
            else:
                strided = any(s > 1 for s in stride)
                g = _zero_inserted(grad, stride, tuple(x.shape[2:])) if strided else grad
                gx = pytorch_depthwise_conv(g, weight.flip(spatial), None, padding)
        if ctx.needs_input_grad[1]:
            gw = depthwise_weight_grad(x, grad, kernel, stride, "transpose" if ctx.transposed else "conv")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, *spatial))
        return gx, gw, gb, None, None


def _autocast_args(x, weight, bias):
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return x, weight, bias


def depthwise_conv_strided(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """Strided depthwise conv with padding k//2 (odd kernels) on channels-last ``x``, fast backward."""
    return _DepthwiseConv.apply(*_autocast_args(x, weight, bias), tuple(stride), False)


def depthwise_conv_transpose(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """Depthwise transposed conv with padding k//2 (odd kernels; output (N-1)*s+1 per axis) on
    channels-last ``x``, fast backward."""
    return _DepthwiseConv.apply(*_autocast_args(x, weight, bias), tuple(stride), True)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Channels-last (N, C, *S) as the view (N, S[:-1] flattened, S[-1], C)."""
    return t.movedim(1, -1).reshape(t.shape[0], -1, t.shape[-1], t.shape[1])


def _keepdim(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return r.view(like.shape[0], like.shape[1], *(1,) * (like.ndim - 2))


def _sum_two_stage(t: torch.Tensor) -> torch.Tensor:
    return _keepdim(_rows(t).sum(dim=2).sum(dim=1), t)


def _norm_two_stage(t: torch.Tensor) -> torch.Tensor:
    inner = torch.linalg.vector_norm(_rows(t), dim=2)
    return _keepdim(torch.linalg.vector_norm(inner, dim=1), t)


class _ChannelGroupNorm(torch.autograd.Function):
    """GroupNorm with one group per channel on channels-last tensors.

    PyTorch's channels-last CPU kernel accumulates the variance in a way that loses about 1e-4
    relative accuracy on 64^3 volumes with a non-zero mean; this one subtracts the mean first
    (two-pass variance), as the contiguous kernel's accuracy requires.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        spatial = tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * len(spatial)
        count = math.prod(x.shape[2:])
        # Channels-last reductions over outer axes sum sequentially; two stages (last axis, then the
        # rest) keep each running sum short, so float32 stays accurate.
        xc = x - _sum_two_stage(x).div_(count)
        var = _norm_two_stage(xc).square_().div_(count)
        rstd = (var + eps).rsqrt_()
        ctx.save_for_backward(xc, rstd, weight)
        return torch.addcmul(bias.view(shape), xc, rstd * weight.view(shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xc, rstd, weight = ctx.saved_tensors
        spatial = tuple(range(2, xc.ndim))
        shape = (1, -1) + (1,) * len(spatial)
        count = math.prod(xc.shape[2:])
        sum_dy = _sum_two_stage(grad)
        sum_dy_xc = _sum_two_stage(grad * xc)
        gw = gb = gx = None
        if ctx.needs_input_grad[1]:
            gw = (sum_dy_xc * rstd).sum(dim=0).view(-1)
        if ctx.needs_input_grad[2]:
            gb = sum_dy.sum(dim=0).view(-1)
        if ctx.needs_input_grad[0]:
            k1 = rstd * weight.view(shape)
            k2 = -k1 * rstd.square() * sum_dy_xc / count
            gx = torch.addcmul(-k1 * sum_dy / count, grad, k1)
            gx.addcmul_(xc, k2)
        return gx, gw, gb, None


def channel_group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.group_norm(x, C, weight, bias, eps)`` for channels-last ``x``, float32-accurate; under
    autocast in float32, as autocast runs PyTorch's group norm."""
    if autocast_dtype(x.device.type) is not None:
        x, weight, bias = x.float(), weight.float(), bias.float()
    return _ChannelGroupNorm.apply(x, weight, bias, eps)
