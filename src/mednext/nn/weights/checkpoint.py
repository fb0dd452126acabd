"""Checkpoint files: our own format (safetensors + JSON config) and a safe reader for pickled files.

Our format is one ``.safetensors`` file. The tensors are the model's ``state_dict``; the
safetensors header metadata (string to string) holds everything else, so the file alone
rebuilds the model:

- ``format``: ``"mednext"``; ``format_version``: ``"1"``
- ``config``: JSON of ``model.config`` (every :class:`~mednext.nn.MedNeXt` constructor argument)
- ``preset``: ``"S"``, ``"B"``, ``"M"``, ``"L"`` when the config is one of the paper's presets, else ``""``
- ``versions``: JSON of the mednext, torch, safetensors and Python versions that wrote it
- ``meta``: JSON of the keyword arguments given to :func:`save_checkpoint` (epoch, dataset, ...)

Pickled files (nnU-Net ``.model``/``.pth``, MONAI ``.pt``) are read with
``torch.load(weights_only=True)`` only, which never runs code from the file; a file that asks
for anything but tensors, containers, numbers and numpy scalars/arrays is refused.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mednext.errors import CheckpointError, LayoutError, ShapeMismatchError, UnsafeCheckpointError
from mednext.files import atomic_write
from mednext.nn.mednext import PRESETS, MedNeXt
from mednext.nn.weights.layouts import describe_keys
from mednext.version import __version__

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "build_for_weights",
    "check_fits",
    "detect_preset",
    "file_kind",
    "load_checkpoint",
    "load_state_dict_exact",
    "read_safetensors",
    "safe_torch_load",
    "save_checkpoint",
]

FORMAT_NAME = "mednext"
FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------- file kinds


def _require_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist; check the path")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a file (a folder?); give the path of the weights file")
    return p


def file_kind(path: str | os.PathLike[str]) -> str:
    """Tell a checkpoint's container from its first bytes: ``"safetensors"``, ``"torch-zip"``
    (``torch.save`` since torch 1.6), ``"pickle"`` (legacy ``torch.save`` or plain pickle).

    Raises FileNotFoundError for a missing path and CheckpointError for an empty or unknown file.
    """
    p = _require_file(path)
    with p.open("rb") as fh:
        head = fh.read(9)
    if len(head) == 0:
        raise CheckpointError(f"checkpoint {str(p)!r} is empty (0 bytes); the download or save did not finish")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"checkpoint {str(p)!r} is neither a safetensors file nor a torch.save/pickle file "
        f"(first bytes {head[:8]!r}); give a .safetensors, .pt, .pth or .model file"
    )


# ----------------------------------------------------------------------------- pickles


def _numpy_safe_globals() -> list[Any]:
    """numpy constructors that only rebuild data (nnU-Net stores losses as numpy scalars)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        return []
    core = getattr(np, "_core", None) or np.core
    scalar, reconstruct = core.multiarray.scalar, core.multiarray._reconstruct
    dtype_classes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV"}
    # Pickles written by numpy 1.x name the functions under numpy.core, numpy 2.x under numpy._core.
    allowed: list[Any] = [scalar, reconstruct, np.dtype, np.ndarray, *sorted(dtype_classes, key=str)]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(scalar, f"{mod}.scalar"), (reconstruct, f"{mod}._reconstruct")]
    return allowed


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """Load a pickled file with ``torch.load(weights_only=True)`` onto the CPU.

    Allowed: tensors, dicts, lists, tuples, strings, numbers and numpy scalars/arrays.

    Raises:
        FileNotFoundError: the path does not exist.
        UnsafeCheckpointError: the pickle asks to call anything else (it could run code).
        CheckpointError: the file is truncated or corrupt.
    """
    p = _require_file(path)
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        # torch names what it refused as "GLOBAL module.name" or as "but got <class 'module.name'>"
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"but got <class '([\w.]+)'>", text)
        if found:
            raise UnsafeCheckpointError(
                f"refused to load {str(p)!r}: its pickle asks to call {found.group(1)}, which is not a plain "
                "tensor, container or number constructor. Such a pickle can run code when loaded (or the file "
                "is damaged); mednext never executes pickled code. If you trust the file, re-save only its "
                "weights in the environment that wrote it: torch.save(model.state_dict(), 'weights.pt')"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(p)!r} could not be unpickled ({text.strip().splitlines()[-1][:200]}); the file "
            "is truncated or corrupt: download or copy it again"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {str(p)!r} is truncated or corrupt ({str(err).splitlines()[0][:200]}); "
            "download or copy it again"
        ) from None


# ----------------------------------------------------------------------------- safetensors


def _import_safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading and writing mednext checkpoints needs the 'safetensors' package: pip install safetensors"
        ) from err
    return safetensors.torch


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a safetensors file onto the CPU, and its header metadata.

    Raises FileNotFoundError for a missing path and CheckpointError for a truncated or corrupt file.
    """
    p = _require_file(path)
    st = _import_safetensors()
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = st.load_file(str(p), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError and OSError/ValueError variants
        raise CheckpointError(
            f"checkpoint {str(p)!r} is truncated or corrupt ({str(err).splitlines()[0][:200]}); "
            "download or copy it again"
        ) from None
    return tensors, metadata


# ----------------------------------------------------------------------------- our format


def detect_preset(config: Mapping[str, Any]) -> str:
    """Return "S", "B", "M" or "L" when ``config`` is that paper preset (any kernel size,
    channels, classes, 2D/3D, deep supervision or checkpointing), else ""."""
    for name, preset in PRESETS.items():
        try:
            reference = _config_of(
                {
                    "in_channels": config["in_channels"],
                    "num_classes": config["num_classes"],
                    "spatial_dims": config["spatial_dims"],
                    "kernel_sizes": config["kernel_sizes"][0][0],
                    "deep_supervision": config["deep_supervision"],
                    "width": 32,
                    **preset,
                    "grad_checkpointing": config.get("grad_checkpointing", False),
                }
            )
        except (KeyError, IndexError, TypeError, ValueError):
            return ""
        if reference == dict(config):
            return name
    return ""


def _config_of(args: dict[str, Any]) -> dict[str, Any]:
    """The normalised ``config`` that ``MedNeXt(**args)`` would have, without allocating its weights."""
    with torch.device("meta"):
        return MedNeXt(**args).config


def _versions() -> dict[str, str]:
    versions = {"mednext": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import safetensors

        versions["safetensors"] = safetensors.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], **meta: Any) -> Path:
    """Write ``model`` (a :class:`~mednext.nn.MedNeXt`) to ``path`` in our safetensors format.

    The file is written to a temporary file in the same folder and moved into place, so an
    interrupted save never leaves a half-written checkpoint. ``meta`` must be JSON-serialisable.
    Returns the path written.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"save_checkpoint needs a mednext MedNeXt model (with .config), got {type(model).__name__}")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"save_checkpoint metadata must be JSON-serialisable: {err}") from None
    st = _import_safetensors()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config, sort_keys=True),
        "preset": detect_preset(config),
        "versions": json.dumps(_versions(), sort_keys=True),
        "meta": meta_json,
    }
    return atomic_write(path, lambda tmp: st.save_file(tensors, str(tmp), metadata=metadata))


def parse_metadata(metadata: Mapping[str, str], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Decode our header metadata into ``{"config", "preset", "versions", "meta", "format_version"}``."""
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but not a mednext checkpoint (no 'format': 'mednext' in its "
            "metadata), so it does not say how to build the model; load it with "
            "mednext.load_pretrained(path, source='reference'|'monai') to infer the architecture from the weights"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has mednext checkpoint format version {metadata.get('format_version')!r}; this "
            f"mednext reads version {FORMAT_VERSION}: upgrade mednext"
        )
    out: dict[str, Any] = {"format_version": FORMAT_VERSION, "preset": metadata.get("preset", "")}
    for field in ("config", "versions", "meta"):
        try:
            out[field] = json.loads(metadata[field])
        except (KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(
                f"{str(path)!r}: metadata field {field!r} is missing or not valid JSON ({err}); the file is damaged"
            ) from None
    if not isinstance(out["config"], dict):
        raise CheckpointError(f"{str(path)!r}: metadata field 'config' is not a JSON object; the file is damaged")
    return out


def check_fits(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], origin: str = "weights"
) -> None:
    """Require ``state_dict`` to have exactly the keys and shapes of ``expected`` (a model's state
    dict, possibly on the ``meta`` device), with errors that name the keys that could not be placed,
    the keys missing, or the tensor and both shapes."""
    unplaced = [k for k in state_dict if k not in expected]
    if unplaced:
        raise LayoutError(f"{origin}: the model has no place for these tensors: {describe_keys(unplaced)}")
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise LayoutError(f"{origin}: the model needs tensors the weights lack: {describe_keys(missing)}")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            hint = ""
            if key.startswith(("stem.", "out_")):
                hint = (
                    "; to fine-tune on data with other input channels or classes, build the new model and use "
                    "mednext.nn.transfer_weights(model, source)"
                )
            raise ShapeMismatchError(
                f"{origin}: tensor {key!r} has shape {tuple(value.shape)} in the weights but "
                f"{tuple(expected[key].shape)} in the model{hint}"
            )


def _check_plausible(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], origin: str) -> None:
    """Every stage and every block holds at least one tensor: a config that claims more of them than
    the weights hold is refused before even its ``meta`` model is built."""
    strides = config.get("strides", ())
    positions = 2 * len(strides) + 1 if isinstance(strides, (list, tuple)) else 1
    counts = config.get("block_counts", 0)
    blocks = counts * positions if isinstance(counts, int) else sum(c for c in counts if isinstance(c, int))
    claimed = max(positions, blocks)
    if claimed > len(state_dict):
        raise CheckpointError(
            f"{origin}: the stored config claims {claimed} blocks/stages but the file holds only "
            f"{len(state_dict)} tensors; the file is damaged or was not written by mednext"
        )


def build_for_weights(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], origin: str) -> MedNeXt:
    """``MedNeXt(**config)`` with ``state_dict`` loaded, built only after its keys and shapes were
    checked on the ``meta`` device: a config read from a file allocates no more than the file's
    tensors hold, whatever width or depth it claims.

    Raises CheckpointError when the config builds no MedNeXt, LayoutError/ShapeMismatchError when
    the weights do not fit it."""
    _check_plausible(config, state_dict, origin)
    try:
        with torch.device("meta"):
            expected = MedNeXt(**config).state_dict()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{origin}: the stored config does not build a MedNeXt ({err})") from None
    check_fits(expected, state_dict, origin)
    model = MedNeXt(**config)
    model.load_state_dict(dict(state_dict), strict=True)
    return model


def load_state_dict_exact(model: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str = "weights") -> None:
    """Load ``state_dict`` into ``model`` requiring the same keys and shapes, with errors that
    name the keys that could not be placed, the keys missing, or the tensor and both shapes."""
    check_fits(model.state_dict(), state_dict, origin)
    model.load_state_dict(dict(state_dict), strict=True)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored by :func:`save_checkpoint` and load its weights (on the CPU).

    Returns ``(model, info)`` with ``info = {"config", "preset", "versions", "meta", "format_version"}``.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: truncated/corrupt file, not our format, or weights that do not fit the config.
    """
    kind = file_kind(path)
    if kind != "safetensors":
        raise CheckpointError(
            f"{str(path)!r} is a {kind} file, not a mednext (safetensors) checkpoint; load it with "
            "mednext.load_pretrained(path), which also reads reference and MONAI checkpoints"
        )
    tensors, metadata = read_safetensors(path)
    info = parse_metadata(metadata, path)
    return build_for_weights(info["config"], tensors, origin=str(path)), info
