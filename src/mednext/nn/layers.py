"""Drop-in subclasses of PyTorch's convolutions and group norm that pick their kernel when they run.

On plain (channels-first) input every layer is PyTorch's own module. On channels-last input (the
fast path, chosen once per forward by :class:`~mednext.nn.MedNeXt`) each one runs the kernel that
keeps the layout and is fastest for it:

- 1x1 convs (:class:`PointwiseConv3d`, ...) are one GEMM over (N * voxels, channels);
- depthwise convs, strided and transposed (:class:`DepthwiseConv3d`, ...) run
  :mod:`mednext.nn.kernels.cpu` on the CPU and the CUDA route (:mod:`mednext.nn.kernels.cuda_route`)
  on CUDA;
- :class:`GroupNorm` with one group per channel keeps the layout with float32-accurate statistics.

Parameters, state-dict keys and numbers are those of the PyTorch modules (tests compare the paths in
float64); only the kernels differ. ``mednext.config``'s ``fused_blocks``, ``cuda_route`` and
``force_cuda_route`` are read when a layer runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mednext import config
from mednext.nn.kernels import cpu, cuda_route, fused
from mednext.nn.kernels.cpu import autocast_dtype, channels_last

__all__ = [
    "DEPTHWISE_CONV",
    "DEPTHWISE_CONV_TRANSPOSE",
    "POINTWISE_CONV",
    "POINTWISE_CONV_TRANSPOSE",
    "DepthwiseConv2d",
    "DepthwiseConv3d",
    "DepthwiseConvTranspose2d",
    "DepthwiseConvTranspose3d",
    "GroupNorm",
    "PointwiseConv2d",
    "PointwiseConv3d",
    "PointwiseConvTranspose2d",
    "PointwiseConvTranspose3d",
    "channels_last",
    "fused_norm_expand_compress",
    "is_channels_last",
    "pad_front",
    "pointwise",
    "runs_fused",
]


def is_channels_last(x: torch.Tensor) -> bool:
    """True when the channel axis is innermost, so (N, *spatial, C) is a free view. A one-channel
    tensor fits both layouts and counts as plain, so the layout alone selects the path."""
    return x.shape[1] > 1 and x.movedim(1, -1).is_contiguous()


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution with ``weight`` of shape (out, in): on channels-last input one GEMM
    over (N*voxels, in), whose forward and backward run at the BLAS's speed."""
    return F.linear(x.movedim(1, -1), weight, bias).movedim(-1, 1)


def _on_grid(stride: Sequence[int]) -> tuple[slice, ...]:
    """Index of every s-th voxel along each spatial axis, from the first."""
    return (slice(None), slice(None), *(slice(None, None, s) for s in stride))


# ----------------------------------------------------------------------------- 1x1 convolutions


class _PointwiseConv:
    """A 1x1 conv (any stride): on channels-last input the subsampled input times the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_channels_last(x):
            return super().forward(x)  # type: ignore[misc]
        if self.strided:  # type: ignore[attr-defined]
            x = x[_on_grid(self.stride)]  # type: ignore[attr-defined]
        return pointwise(x, self.weight.flatten(1), self.bias)  # type: ignore[attr-defined]


class PointwiseConv2d(_PointwiseConv, nn.Conv2d):
    """``nn.Conv2d`` with a 1x1 kernel, a GEMM on channels-last input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int | Sequence[int] = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, stride=stride)
        self.strided = any(s > 1 for s in self.stride)


class PointwiseConv3d(_PointwiseConv, nn.Conv3d):
    """``nn.Conv3d`` with a 1x1x1 kernel, a GEMM on channels-last input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int | Sequence[int] = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, stride=stride)
        self.strided = any(s > 1 for s in self.stride)


class _PointwiseConvTranspose:
    """A 1x1 transposed conv: it writes W^T x on every s-th voxel and only its bias elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strided or not is_channels_last(x):  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        return pointwise(x, self.weight.flatten(1).t(), self.bias)  # type: ignore[attr-defined]

    def added_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + self(x)``; on channels-last input without building the mostly-bias output."""
        if not is_channels_last(x):
            return y + super().forward(x)  # type: ignore[misc]
        y = y + self.bias.to(y.dtype).view(1, -1, *(1,) * (y.ndim - 2))  # type: ignore[attr-defined]
        y[_on_grid(self.stride)] += pointwise(x, self.weight.flatten(1).t(), None)  # type: ignore[attr-defined]
        return y


class PointwiseConvTranspose2d(_PointwiseConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a 1x1 kernel, a GEMM on channels-last input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int | Sequence[int] = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, stride=stride)
        self.strided = any(s > 1 for s in self.stride)


class PointwiseConvTranspose3d(_PointwiseConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with a 1x1x1 kernel, a GEMM on channels-last input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int | Sequence[int] = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, stride=stride)
        self.strided = any(s > 1 for s in self.stride)


# ----------------------------------------------------------------------------- depthwise convolutions


class _DepthwiseConv:
    """One filter per channel, odd kernel, padding k//2 ("same" at stride 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_channels_last(x):
            return super().forward(x)  # type: ignore[misc]
        weight, bias, stride = self.weight, self.bias, self.stride  # type: ignore[attr-defined]
        if cuda_route.uses_cuda_route(x):
            y = cuda_route.depthwise_conv(x, weight, bias, stride, transposed=False)
            return super().forward(x) if y is None else y  # type: ignore[misc]
        if any(s > 1 for s in stride):
            return cpu.depthwise_conv_strided(x, weight, bias, stride)
        return cpu.depthwise_conv(x, weight, bias)


class DepthwiseConv2d(_DepthwiseConv, nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, stride, padding=k // 2, groups=channels)``."""

    def __init__(self, channels: int, kernel_size: Sequence[int], stride: int | Sequence[int] = 1) -> None:
        padding = tuple(k // 2 for k in kernel_size)
        super().__init__(channels, channels, tuple(kernel_size), stride=stride, padding=padding, groups=channels)


class DepthwiseConv3d(_DepthwiseConv, nn.Conv3d):
    """``nn.Conv3d(channels, channels, kernel_size, stride, padding=k // 2, groups=channels)``."""

    def __init__(self, channels: int, kernel_size: Sequence[int], stride: int | Sequence[int] = 1) -> None:
        padding = tuple(k // 2 for k in kernel_size)
        super().__init__(channels, channels, tuple(kernel_size), stride=stride, padding=padding, groups=channels)


class _DepthwiseConvTranspose:
    """One filter per channel, odd kernel, padding k//2: (N-1)*s+1 output voxels per axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_channels_last(x):
            return super().forward(x)  # type: ignore[misc]
        weight, bias, stride = self.weight, self.bias, self.stride  # type: ignore[attr-defined]
        if cuda_route.uses_cuda_route(x):
            y = cuda_route.depthwise_conv(x, weight, bias, stride, transposed=True)
            return super().forward(x) if y is None else y  # type: ignore[misc]
        return cpu.depthwise_conv_transpose(x, weight, bias, stride)


class DepthwiseConvTranspose2d(_DepthwiseConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(channels, channels, kernel_size, stride, padding=k // 2, groups=channels)``."""

    def __init__(self, channels: int, kernel_size: Sequence[int], stride: int | Sequence[int] = 1) -> None:
        padding = tuple(k // 2 for k in kernel_size)
        super().__init__(channels, channels, tuple(kernel_size), stride=stride, padding=padding, groups=channels)


class DepthwiseConvTranspose3d(_DepthwiseConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d(channels, channels, kernel_size, stride, padding=k // 2, groups=channels)``."""

    def __init__(self, channels: int, kernel_size: Sequence[int], stride: int | Sequence[int] = 1) -> None:
        padding = tuple(k // 2 for k in kernel_size)
        super().__init__(channels, channels, tuple(kernel_size), stride=stride, padding=padding, groups=channels)


# The classes for 2D and 3D networks, picked once from ``spatial_dims``.
DEPTHWISE_CONV: dict[int, type[nn.Module]] = {2: DepthwiseConv2d, 3: DepthwiseConv3d}
DEPTHWISE_CONV_TRANSPOSE: dict[int, type[nn.Module]] = {2: DepthwiseConvTranspose2d, 3: DepthwiseConvTranspose3d}
POINTWISE_CONV: dict[int, type[nn.Module]] = {2: PointwiseConv2d, 3: PointwiseConv3d}
POINTWISE_CONV_TRANSPOSE: dict[int, type[nn.Module]] = {2: PointwiseConvTranspose2d, 3: PointwiseConvTranspose3d}


def pad_front(y: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """``y`` with ``counts[a]`` zero planes before it along spatial axis ``a``, in ``y``'s layout."""
    layout = torch.channels_last_3d if y.ndim == 5 else torch.channels_last
    if not y.is_contiguous(memory_format=layout):  # a metadata check: no view op in the hot path
        return F.pad(y, tuple(p for n in reversed(counts) for p in (n, 0)))  # F.pad: last axis first
    out = channels_last(y.new_zeros((*y.shape[:2], *(size + n for size, n in zip(y.shape[2:], counts)))))
    out[(slice(None), slice(None), *(slice(n, None) for n in counts))] = y
    return out


# ----------------------------------------------------------------------------- normalisation


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps channels-last input channels-last when each channel is its own
    group (the MedNeXt block's norm), with statistics from centred values as the contiguous kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups != self.num_channels or not is_channels_last(x):
            return super().forward(x)
        if cuda_route.uses_cuda_route(x):
            return cuda_route.group_norm(x, self.weight, self.bias, self.eps)
        return cpu.channel_group_norm(x, self.weight, self.bias, self.eps)


# ----------------------------------------------------------------------------- fused branch


def runs_fused(norm: nn.Module, y: torch.Tensor) -> bool:
    """Whether norm -> 1x1 expansion -> GELU -> 1x1 compression of ``y`` runs as one fused kernel
    (:func:`fused_norm_expand_compress`): CPU fast path, a per-channel :class:`GroupNorm`, autocast
    off, and ``mednext.config``'s ``fused_blocks`` on."""
    if not (
        isinstance(norm, GroupNorm)
        and norm.num_groups == norm.num_channels
        and is_channels_last(y)
        and not y.is_cuda
        and autocast_dtype(y.device.type) is None
    ):
        return False
    settings = config.get()
    return settings.fused_blocks and not settings.force_cuda_route


def fused_norm_expand_compress(
    y: torch.Tensor,
    residual: torch.Tensor | None,
    norm: nn.GroupNorm,
    expand: nn.Module,
    compress: nn.Module,
    recompute: bool = False,
) -> torch.Tensor:
    """``residual + compress(GELU(expand(norm(y))))`` with fewer passes over memory
    (:mod:`mednext.nn.kernels.fused`); ``recompute`` stores only ``y`` for the backward pass."""
    return fused.norm_expand_compress(y, residual, norm, expand, compress, recompute)
