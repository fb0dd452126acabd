"""Weights into a model: load any layout we read, or transfer what fits (fine-tuning, 2D->3D).

Sources are a model, a state dict or checkpoint dict, or a file: our ``.safetensors`` checkpoints
(which carry their config; :mod:`mednext.nn.weights.checkpoint`), nnU-Net v1 ``.model`` and v2
``.pth`` files, MONAI ``.pt`` files (read without running pickled code), in the layouts of
:mod:`mednext.nn.weights.layouts`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mednext.errors import ShapeMismatchError
from mednext.nn.mednext import MedNeXt
from mednext.nn.weights import checkpoint as ckpt
from mednext.nn.weights.layouts import (
    CONFIG_KEYS,
    SHOW_KEYS,
    LoadReport,
    convert_state_dict,
    infer_config,
    require_tensor,
)

__all__ = ["TransferReport", "inflate_2d_to_3d", "load_pretrained", "read_source", "transfer_weights"]

logger = logging.getLogger(__name__)


@dataclass
class TransferReport:
    """Tensor-by-tensor account of a transfer (fine-tuning, UpKern or inflation).

    ``interpolated``, ``inflated`` and ``reinitialised`` entries are ``(key, source shape,
    target shape)``; ``missing`` are target tensors the source lacks (left as initialised);
    ``ignored`` are source tensors the target has no place for.
    """

    copied: list[str] = field(default_factory=list)
    interpolated: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    inflated: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    reinitialised: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "copied": len(self.copied),
            "interpolated": len(self.interpolated),
            "inflated": len(self.inflated),
            "reinitialised": len(self.reinitialised),
            "missing": len(self.missing),
            "ignored": len(self.ignored),
        }

    def summary(self) -> str:
        lines = [", ".join(f"{v} {k}" for k, v in self.counts().items() if v) or "nothing transferred"]
        for title, items in (
            ("interpolated", self.interpolated),
            ("inflated", self.inflated),
            ("re-initialised", self.reinitialised),
        ):
            for key, src, dst in items[:SHOW_KEYS]:
                lines.append(f"  {title}: {key} {tuple(src)} -> {tuple(dst)}")
            if len(items) > SHOW_KEYS:
                lines.append(f"  ... and {len(items) - SHOW_KEYS} more {title}")
        for title, keys in (("left as initialised (source lacks)", self.missing), ("ignored", self.ignored)):
            if keys:
                more = f" ... (+{len(keys) - SHOW_KEYS})" if len(keys) > SHOW_KEYS else ""
                lines.append(f"  {title}: {', '.join(keys[:SHOW_KEYS])}{more}")
        return "\n".join(lines)


def _pipeline_config(obj: Any, sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, Any] | None:
    """Checkpoints of our nnU-Net v2 trainer store the network's arguments under
    ``mednext.architecture.arch_kwargs``: they give what the weights cannot (strides, norm, residual)."""
    try:
        arch_kwargs = obj["mednext"]["architecture"]["arch_kwargs"]
    except (KeyError, TypeError):
        return None
    if not isinstance(arch_kwargs, Mapping):
        return None
    config = infer_config(sd)
    config.update(
        {k: v for k, v in arch_kwargs.items() if k in CONFIG_KEYS and k not in ("in_channels", "num_classes")}
    )
    report.notes.append("strides, norm and residual switches from the checkpoint's mednext architecture entry")
    return config


def read_source(source: Any, layout: str = "auto") -> tuple[dict[str, torch.Tensor], LoadReport, dict[str, Any] | None]:
    """Read weights from a model, a state dict/checkpoint dict or a file (any layout we read).

    Returns ``(state dict with mednext names, report, stored config or None)``; the config is
    known when the source is a mednext model or one of our checkpoint files.
    """
    if isinstance(source, MedNeXt):
        sd = {k: v.detach() for k, v in source.state_dict().items()}
        return sd, LoadReport("mednext", f"a {type(source).__name__} module", len(sd)), dict(source.config)
    if isinstance(source, nn.Module):
        sd, report = convert_state_dict(source.state_dict(), layout, f"a {type(source).__name__} module")
        return sd, report, None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        kind = ckpt.file_kind(path)
        if kind == "safetensors":
            tensors, metadata = ckpt.read_safetensors(path)
            if metadata.get("format") == ckpt.FORMAT_NAME:
                info = ckpt.parse_metadata(metadata, path)
                return tensors, LoadReport("mednext", repr(path), len(tensors)), info["config"]
            sd, report = convert_state_dict(tensors, layout, repr(path))
            return sd, report, None
        obj = ckpt.safe_torch_load(path)
        sd, report = convert_state_dict(obj, layout, repr(path))
        return sd, report, _pipeline_config(obj, sd, report)
    if isinstance(source, Mapping):
        sd, report = convert_state_dict(source, layout)
        return sd, report, None
    raise TypeError(
        f"cannot read weights from a {type(source).__name__}; give a path, a state dict or a model"
    )  # fmt: skip


def load_pretrained(path_or_state_dict: Any, *, source: str = "auto", **overrides: Any) -> MedNeXt:
    """Build a :class:`MedNeXt` from weights in any layout we read and load them.

    Args:
        path_or_state_dict: a file (our ``.safetensors``, an nnU-Net v1 ``.model``, an nnU-Net v2
            ``.pth``, a MONAI ``.pt``), a state dict or checkpoint dict, or a model.
        source: ``"auto"`` (detect from the keys), ``"reference"``, ``"monai"`` or ``"mednext"``.
        **overrides: :class:`MedNeXt` arguments the weights cannot determine (``strides``,
            ``norm``, ``residual``, ``grad_checkpointing``) or that should replace inferred ones.

    Returns:
        The model, in eval mode, with a ``load_report`` attribute (:class:`LoadReport`) that
        says what was mapped; the same summary is logged at INFO level.

    Raises:
        FileNotFoundError, mednext.errors.CheckpointError: missing, truncated or corrupt
            file, or a pickle that would run code.
        LayoutError: keys that match no layout (named in the message).
        ShapeMismatchError: a tensor whose shape the model cannot take (tensor and both shapes named).
    """
    sd, report, stored = read_source(path_or_state_dict, source)
    if stored is not None:
        unknown = sorted(set(overrides) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown MedNeXt argument(s) {', '.join(unknown)}; valid: {', '.join(CONFIG_KEYS)}")
        config = {**stored, **overrides}
    else:
        config = infer_config(sd, **overrides)
        if report.layout == "monai" and "residual" not in overrides:
            config["residual"] = config["resample_residual"]  # MONAI has one switch for both
    report.overridden = sorted(overrides)
    model = ckpt.build_for_weights(config, sd, report.origin)
    report.config = dict(model.config)
    model.load_report = report  # type: ignore[assignment]
    logger.info("%s", report.summary())
    return model.eval()


# ----------------------------------------------------------------------------- fine-tuning transfer


def _adaptable(key: str) -> bool:
    """Tensors that depend on the input channels or the classes: the stem and the heads."""
    return key.startswith("stem.") or bool(re.match(r"^out_\d+\.conv_out\.", key))


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _apply(
    model: nn.Module,
    source_sd: Mapping[str, torch.Tensor],
    convert: Any,
    report: TransferReport,
) -> None:
    """Shared loop: ``convert(key, source, target)`` returns the tensor to copy (and records it),
    or None when the key belongs to a stem/head module that must be re-initialised."""
    target = model.state_dict()
    values: dict[str, torch.Tensor] = {}
    reset: set[str] = set()
    for key, dst in target.items():
        if key not in source_sd:
            report.missing.append(key)
            continue
        new = convert(key, source_sd[key], dst)
        if new is None:
            reset.add(_module_of(key))
        else:
            values[key] = new
    # A module whose weight does not fit is re-initialised as a whole (weight and bias together).
    for key in list(values):
        if _module_of(key) in reset:
            del values[key]
            if key in report.copied:
                report.copied.remove(key)
    for key in target:
        if key in source_sd and _module_of(key) in reset:
            report.reinitialised.append((key, tuple(source_sd[key].shape), tuple(target[key].shape)))
    report.ignored.extend(k for k in source_sd if k not in target)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in sorted(reset):
            modules[name].reset_parameters()  # type: ignore[operator]
        for key, value in values.items():
            target[key].copy_(value.to(dtype=target[key].dtype))


def _require_mednext_names(model: nn.Module) -> None:
    if "stem.weight" not in model.state_dict():
        raise TypeError(f"the target must be a mednext MedNeXt, got {type(model).__name__}")


def transfer_weights(model: nn.Module, source: Any, *, source_layout: str = "auto") -> TransferReport:
    """Copy every tensor of ``source`` that fits ``model`` (fine-tuning initialisation).

    The stem and the segmentation heads may differ in shape (other input channels or classes):
    those modules are re-initialised and listed in the report. Any other shape difference is
    an error naming the tensor and both shapes. Target tensors the source lacks (say, deep-
    supervision heads) keep their initialisation and are listed as missing.

    Args:
        model: the MedNeXt to initialise (modified in place).
        source: a model, a state dict/checkpoint dict, or a file in any layout :func:`load_pretrained` reads.
        source_layout: ``"auto"``, ``"reference"``, ``"monai"`` or ``"mednext"``.
    """
    _require_mednext_names(model)
    source_sd, _, _ = read_source(source, source_layout)
    dims = model.state_dict()["stem.weight"].ndim - 2
    src_dims = require_tensor(source_sd, "stem.weight").ndim - 2
    if dims != src_dims:
        raise ValueError(
            f"the source is a {src_dims}D MedNeXt and the target {dims}D; "
            + (
                "use inflate_2d_to_3d to start a 3D model from 2D weights"
                if src_dims == 2
                else "they cannot correspond"
            )
        )
    report = TransferReport()

    def convert(key: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
        if src.shape == dst.shape:
            report.copied.append(key)
            return src
        if _adaptable(key):
            return None
        raise ShapeMismatchError(
            f"tensor {key!r} has shape {tuple(src.shape)} in the source but {tuple(dst.shape)} in the model; "
            "only the stem (input channels) and the heads (classes) may differ when transferring weights"
        )

    _apply(model, source_sd, convert, report)
    return report


def inflate_2d_to_3d(
    model: nn.Module, source: Any, *, mode: str = "spread", source_layout: str = "auto"
) -> TransferReport:
    """Initialise a 3D MedNeXt from a trained 2D one with the same widths and ratios.

    The new axis is the first spatial one (D of N, C, D, H, W). A depthwise kernel of in-plane
    size (kh, kw) becomes (kd, kh, kw), kd taken from the 3D model:

    - ``mode="spread"`` (default): the 2D kernel repeated over the kd planes and divided by
      kd, so a volume that is constant along D gives the 2D response away from its borders.
    - ``mode="centre"``: the 2D kernel in the middle plane, zeros elsewhere; with stride 1 along
      D the 3D model then reproduces the 2D model on every slice of a volume.

    1x1 convolutions, GRN parameters, norms and biases are copied (with a new axis of size 1).
    The stem and heads may differ (other channels/classes) and are then re-initialised.
    In-plane kernel sizes must match (run :func:`mednext.upkern` first if they do not).
    """
    if mode not in ("spread", "centre"):
        raise ValueError(f"mode={mode!r}; use 'spread' or 'centre'")
    _require_mednext_names(model)
    source_sd, _, _ = read_source(source, source_layout)
    if require_tensor(source_sd, "stem.weight").ndim != 4 or model.state_dict()["stem.weight"].ndim != 5:
        raise ValueError("inflate_2d_to_3d needs a 2D source and a 3D target model")
    report = TransferReport()

    def convert(key: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
        if src.shape == dst.shape:
            report.copied.append(key)
            return src
        if src.ndim == 4 and dst.ndim == 5 and src.shape[:2] == dst.shape[:2] and src.shape[2:] == dst.shape[3:]:
            depth = dst.shape[2]
            if depth == 1:
                report.copied.append(key)
                return src.unsqueeze(2)
            if mode == "spread":
                new = src.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth
            else:
                new = torch.zeros(dst.shape, dtype=src.dtype)
                new[:, :, depth // 2] = src
            report.inflated.append((key, tuple(src.shape), tuple(dst.shape)))
            return new
        if _adaptable(key):
            return None
        raise ShapeMismatchError(
            f"tensor {key!r} has shape {tuple(src.shape)} in the 2D source but {tuple(dst.shape)} in the 3D model; "
            "inflation needs the same widths, ratios and in-plane kernel sizes"
        )

    _apply(model, source_sd, convert, report)
    return report
