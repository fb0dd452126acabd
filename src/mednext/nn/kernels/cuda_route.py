"""The CUDA route of the fast path: which kernel runs each depthwise conv and group norm on CUDA.

On CUDA the fast path keeps activations channels-last; PyTorch's channels-last depthwise convs go
to cuDNN, whose stride-1 forward and backward are fast, and autograd runs through PyTorch's own
kernels, so autocast works unchanged. ``mednext.config.get().cuda_route`` says, part by part,
what runs instead (:class:`mednext.config.CudaRoute`): mednext's Triton kernels for the depthwise
convs and the group norm, the polyphase forms of the strided and transposed convs, and a
channels-last group norm in PyTorch ops. The route is read each time a layer runs.

Triton can be installed yet unusable (no C compiler, a GPU too old for it): a kernel that fails
switches its part back to PyTorch's for the rest of the process (``config.set_cuda_route``), with a
warning that names the cause. ``config.get().force_cuda_route`` runs this route on CPU tensors,
so that tests check its arithmetic without a GPU.
"""

from __future__ import annotations

import math
import os
import warnings
from types import ModuleType

import torch

from mednext import config
from mednext.nn.kernels.cpu import channels_last
from mednext.nn.kernels.polyphase import depthwise_conv_strided_polyphase, depthwise_conv_transpose_polyphase

__all__ = ["depthwise_conv", "group_norm", "group_norm_channels_last", "triton_kernels", "uses_cuda_route"]

_TRITON: list[ModuleType | None] = []  # the kernels module once loaded (None: Triton is not installed)


def uses_cuda_route(x: torch.Tensor) -> bool:
    """Whether the fast path's layers take the CUDA route for ``x``."""
    return x.is_cuda or config.get().force_cuda_route


def triton_kernels(x: torch.Tensor) -> ModuleType | None:
    """:mod:`mednext.nn.kernels.triton` for a CUDA tensor when Triton is installed (it comes with
    CUDA builds of PyTorch; on the CPU only under Triton's interpreter, for tests), else None."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    if not _TRITON:
        try:
            from mednext.nn.kernels import triton as module
        except ImportError:
            module = None
        _TRITON.append(module)
    return _TRITON[0]


def _fall_back(error: BaseException, part: str) -> None:
    """Run PyTorch's kernels for ``part`` ("depthwise" convolutions or group "norm") instead of
    Triton's from now on, with a warning that names the cause."""
    if part == "depthwise":
        config.set_cuda_route(depthwise="native")
    else:
        config.set_cuda_route(norm="manual")
    what = "depthwise kernels" if part == "depthwise" else "group norm kernels"
    instead = "convolutions, which are slower on CUDA" if part == "depthwise" else "group norm"
    warnings.warn(
        f"mednext: the Triton {what} failed ({type(error).__name__}: {str(error)[:300]}); "
        f"falling back to PyTorch's {instead}. "
        "Set MEDNEXT_CUDA_ROUTE=plain to skip Triton, or install a C compiler for Triton to use them.",
        RuntimeWarning,
        stacklevel=4,
    )


def depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...], transposed: bool
) -> torch.Tensor | None:
    """A depthwise (transposed) conv with padding k//2 of channels-last ``x`` on the CUDA route, or
    None where the route runs PyTorch's own convolution."""
    route = config.get().cuda_route
    kernels = triton_kernels(x) if route.depthwise == "triton" else None
    kernel = weight.shape[2:]
    if kernels is not None and all(k % 2 == 1 for k in kernel) and kernel[-1] <= kernels.MAX_LAST_TAPS:
        try:
            if transposed:
                return kernels.depthwise_conv_transpose(x, weight, bias, stride)
            return kernels.depthwise_conv(x, weight, bias, stride)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 (Triton installed but unusable: no C compiler, old GPU)
            _fall_back(error, "depthwise")
    if transposed and route.up == "polyphase":
        return depthwise_conv_transpose_polyphase(x, weight, bias, stride)
    if not transposed and route.down == "polyphase" and any(s > 1 for s in stride):
        return depthwise_conv_strided_polyphase(x, weight, bias, stride)
    return None


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm with one group per channel of channels-last ``x`` on the CUDA route, channels-last out."""
    route = config.get().cuda_route
    kernels = triton_kernels(x) if route.norm == "triton" else None
    if kernels is not None:
        try:
            return kernels.group_norm(x, weight, bias, eps)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 (as for the depthwise kernels)
            _fall_back(error, "norm")
    if route.norm in ("manual", "triton"):
        return group_norm_channels_last(x, weight, bias, eps)
    return channels_last(torch.nn.functional.group_norm(x, x.shape[1], weight, bias, eps))


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
