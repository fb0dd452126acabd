"""MedNeXt's building blocks (Roy et al., MICCAI 2023), 2D and 3D.

A block is depthwise conv -> norm -> 1x1 expansion -> GELU [-> GRN] -> 1x1 compression [+ input];
the down and up blocks resample in their depthwise conv and add a 1x1 resampled residual. The layers
(:mod:`mednext.nn.layers`) are PyTorch's modules that choose their kernel for the input's layout, so
the blocks read like the paper and their parameter names are the reference's (``conv1``, ``norm``,
``conv2``, ``conv3``, ``res_conv``, ``grn_gamma``, ``grn_beta``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mednext.nn import layers

__all__ = [
    "GRN_NORMALISATIONS",
    "ChannelsFirstLayerNorm",
    "GlobalResponseNorm",
    "IntOrTuple",
    "MedNeXtBlock",
    "MedNeXtDownBlock",
    "MedNeXtOutBlock",
    "MedNeXtUpBlock",
    "global_response_norm",
]

IntOrTuple = int | Sequence[int]


def as_tuple(value: IntOrTuple, spatial_dims: int, name: str) -> tuple[int, ...]:
    """``value`` as one int per spatial axis; ``name`` is the argument named in the error."""
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{name}={value} has {len(value)} entries; give one int or {spatial_dims} (one per axis)")
    return value


# ----------------------------------------------------------------------------- normalisation


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an (N, C, *spatial) tensor, for any number of spatial axes.

    Args:
        num_channels: size of the channel axis.
        eps: added to the variance (the reference uses 1e-5).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # layer_norm normalises trailing axes, so move C last and back; works for 1D, 2D and 3D alike.
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


GRN_NORMALISATIONS = ("mean", "sum")


def global_response_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, normalisation: str = "mean"
) -> torch.Tensor:
    """Global response normalisation on (N, C, *spatial): ``gamma * (x * nx) + beta + x``.

    ``gx`` is each channel's L2 norm over the spatial axes and ``nx = gx / (s + 1e-6)``, where ``s``
    is the mean of ``gx`` over the channels (``normalisation="mean"``, ConvNeXt-V2 and MedNeXt v1) or
    their sum (``"sum"``, MedNeXt-v2 as read from its paper; C times the mean).
    """
    spatial = tuple(range(2, x.ndim))
    gx = torch.linalg.vector_norm(x, ord=2, dim=spatial, keepdim=True)
    if normalisation == "mean":
        scale = gx.mean(dim=1, keepdim=True)
    elif normalisation == "sum":
        scale = gx.sum(dim=1, keepdim=True)
    else:
        raise ValueError(f"GRN normalisation {normalisation!r} is not supported; use 'mean' or 'sum'")
    # gamma * (x * nx) + beta + x as x * (1 + gamma * nx) + beta: the per-channel factor is small, so one
    # full-size product is built (and saved for the backward pass) instead of two
    return torch.addcmul(beta, x, 1 + gamma * (gx / (scale + 1e-6)))


class GlobalResponseNorm(nn.Module):
    """Global response normalisation as a standalone module (a fresh one is the identity).

    Args:
        num_channels: size of the channel axis.
        spatial_dims: 2 or 3.
        normalisation: "mean" (ConvNeXt-V2) or "sum" (MedNeXt-v2) of the channels' norms.
    """

    def __init__(self, num_channels: int, spatial_dims: int = 3, normalisation: str = "mean") -> None:
        super().__init__()
        if normalisation not in GRN_NORMALISATIONS:
            raise ValueError(f"GRN normalisation {normalisation!r} is not supported; use 'mean' or 'sum'")
        shape = (1, num_channels) + (1,) * spatial_dims
        self.gamma = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.normalisation = normalisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_response_norm(x, self.gamma, self.beta, self.normalisation)


# ----------------------------------------------------------------------------- blocks


class MedNeXtBlock(nn.Module):
    """Depthwise conv -> norm -> 1x1 expand -> GELU [-> GRN] -> 1x1 compress [+ input].

    Args:
        in_channels: input width; the depthwise conv and the norm act on it.
        out_channels: output width of the compression conv.
        expansion: ratio R of the inverted bottleneck (R * in_channels hidden features).
        kernel_size: depthwise kernel, int or one odd size per axis.
        spatial_dims: 2 or 3.
        residual: add the input to the output (needs in_channels == out_channels).
        norm: "group" (one group per channel, the paper's) or "layer" (channels-first LayerNorm).
        grn: global response normalisation of the expanded features: False (none), True or
            "mean" (normalised by the channels' mean norm), "sum" (by their sum, MedNeXt-v2).

    Attribute ``recompute_expansion`` (default False; :meth:`MedNeXt.set_grad_checkpointing`
    with ``"cheap"`` sets it): in training with gradients on, keep only the depthwise conv's
    output and recompute norm -> expansion -> GELU [-> GRN] in the backward pass, so none of the
    R * C-channel tensors is stored; the depthwise conv itself is not recomputed.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expansion: int = 4,
        kernel_size: IntOrTuple = 3,
        spatial_dims: int = 3,
        residual: bool = True,
        norm: str = "group",
        grn: bool | str = False,
    ) -> None:
        super().__init__()
        grn_norm = "mean" if grn is True else (grn or False)
        if grn_norm is not False and grn_norm not in GRN_NORMALISATIONS:
            raise ValueError(f"grn={grn!r} is not supported; use False, True, 'mean' or 'sum'")
        self.residual = residual
        self.conv1 = layers.DEPTHWISE_CONV[spatial_dims](
            in_channels, as_tuple(kernel_size, spatial_dims, "kernel_size")
        )
        if norm == "group":
            self.norm: nn.Module = layers.GroupNorm(num_groups=in_channels, num_channels=in_channels)
        elif norm == "layer":
            self.norm = ChannelsFirstLayerNorm(in_channels)
        else:
            raise ValueError(f"norm={norm!r} is not supported; use 'group' or 'layer'")
        hidden = expansion * in_channels
        self.conv2 = layers.POINTWISE_CONV[spatial_dims](in_channels, hidden)
        self.act = nn.GELU()
        self.grn = grn_norm is not False
        self.grn_normalisation = grn_norm or "mean"
        if self.grn:
            shape = (1, hidden) + (1,) * spatial_dims
            self.grn_gamma = nn.Parameter(torch.zeros(shape))
            self.grn_beta = nn.Parameter(torch.zeros(shape))
        self.conv3 = layers.POINTWISE_CONV[spatial_dims](hidden, out_channels)
        self.recompute_expansion = False

    def _branch(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Everything but the resampled residual path: depthwise conv, norm, expansion, GELU
        [GRN], compression, plus ``residual`` when given."""
        y = self.conv1(x)
        recompute = self.recompute_expansion and self.training and torch.is_grad_enabled()
        # GRN needs every voxel's expansion before the compression can start, which the fused branch's
        # chunks never hold at once: GRN blocks take the unfused branch on every path.
        if not self.grn and layers.runs_fused(self.norm, y):
            return layers.fused_norm_expand_compress(y, residual, self.norm, self.conv2, self.conv3, recompute)
        y = self._recomputed_expand_compress(y) if recompute else self._expand_compress(y)
        return y if residual is None else residual + y

    def _expand_compress(self, y: torch.Tensor) -> torch.Tensor:
        """Norm -> 1x1 expand -> GELU [-> GRN] -> 1x1 compress of the depthwise conv's output."""
        y = self.act(self.conv2(self.norm(y)))
        if self.grn:
            y = global_response_norm(y, self.grn_gamma, self.grn_beta, self.grn_normalisation)
        return self.conv3(y)

    def _recomputed_expand_compress(self, y: torch.Tensor) -> torch.Tensor:
        # The compression conv is inside the recomputed function, else it would store its R*C-channel
        # input; the recomputation stops once the saved tensors exist (non-reentrant early stop), before
        # the compression's own GEMM. No random ops here, so the RNG state need not be kept.
        # A view (of any kernel's depthwise output) would keep its larger source alive. Under torch.compile
        # the compiler chooses what is saved, and a storage's size cannot be traced (a graph break).
        if not torch.compiler.is_compiling() and y.untyped_storage().nbytes() > y.numel() * y.element_size():
            y = y.clone()
        return checkpoint(self._expand_compress, y, use_reentrant=False, preserve_rng_state=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._branch(x, x if self.residual else None)


class _ResamplingBlock(MedNeXtBlock):
    """A block whose depthwise conv resamples by ``stride``, with a 1x1 conv of the same stride on
    the residual path: the constructor the down and up blocks share.

    Args:
        in_channels: input width.
        out_channels: output width (2 * in_channels down, in_channels / 2 up, in the paper).
        expansion: inverted-bottleneck ratio.
        kernel_size: depthwise kernel, int or one odd size per axis.
        stride: int or one stride per axis, e.g. (1, 2, 2).
        spatial_dims: 2 or 3.
        residual: use the 1x1 resampling residual path.
        norm: "group" or "layer".
        grn: global response normalisation on the expanded features (as :class:`MedNeXtBlock`).
    """

    # The layer classes for the depthwise conv and the residual conv, by spatial_dims.
    _DEPTHWISE: dict[int, type[nn.Module]]
    _RESIDUAL: dict[int, type[nn.Module]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expansion: int = 4,
        kernel_size: IntOrTuple = 3,
        stride: IntOrTuple = 2,
        spatial_dims: int = 3,
        residual: bool = True,
        norm: str = "group",
        grn: bool | str = False,
    ) -> None:
        # The stride-1 depthwise conv the parent builds is replaced below; building it first keeps the
        # reference's module creation order, so a seed gives the reference's initial weights.
        super().__init__(in_channels, out_channels, expansion, kernel_size, spatial_dims, False, norm, grn)
        kernel = as_tuple(kernel_size, spatial_dims, "kernel_size")
        self.stride = as_tuple(stride, spatial_dims, "stride")
        self.resample_residual = residual
        if residual:
            self.res_conv = self._RESIDUAL[spatial_dims](in_channels, out_channels, stride=self.stride)
        self.conv1 = self._DEPTHWISE[spatial_dims](in_channels, kernel, stride=self.stride)


class MedNeXtDownBlock(_ResamplingBlock):
    """Strided depthwise conv block that halves (or divides by ``stride``) the resolution and
    doubles the width, with a strided 1x1 conv on the residual path. Arguments as
    :class:`_ResamplingBlock`."""

    _DEPTHWISE = layers.DEPTHWISE_CONV
    _RESIDUAL = layers.POINTWISE_CONV

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._branch(x)
        return y + self.res_conv(x) if self.resample_residual else y


class MedNeXtUpBlock(_ResamplingBlock):
    """Strided depthwise transposed-conv block that multiplies the resolution by ``stride`` and
    halves the width, with a strided 1x1 transposed conv on the residual path. Arguments as
    :class:`_ResamplingBlock`.

    A transposed conv with odd kernel k, padding k//2 and stride s returns (N-1)*s+1 voxels per
    axis; like the reference (s=2: one plane), both paths get s-1 zero planes prepended so the
    output has exactly s*N voxels, the size of the skip connection.
    """

    _DEPTHWISE = layers.DEPTHWISE_CONV_TRANSPOSE
    _RESIDUAL = layers.POINTWISE_CONV_TRANSPOSE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._branch(x)
        if self.resample_residual:
            y = self.res_conv.added_to(y, x)  # same (N-1)*s+1 grid as the main path, so pad once after adding
        front_zeros = tuple(s - 1 for s in self.stride)
        return layers.pad_front(y, front_zeros) if any(front_zeros) else y


class MedNeXtOutBlock(nn.Module):
    """1x1 transposed-conv segmentation head (the reference's ``OutBlock``).

    Args:
        in_channels: width of the features it reads.
        num_classes: number of output channels.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.conv_out = layers.POINTWISE_CONV_TRANSPOSE[spatial_dims](in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(x)
