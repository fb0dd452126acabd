"""Fast channels-last kernels for the depthwise convolutions of the fast path.

PyTorch's CPU depthwise convolution is fast forward in channels-last layout, but its backward
is not: the weight gradient alone of a 3x3x3 depthwise conv on 2x32x64^3 takes over ten times
the forward's time. Here every depthwise conv of MedNeXt (stride 1, strided down, transposed
up) becomes one stride-1 depthwise conv whose backward is

- input gradient: a stride-1 depthwise conv of the output gradient with the flipped kernel
  (the same fast forward kernel), valid for odd kernels with padding k//2;
- weight gradient: for each kernel tap, a dot product per channel between the output gradient
  and the shifted input, over the voxels where the shifted input is inside the volume; both are
  views of the channels-last tensors, taken slab by slab so each slab stays in cache.

Strided convs are the stride-1 conv subsampled; transposed convs are the stride-1 conv (flipped
kernel) of the zero-inserted input. Both are exact rewrites; tests compare them with PyTorch's
own convolutions in float64.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import warnings

import torch
import torch.nn.functional as F

# Size of the weight gradient's slabs: about 2 MiB of one operand, so a slab of the gradient and
# the input window it meets stay in the core's L2 cache across all kernel taps. Measured with the
# earlier padded-rows form (2 cores, 3x3x3 on 2x32x64^3): 65536 rows (8 MiB) 0.29 s, 32768 0.20 s,
# 16384 (2 MiB) 0.20 s, 8192 0.23 s; on 2x64x32^3 8 MiB 0.12 s, 2 MiB 0.064 s.
_CHUNK_BYTES = 2 << 20


def _conv(
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
    return _channels_last(y) if x.movedim(1, -1).is_contiguous() else y


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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
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


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d if t.ndim == 5 else torch.channels_last)


def _voxel_rows(t: torch.Tensor) -> torch.Tensor:
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
            return _conv(x, weight, bias, padding, stride)
        size = tuple((v - 1) * s + 1 for v, s in zip(x.shape[2:], stride))
        return _conv(_zero_inserted(x, stride, size), weight.flip(tuple(range(2, weight.ndim))), bias, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernel = tuple(weight.shape[2:])
        padding = tuple(k // 2 for k in kernel)
        stride = ctx.stride
        grad = _channels_last(grad)
        spatial = tuple(range(2, grad.ndim))
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if ctx.transposed:
                gx = _conv(grad, weight, None, padding, stride)
            else:
                strided = any(s > 1 for s in stride)
                g = _zero_inserted(grad, stride, tuple(x.shape[2:])) if strided else grad
                gx = _conv(g, weight.flip(spatial), None, padding)
        if ctx.needs_input_grad[1]:
            gw = depthwise_weight_grad(x, grad, kernel, stride, "transpose" if ctx.transposed else "conv")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, *spatial))
        return gx, gw, gb, None, None


def _autocast_args(x, weight, bias):
    dtype = _autocast_dtype(x.device.type)
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
    if _autocast_dtype(x.device.type) is not None:
        x, weight, bias = x.float(), weight.float(), bias.float()
    return _ChannelGroupNorm.apply(x, weight, bias, eps)


# ----------------------------------------------------------------------------- polyphase forms
#
# A stride-s depthwise conv (or transposed conv) is a sum (or an interleave) of s^d stride-1
# depthwise convs with sub-kernels on the s^d phases of the input (or output). These forms do
# 1/s^d of the zero-insertion form's multiply-adds and need only stride-1 kernels, which are the
# fast ones in every backend.


def _transposed_phase(k: int, s: int, r: int) -> tuple[list[int], int, int] | None:
    """Output phase ``r`` of a stride-``s`` transposed conv (odd kernel ``k``, padding k//2) as a
    correlation over the input: kernel indices in correlation order, front and back padding."""
    p = k // 2
    ts = [t for t in range(-k, k + 1) if 0 <= s * t + r + p <= k - 1]
    if not ts:
        return None
    lo, hi = min(ts), max(ts)
    return [s * t + r + p for t in range(hi, lo - 1, -1)], hi, -lo


def _strided_phase(k: int, s: int, q: int, n: int, m: int) -> tuple[list[int], int, int] | None:
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


def _sub_kernel(weight: torch.Tensor, index: list[list[int]]) -> torch.Tensor:
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
    conv = conv or (lambda t, w: _conv(t, w, None, (0,) * (t.ndim - 2)))
    n, c, *spatial = x.shape
    kernel = weight.shape[2:]
    out_size = [(v - 1) * s + 1 for v, s in zip(spatial, stride)]
    phases = []
    for phase in itertools.product(*(range(s) for s in stride)):
        parts = [_transposed_phase(k, s, r) for k, s, r in zip(kernel, stride, phase)]
        if any(part is None for part in parts) or any(r > o - 1 for r, o in zip(phase, out_size)):
            continue
        w = _sub_kernel(weight, [part[0] for part in parts])
        y = conv(F.pad(x, _pad_args([(part[1], part[2]) for part in parts])), w)
        counts = [(o - 1 - r) // s + 1 for o, r, s in zip(out_size, phase, stride)]
        phases.append((phase, y[(slice(None), slice(None), *(slice(0, m) for m in counts))]))
    dtype = phases[0][1].dtype if phases else x.dtype  # autocast may have lowered the convs' dtype
    out = x.new_zeros((n, c, *out_size), dtype=dtype)
    if x.movedim(1, -1).is_contiguous():
        out = _channels_last(out)
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
    conv = conv or (lambda t, w: _conv(t, w, None, (0,) * (t.ndim - 2)))
    spatial = x.shape[2:]
    kernel = weight.shape[2:]
    out_size = [(v - 1) // s + 1 for v, s in zip(spatial, stride)]
    out = None
    for phase in itertools.product(*(range(s) for s in stride)):
        parts = [_strided_phase(k, s, q, v, m) for k, s, q, v, m in zip(kernel, stride, phase, spatial, out_size)]
        if any(part is None for part in parts):
            continue
        w = _sub_kernel(weight, [part[0] for part in parts])
        xq = x[(slice(None), slice(None), *(slice(q, None, s) for q, s in zip(phase, stride)))]
        y = conv(F.pad(xq, _pad_args([(part[1], part[2]) for part in parts])), w)
        out = y if out is None else out + y
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, *(1,) * len(stride))
    return out


# ----------------------------------------------------------------------------- CUDA route
#
# On CUDA, PyTorch's depthwise convolutions in channels-last layout go to cuDNN, whose stride-1
# forward and backward are fast; the fast path keeps the activations channels-last and uses them
# directly (autograd through PyTorch's own kernels, so autocast works unchanged). Choices that
# depend on measurements are kept in ``CUDA_ROUTE`` (see docs/benchmarks.md for the numbers).

# "layout": "channels_last" keeps activations channels-last on CUDA (the route below), "plain" runs
# the plain NCDHW path. "depthwise": "triton" runs MedNeXt's depthwise convolutions through our
# Triton kernels (mednext.nn.triton_ops), the default where Triton is installed (it ships with
# CUDA builds of PyTorch): on an H200, L k5 128^3 fp16 training took 362.7 ms against 1032.6 ms for
# MONAI's MedNeXt (session 4). Without Triton the default is the plain path, because the channels-last route
# with PyTorch's own depthwise kernels measured no faster (training 1011 vs 1033 ms, inference 303
# vs 220 ms). MEDNEXT_CUDA_ROUTE=plain|channels_last|triton overrides the choice. "norm" on the
# channels-last route: "manual" (group_norm_channels_last below), "native" (PyTorch's, copied back to
# channels-last) or "triton" (triton_ops.group_norm: exact two-pass statistics, output in autocast's
# dtype, stores only its input; not timed on a GPU yet, so not the default).
# "dw_weights": "float32" hands the Triton depthwise kernels the float32 weights under autocast
# (no cast launches; see triton_ops._autocast), "autocast" casts them as PyTorch's convolutions do.
CUDA_ROUTE = {
    "layout": "plain",
    "depthwise": "native",
    "up": "polyphase",
    "down": "native",
    "norm": "manual",
    "dw_weights": "float32",
}
_ROUTE_ENV = os.environ.get(
    "MEDNEXT_CUDA_ROUTE", "triton" if importlib.util.find_spec("triton") is not None else "plain"
)
if _ROUTE_ENV not in ("plain", "channels_last", "triton"):
    raise ValueError(f"MEDNEXT_CUDA_ROUTE={_ROUTE_ENV!r} is not supported; use plain, channels_last or triton")
if _ROUTE_ENV != "plain":
    CUDA_ROUTE.update(layout="channels_last", depthwise="triton" if _ROUTE_ENV == "triton" else "native")
FORCE_CUDA_ROUTE = False  # tests set this to check the CUDA route's arithmetic on the CPU
_TRITON: list = []


def triton_ops(x: torch.Tensor):
    """:mod:`mednext.nn.triton_ops` for a CUDA tensor when Triton is installed (it comes with
    CUDA builds of PyTorch; on the CPU only under Triton's interpreter, for tests), else None."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    if not _TRITON:
        try:
            from mednext.nn import triton_ops as module
        except ImportError:
            module = None
        _TRITON.append(module)
    return _TRITON[0]


def disable_triton(error: BaseException, part: str = "depthwise") -> None:
    """Fall back from a Triton kernel (``part``: "depthwise" convolutions or group "norm") to
    PyTorch's for the rest of the process, with a warning that names the cause (a first kernel
    compile failing, say because Triton finds no C compiler or the GPU is too old for it)."""
    CUDA_ROUTE[part] = "native" if part == "depthwise" else "manual"
    what = "depthwise kernels" if part == "depthwise" else "group norm kernels"
    instead = "convolutions, which are slower on CUDA" if part == "depthwise" else "group norm"
    warnings.warn(
        f"mednext: the Triton {what} failed ({type(error).__name__}: {str(error)[:300]}); "
        f"falling back to PyTorch's {instead}. "
        "Set MEDNEXT_CUDA_ROUTE=plain to skip Triton, or install a C compiler for Triton to use them.",
        RuntimeWarning,
        stacklevel=3,
    )


def uses_cuda_route(x: torch.Tensor) -> bool:
    return x.is_cuda or FORCE_CUDA_ROUTE


def group_norm_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm with one group per channel that keeps a channels-last layout (PyTorch's CUDA
    kernel returns a contiguous tensor); statistics in float32, output float32 like autocast's."""
    spatial = tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * len(spatial)
    count = math.prod(x.shape[2:])
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    mean = x.sum(dim=spatial, keepdim=True, dtype=acc).div_(count)
    xc = x - mean
    var = torch.linalg.vector_norm(xc, dim=spatial, keepdim=True).square() / count
    scale = (var + eps).rsqrt() * weight.to(acc).view(shape)
    return torch.addcmul(bias.to(acc).view(shape), xc, scale)
