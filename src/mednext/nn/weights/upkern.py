"""UpKern: initialise a large-kernel MedNeXt from a small-kernel one (Roy et al., MICCAI 2023).

Semantics of the reference implementation: for every tensor of the target that the source
also has, tensors whose name contains 'bias', 'norm' or 'dummy' are copied; other tensors are
copied when the shapes match and otherwise (the depthwise kernels) resized to the target's
kernel with trilinear (3D) or bilinear (2D) interpolation, ``align_corners=False``. Target
tensors the source lacks keep their initialisation and are reported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mednext.errors import ShapeMismatchError
from mednext.nn.weights.layouts import require_tensor
from mednext.nn.weights.transfer import TransferReport, read_source

__all__ = ["upkern", "upkern_state_dict"]

_COPY_ALWAYS = ("bias", "norm", "dummy")


def _resize_kernel(key: str, src: torch.Tensor, dst_shape: torch.Size) -> torch.Tensor:
    spatial = src.ndim - 2
    if src.ndim != len(dst_shape) or tuple(src.shape[:2]) != tuple(dst_shape[:2]):
        raise ShapeMismatchError(
            f"tensor {key!r} has shape {tuple(src.shape)} in the source but {tuple(dst_shape)} in the target: "
            "UpKern only resizes kernels; source and target need the same widths and expansion ratios"
        )
    mode = {2: "bilinear", 3: "trilinear"}.get(spatial)
    if mode is None:
        raise ShapeMismatchError(f"tensor {key!r} has shape {tuple(src.shape)}: not a 2D or 3D kernel")
    # (out, in/groups, *kernel) is read as a batch of single-channel images of the kernel's size.
    return F.interpolate(src.float(), size=tuple(dst_shape[2:]), mode=mode, align_corners=False).to(src.dtype)


def upkern_state_dict(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """Compute the UpKern values for ``target`` (a state dict, used for names and shapes) from
    ``source`` (mednext names). Returns the new tensors (only those the source provides) and a
    report. Raises ShapeMismatchError naming the tensor and both shapes where the two cannot
    correspond."""
    report = TransferReport()
    values: dict[str, torch.Tensor] = {}
    for key, dst in target.items():
        if key not in source:
            report.missing.append(key)
            continue
        src = source[key]
        if src.shape == dst.shape:
            values[key] = src
            report.copied.append(key)
        elif any(word in key for word in _COPY_ALWAYS):
            raise ShapeMismatchError(
                f"tensor {key!r} has shape {tuple(src.shape)} in the source but {tuple(dst.shape)} in the target: "
                "biases and norms must match, so the two networks have different widths"
            )
        else:
            values[key] = _resize_kernel(key, src, dst.shape)
            report.interpolated.append((key, tuple(src.shape), tuple(dst.shape)))
    report.ignored.extend(k for k in source if k not in target)
    return values, report


def upkern(target_model: nn.Module, source: Any, *, source_layout: str = "auto") -> TransferReport:
    """Initialise ``target_model`` (modified in place) from ``source`` with UpKern.

    Args:
        target_model: a MedNeXt with the kernel size you want (any odd size, e.g. 3 -> 5, 3 -> 7, 5 -> 7).
        source: a model, a state dict/checkpoint dict, or any file :func:`mednext.load_pretrained`
            reads (our format, reference ``.model``, MONAI).
        source_layout: ``"auto"``, ``"reference"``, ``"monai"`` or ``"mednext"``.

    Returns:
        A :class:`~mednext.nn.weights.TransferReport` listing copied, interpolated and
        uninitialised (``missing``) tensors, and source tensors the target ignores.

    Raises:
        ValueError: 2D source for a 3D target or the reverse.
        ShapeMismatchError: tensors that differ in more than kernel size (other widths).
    """
    target = target_model.state_dict()
    if "stem.weight" not in target:
        raise TypeError(f"upkern's target must be a mednext MedNeXt, got {type(target_model).__name__}")
    source_sd, _, _ = read_source(source, source_layout)
    src_dims = require_tensor(source_sd, "stem.weight").ndim - 2
    dst_dims = target["stem.weight"].ndim - 2
    if src_dims != dst_dims:
        raise ValueError(
            f"UpKern source is a {src_dims}D MedNeXt but the target is {dst_dims}D; they cannot correspond"
            + (" (for 2D -> 3D use mednext.nn.weights.inflate_2d_to_3d)" if src_dims == 2 else "")
        )
    values, report = upkern_state_dict(target, source_sd)
    with torch.no_grad():
        for key, value in values.items():
            target[key].copy_(value.to(dtype=target[key].dtype))
    return report
