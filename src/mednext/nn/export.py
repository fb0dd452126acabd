"""Export a MedNeXt to ONNX or TorchScript with dynamic batch and spatial axes.

Both exports run the network in eval mode (one full-resolution output, no deep-supervision
heads). Spatial sizes must be multiples of the network's total stride (16 per axis for the
paper's 4 stages); the exported graphs do not check this, so pad the input as the PyTorch
model would require. The model's config travels with the file: ONNX metadata property
``mednext_config``, TorchScript extra file ``mednext_config.json``. ``metadata`` adds more
entries (key to JSON text) the same way, e.g. the pipeline's ``mednext_deployment``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mednext.files import atomic_write

__all__ = ["FORMATS", "example_input", "export_model", "export_onnx", "export_torchscript", "run_exported"]

FORMATS = ("onnx", "torchscript")


def example_input(model: nn.Module, spatial: Sequence[int] | None = None, batch: int = 1) -> torch.Tensor:
    """A random input the model accepts: by default twice its total stride along every axis."""
    stride = tuple(model.total_stride)  # type: ignore[attr-defined]
    size = tuple(spatial) if spatial is not None else tuple(2 * s for s in stride)
    param = next(model.parameters())
    return torch.randn(batch, model.in_channels, *size, device=param.device, dtype=param.dtype)  # type: ignore[attr-defined]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # Tracing notes GroupNorm's batch check, and torch flags the TorchScript-based exporters
            # as legacy; neither affects the result, which the tests compare against PyTorch.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*(legacy TorchScript|torch\.jit|will be removed).*")
            yield
    finally:
        model.train(was_training)


def _axis_names(spatial_dims: int) -> list[str]:
    return ["depth", "height", "width"][3 - spatial_dims :]


def export_onnx(
    model: nn.Module, path: str | os.PathLike[str], *, opset: int = 17, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model`` as an ONNX file with input ``image`` and output ``logits``, both with
    dynamic batch and spatial axes, and ``metadata`` (key to text) as ONNX metadata properties.
    Written atomically (temporary file, then moved into place)."""
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the 'onnx' package: pip install onnx onnxruntime") from err
    dims = model.spatial_dims  # type: ignore[attr-defined]
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(_axis_names(dims))}}

    def write(tmp: Path) -> None:
        with _eval_mode(model), torch.no_grad():
            torch.onnx.export(
                model,
                (example_input(model),),
                str(tmp),
                dynamo=False,  # the torch.export-based exporter needs onnxscript; the traced graph is exact here
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": axes, "logits": axes},
                opset_version=opset,
            )
        proto = onnx.load(str(tmp))
        for key, value in _metadata(model, metadata).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))

    return atomic_write(path, write)


def export_torchscript(
    model: nn.Module, path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model`` as a traced TorchScript file (``torch.jit.load`` runs it without mednext).

    The traced graph has no shape-dependent branches, so it accepts any batch size and any
    spatial size that is a multiple of the total stride. ``metadata`` entries become extra files
    ``<key>.json``. Written atomically."""

    def write(tmp: Path) -> None:
        with _eval_mode(model), torch.no_grad():
            traced = torch.jit.trace(model, (example_input(model),), check_trace=False)
            entries = _metadata(model, metadata)
            extra = {f"{key}.json": value for key, value in entries.items() if key != "total_stride"}
            torch.jit.save(traced, str(tmp), _extra_files=extra)

    return atomic_write(path, write)


def _metadata(model: nn.Module, extra: dict[str, str] | None = None) -> dict[str, str]:
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"export needs a mednext MedNeXt model, got {type(model).__name__}")
    entries = {
        "mednext_config": json.dumps(config, sort_keys=True),
        "total_stride": json.dumps(list(model.total_stride)),  # type: ignore[attr-defined]
    }
    for key, value in (extra or {}).items():
        if key in entries or not isinstance(value, str):
            raise ValueError(f"export metadata {key!r}: give a new key with a text value")
        entries[key] = value
    return entries


def export_model(model: nn.Module, path: str | os.PathLike[str], fmt: str, **kwargs: Any) -> Path:
    """Export to ``fmt`` (``"onnx"`` or ``"torchscript"``); see :func:`export_onnx` / :func:`export_torchscript`."""
    if fmt == "onnx":
        return export_onnx(model, path, **kwargs)
    if fmt == "torchscript":
        return export_torchscript(model, path, **kwargs)
    raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def run_exported(path: str | os.PathLike[str], fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file on ``x`` (CPU) with onnxruntime or torch.jit; for checks and tests."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(["logits"], {"image": x.detach().cpu().numpy()})
        return torch.from_numpy(y)
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return module(x.detach().cpu())
    raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
