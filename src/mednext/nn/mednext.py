"""MedNeXt: the network, the S/B/M/L presets and MedNeXt-v2's Base and Wide, in reading order
(blocks: :mod:`mednext.nn.blocks`).

Roy et al., "MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image
Segmentation", MICCAI 2023; Roy et al., "MedNeXt-v2: Scaling 3D ConvNeXts for Large-Scale
Supervised Representation Learning in Medical Image Segmentation", arXiv 2512.17774. Module
and parameter names follow the reference implementation (``stem``, ``enc_block_{i}``,
``down_{i}``, ``bottleneck``, ``up_{i}``, ``dec_block_{i}``, ``out_{i}.conv_out``) so that
reference state dicts load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mednext import config
from mednext.nn.blocks import (
    GRN_NORMALISATIONS,
    IntOrTuple,
    MedNeXtBlock,
    MedNeXtDownBlock,
    MedNeXtOutBlock,
    MedNeXtUpBlock,
    as_tuple,
)
from mednext.nn.layers import channels_last, pointwise

__all__ = ["PRESETS", "MedNeXt", "create_mednext"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


GRN_PLACEMENTS = ("all", "all_but_down_0")
# ``grn=True``: the reference MedNeXt v1's GRN (ConvNeXt-V2's channel mean, none in down_0).
_GRN_TRUE = {"where": "all_but_down_0", "norm": "mean"}


def _grn_setting(value: Any) -> bool | dict[str, str]:
    """A ``grn`` value in its stored form: False, True (the reference's GRN) or a dict
    ``{"where": "all" | "all_but_down_0", "norm": "mean" | "sum"}`` that differs from True's."""
    if value is None or value is False or value is True:
        return bool(value)
    if not isinstance(value, Mapping):
        raise ValueError(
            f"grn={value!r} is not supported; use False, True (every block but down_0, channel mean, as the "
            "reference v1) or a dict such as {'where': 'all', 'norm': 'sum'} (MedNeXt-v2)"
        )
    unknown = sorted(set(value) - {"where", "norm"})
    if unknown:
        raise ValueError(f"grn has unknown key(s) {', '.join(map(repr, unknown))}; use 'where' and 'norm'")
    setting = {**_GRN_TRUE, **value}
    if setting["where"] not in GRN_PLACEMENTS:
        raise ValueError(f"grn['where']={setting['where']!r} is not supported; use 'all' or 'all_but_down_0'")
    if setting["norm"] not in GRN_NORMALISATIONS:
        raise ValueError(f"grn['norm']={setting['norm']!r} is not supported; use 'mean' or 'sum'")
    return True if setting == _GRN_TRUE else setting


_CHECKPOINT_MODES: dict[Any, bool | str] = {False: False, "none": False, True: True, "block": True, "cheap": "cheap"}


def _checkpoint_mode(value: bool | str) -> bool | str:
    """A ``grad_checkpointing`` value in its stored form: False, True (whole blocks) or "cheap"."""
    key = value.lower() if isinstance(value, str) else value
    try:
        return _CHECKPOINT_MODES[key]  # 0/1 and numpy bools hash like False/True
    except (KeyError, TypeError):
        raise ValueError(
            f"grad_checkpointing={value!r} is not supported; use False/'none', True/'block' (whole blocks) "
            "or 'cheap' (recompute norm, expansion and GELU only)"
        ) from None


# ----------------------------------------------------------------------------- network


class MedNeXt(nn.Module):
    """MedNeXt encoder-decoder (Roy et al., MICCAI 2023) for 2D and 3D segmentation.

    Per-position settings (``expansion_ratios``, ``block_counts``, ``kernel_sizes``) have
    ``2 * n + 1`` entries for ``n = len(strides)`` stages, ordered
    ``[enc_0, ..., enc_{n-1}, bottleneck, dec_{n-1}, ..., dec_0]`` as in the reference.
    Encoder position i sets ``enc_block_i`` and ``down_i``; decoder position of stage i sets
    ``up_i`` and ``dec_block_i``; the bottleneck position sets the bottleneck only.

    Output: with ``deep_supervision`` on and the module in training mode, a list of
    ``n + 1`` logits tensors, highest resolution first (full, 1/2, ..., bottleneck). In eval
    mode, or with deep supervision off, the full-resolution logits tensor only.

    Args:
        in_channels: number of input channels (image modalities).
        num_classes: number of output channels (classes, background included).
        spatial_dims: 2 or 3.
        width: channels C after the stem; stage i has C * 2**i channels.
        strides: one down-sampling stride per stage, each an int or one per axis
            (e.g. ``(1, 2, 2)`` for anisotropic data); their number sets the number of stages.
        expansion_ratios: inverted-bottleneck ratio per position (int or 2n+1 ints).
        block_counts: MedNeXt blocks per position (int or 2n+1 ints).
        kernel_sizes: depthwise kernel per position (int, or 2n+1 entries each an int or
            one odd size per axis). The encoder and decoder positions are set separately.
        down_expansion_ratios: ratio of each down block. Default: the reference's, the ratio of
            the next position (``down_i`` uses position i+1). MONAI uses position i.
        up_expansion_ratios: ratio of each up block. Default: the ratio of the decoder stage it
            feeds (``up_i`` uses position 2n-i), as the reference and MONAI do.
        residual: residual connections inside MedNeXt blocks.
        resample_residual: 1x1 residual paths in the down and up blocks.
        norm: "group" or "layer".
        grn: global response normalisation after GELU. False: none. True: in every block except
            ``down_0``, normalised by the channels' mean norm (the reference v1, ConvNeXt-V2). A dict
            ``{"where": "all" | "all_but_down_0", "norm": "mean" | "sum"}`` chooses both;
            MedNeXt-v2 is ``{"where": "all", "norm": "sum"}`` (down and up blocks included,
            normalised by the channels' summed norm).
        deep_supervision: build the extra heads ``out_1..out_n`` and return them in training.
        grad_checkpointing: False (store everything), True or "block" (recompute each block in
            the backward pass, non-reentrant) or "cheap" (recompute only each block's norm,
            expansion and GELU [GRN]); see :meth:`set_grad_checkpointing`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 3,
        width: int = 32,
        strides: Sequence[IntOrTuple] = (2, 2, 2, 2),
        expansion_ratios: int | Sequence[int] = 2,
        block_counts: int | Sequence[int] = 2,
        kernel_sizes: IntOrTuple | Sequence[IntOrTuple] = 3,
        down_expansion_ratios: Sequence[int] | None = None,
        up_expansion_ratios: Sequence[int] | None = None,
        residual: bool = True,
        resample_residual: bool = True,
        norm: str = "group",
        grn: bool | Mapping[str, str] = False,
        deep_supervision: bool = False,
        grad_checkpointing: bool | str = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims} is not supported; use 2 or 3")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if norm not in ("group", "layer"):
            raise ValueError(f"norm={norm!r} is not supported; use 'group' or 'layer'")
        if isinstance(strides, int) or len(strides) < 1:
            raise ValueError(f"strides={strides!r} must be a sequence with one stride per stage, e.g. (2, 2, 2, 2)")
        grn = _grn_setting(grn)
        n = len(strides)
        positions = 2 * n + 1
        stride_list = [as_tuple(s, spatial_dims, f"strides[{i}]") for i, s in enumerate(strides)]
        for i, s in enumerate(stride_list):
            if any(v < 1 for v in s):
                raise ValueError(f"strides[{i}]={s} must be >= 1 on every axis")
        exp = self._int_list(expansion_ratios, positions, "expansion_ratios")
        blocks = self._int_list(block_counts, positions, "block_counts", minimum=0)
        kernels = self._kernel_list(kernel_sizes, positions, spatial_dims)
        down_exp = (
            [exp[i + 1] for i in range(n)]
            if down_expansion_ratios is None
            else self._int_list(down_expansion_ratios, n, "down_expansion_ratios")
        )
        up_exp = (
            [exp[2 * n - i] for i in range(n)]
            if up_expansion_ratios is None
            else self._int_list(up_expansion_ratios, n, "up_expansion_ratios")
        )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_stages = n
        self.strides = stride_list
        self.total_stride = tuple(math.prod(s[a] for s in stride_list) for a in range(spatial_dims))
        self.widths = [width * 2**i for i in range(n + 1)]
        self.deep_supervision = deep_supervision
        grad_checkpointing = _checkpoint_mode(grad_checkpointing)
        self.grad_checkpointing = grad_checkpointing
        # Channels-last layout with 1x1 convs as GEMMs; same numbers as the plain path (tests check it).
        # Default for 3D only: in 2D, PyTorch's own (oneDNN) convolutions are the faster ones on the CPU
        # (docs/benchmarks.md); set_fast_path(True) still selects it.
        self.fast_path = config.get().fast_path and spatial_dims == 3
        # Everything needed to rebuild this module; JSON-serialisable.
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "spatial_dims": spatial_dims,
            "width": width,
            "strides": [list(s) for s in stride_list],
            "expansion_ratios": exp,
            "block_counts": blocks,
            "kernel_sizes": [list(k) for k in kernels],
            "down_expansion_ratios": down_exp,
            "up_expansion_ratios": up_exp,
            "residual": residual,
            "resample_residual": resample_residual,
            "norm": norm,
            "grn": grn,
            "deep_supervision": deep_supervision,
            "grad_checkpointing": grad_checkpointing,
        }

        common = {"spatial_dims": spatial_dims, "norm": norm}
        # per block: False or the GRN's normalisation; down_0's follows "where"
        grn_norm: bool | str = grn and (_GRN_TRUE if grn is True else grn)["norm"]
        grn_down_0 = grn_norm if isinstance(grn, dict) and grn["where"] == "all" else False

        def stage(pos: int, channels: int) -> nn.Sequential:
            return nn.Sequential(
                *(
                    MedNeXtBlock(channels, channels, exp[pos], kernels[pos], residual=residual, grn=grn_norm, **common)
                    for _ in range(blocks[pos])
                )
            )

        # PyTorch's conv: the fast path calls its GEMM itself (see _forward)
        self.stem = _CONV[spatial_dims](in_channels, width, kernel_size=1)
        for i in range(n):
            c = self.widths[i]
            setattr(self, f"enc_block_{i}", stage(i, c))
            setattr(
                self,
                f"down_{i}",
                MedNeXtDownBlock(
                    c, 2 * c, down_exp[i], kernels[i], stride_list[i],
                    residual=resample_residual, grn=grn_norm if i > 0 else grn_down_0, **common,
                ),
            )  # fmt: skip
        self.bottleneck = stage(n, self.widths[n])
        for i in reversed(range(n)):
            c = self.widths[i]
            pos = 2 * n - i
            setattr(
                self,
                f"up_{i}",
                MedNeXtUpBlock(
                    2 * c, c, up_exp[i], kernels[pos], stride_list[i],
                    residual=resample_residual, grn=grn_norm, **common,
                ),
            )  # fmt: skip
            setattr(self, f"dec_block_{i}", stage(pos, c))
        self.out_0 = MedNeXtOutBlock(width, num_classes, spatial_dims)
        if deep_supervision:
            for i in range(1, n + 1):
                setattr(self, f"out_{i}", MedNeXtOutBlock(self.widths[i], num_classes, spatial_dims))
        self.set_grad_checkpointing(grad_checkpointing)

    # -- configuration helpers

    @staticmethod
    def _int_list(value: int | Sequence[int], count: int, name: str, minimum: int = 1) -> list[int]:
        items = [value] * count if isinstance(value, int) else list(value)
        if len(items) != count:
            raise ValueError(
                f"{name} has {len(items)} entries but this network needs {count}; give one int or {count} ints"
            )
        for i, v in enumerate(items):
            if not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name}[{i}]={v!r} must be an int >= {minimum}")
        return items

    @staticmethod
    def _kernel_list(value: Any, count: int, spatial_dims: int) -> list[tuple[int, ...]]:
        flat_ints = not isinstance(value, int) and all(isinstance(v, int) for v in value)
        if isinstance(value, int) or (flat_ints and len(value) == spatial_dims != count):
            items = [value] * count  # one kernel (int or per-axis tuple) for every position
        else:
            items = list(value)
            if len(items) != count:
                raise ValueError(
                    f"kernel_sizes has {len(items)} entries but this network needs {count} "
                    f"(one per position); give one int or {count} entries"
                )
        kernels = [as_tuple(k, spatial_dims, f"kernel_sizes[{i}]") for i, k in enumerate(items)]
        for i, k in enumerate(kernels):
            if any(v < 1 or v % 2 == 0 for v in k):
                raise ValueError(f"kernel_sizes[{i}]={k} must be odd and positive on every axis (3, 5, 7, ...)")
        return kernels

    # -- public switches

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """Choose what the backward pass recomputes instead of storing (training with gradients only).

        ``False`` or ``"none"``: nothing. ``True`` or ``"block"``: every block, whole (only block
        inputs are stored; one extra forward pass of time). ``"cheap"``: in every block (down and
        up blocks included) only norm -> 1x1 expansion -> GELU [-> GRN] (with the compression conv
        reading their output): the depthwise conv's C-channel output is stored and the R*C-channel
        tensors are not; the depthwise conv is not recomputed. Gradients are the same in all modes.
        ``grad_checkpointing`` and ``config`` hold False, True (whole blocks) or ``"cheap"``.
        """
        mode = _checkpoint_mode(enable)
        self.grad_checkpointing = mode
        self.config["grad_checkpointing"] = mode
        for module in self.modules():
            if isinstance(module, MedNeXtBlock):
                module.recompute_expansion = mode == "cheap"

    def set_fast_path(self, enable: bool = True) -> None:
        """Use the channels-last GEMM path (the default for 3D) or the plain NCDHW convolutions (the
        default for 2D, and for debugging; ``mednext.config.set_fast_path(False)`` or
        MEDNEXT_FAST_PATH=0 makes plain the default for 3D networks built afterwards)."""
        self.fast_path = enable

    def set_deep_supervision(self, enable: bool = True) -> None:
        """Return (training mode) or not return the low-resolution outputs; needs the heads built."""
        if enable and not hasattr(self, "out_1"):
            raise ValueError("this model was built with deep_supervision=False, so it has no heads out_1..out_n")
        self.deep_supervision = enable

    # -- input validation

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem and the fix if ``x`` cannot go through the network."""
        d = self.spatial_dims
        layout = "(N, C, H, W)" if d == 2 else "(N, C, D, H, W)"
        if x.ndim != d + 2:
            raise ValueError(
                f"MedNeXt ({d}D) expects a {d + 2}D tensor {layout}, got {x.ndim}D with shape {tuple(x.shape)}"
                + ("; add a batch axis with x[None]" if x.ndim == d + 1 else "")
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"MedNeXt expects {self.in_channels} input channel(s) on axis 1, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}); pass {self.in_channels} channel(s) or build the model "
                f"with in_channels={x.shape[1]}"
            )
        bad = []
        for axis, (size, div) in enumerate(zip(x.shape[2:], self.total_stride)):
            if size % div:
                lower, upper = (size // div) * div, (size // div + 1) * div
                nearest = " or ".join(str(v) for v in (lower, upper) if v > 0)
                bad.append(f"axis {axis} has {size}, needs a multiple of {div} (nearest: {nearest})")
        if bad:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not divisible by the network's total stride "
                f"{self.total_stride}: " + "; ".join(bad) + ". Pad or crop the input."
            )
        if self.config["norm"] == "group" and math.prod(x.shape[2:]) == math.prod(self.total_stride):
            # One GroupNorm group per channel over a single voxel has no variance to normalise.
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} leaves one voxel at the bottleneck, where group norm is "
                f"undefined; use at least twice the total stride {self.total_stride} along one axis"
            )

    # -- forward

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing is True and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for block in stage:
            x = self._run(block, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
        if not exporting:
            self.check_input(x)
        fast = self.fast_path and not exporting
        if fast and x.is_cuda and config.get().cuda_route.layout == "plain":
            fast = False  # on CUDA without the channels-last route the plain layout is the faster one
        if fast and not x.is_cuda and torch.compiler.is_compiling():
            # The CPU fast path's kernels loop over cache-sized chunks and taps in Python, which the compiler
            # unrolls: its graph grows with the patch. Compiled, the network runs PyTorch's own convolutions.
            fast = False
        n = self.num_stages
        # Fast path: channels-last from the stem on, so every layer takes its channels-last kernel. A
        # one-channel image counts as plain (is_channels_last), hence the stem's GEMM is asked for here.
        x = pointwise(channels_last(x), self.stem.weight.flatten(1), self.stem.bias) if fast else self.stem(x)
        skips = []
        for i in range(n):
            x = self._run_stage(getattr(self, f"enc_block_{i}"), x)
            skips.append(x)
            x = self._run(getattr(self, f"down_{i}"), x)
        x = self._run_stage(self.bottleneck, x)
        with_ds = self.deep_supervision and self.training
        low_res = [getattr(self, f"out_{n}")(x)] if with_ds else []
        for i in reversed(range(n)):
            x = self._run(getattr(self, f"up_{i}"), x) + skips[i]
            x = self._run_stage(getattr(self, f"dec_block_{i}"), x)
            if with_ds and i > 0:
                low_res.append(getattr(self, f"out_{i}")(x))
        out = self.out_0(x)
        if with_ds:
            outs = [out, *reversed(low_res)]
            return [o.contiguous() for o in outs] if fast else outs
        return out.contiguous() if fast else out


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    "S": {"expansion_ratios": 2, "block_counts": 2, "grad_checkpointing": False},
    "B": {
        "expansion_ratios": [2, 3, 4, 4, 4, 4, 4, 3, 2],
        "block_counts": 2,
        "grad_checkpointing": False,
    },
    "M": {
        "expansion_ratios": [2, 3, 4, 4, 4, 4, 4, 3, 2],
        "block_counts": [3, 4, 4, 4, 4, 4, 4, 4, 3],
        "grad_checkpointing": True,
    },
    "L": {
        "expansion_ratios": [3, 4, 8, 8, 8, 8, 8, 4, 3],
        "block_counts": [3, 4, 8, 8, 8, 8, 8, 4, 3],
        "grad_checkpointing": True,
    },
    # MedNeXt-v2 (arXiv 2512.17774): L's depth and expansion, GRN after GELU in every block (down and
    # up blocks included) normalised by the channels' summed norm; Base C=32, Wide C=64.
    "V2-BASE": {
        "expansion_ratios": [3, 4, 8, 8, 8, 8, 8, 4, 3],
        "block_counts": [3, 4, 8, 8, 8, 8, 8, 4, 3],
        "grn": {"where": "all", "norm": "sum"},
        "grad_checkpointing": True,
    },
    "V2-WIDE": {
        "width": 64,
        "expansion_ratios": [3, 4, 8, 8, 8, 8, 8, 4, 3],
        "block_counts": [3, 4, 8, 8, 8, 8, 8, 4, 3],
        "grn": {"where": "all", "norm": "sum"},
        "grad_checkpointing": True,
    },
}


def create_mednext(
    preset: str,
    in_channels: int,
    num_classes: int,
    *,
    kernel_size: int = 3,
    spatial_dims: int = 3,
    deep_supervision: bool = False,
    **overrides: Any,
) -> MedNeXt:
    """Build one of the paper's presets S, B, M or L (C=32, 4 stages, group norm, no GRN), or
    MedNeXt-v2's "v2-base" (C=32) or "v2-wide" (C=64): L's depth and expansion ratios with GRN
    (channel sum) after GELU in every block.

    Args:
        preset: "S", "B", "M", "L", "v2-base" or "v2-wide" (case-insensitive).
        in_channels: number of input channels.
        num_classes: number of output channels.
        kernel_size: odd depthwise kernel size for every block (3 and 5 in the v1 paper, 3 in v2's).
        spatial_dims: 2 or 3.
        deep_supervision: build and return the four extra heads in training mode.
        **overrides: any other :class:`MedNeXt` argument, e.g. ``strides`` or ``grad_checkpointing``
            (M, L and the v2 presets default to True, whole blocks; ``grad_checkpointing="cheap"`` recomputes only
            norm, expansion and GELU).
    """
    key = str(preset).upper()
    if key not in PRESETS:
        raise ValueError(f"unknown MedNeXt preset {preset!r}; valid presets are {', '.join(PRESETS)}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size!r} must be an odd positive int (3, 5, 7, ...)")
    args: dict[str, Any] = {
        "spatial_dims": spatial_dims,
        "width": 32,
        "kernel_sizes": kernel_size,
        "deep_supervision": deep_supervision,
        **PRESETS[key],
    }
    args.update(overrides)
    return MedNeXt(in_channels, num_classes, **args)
