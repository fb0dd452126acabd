"""Weights that move: foreign layouts, config inference, fine-tuning transfer and 2D->3D inflation.

Layouts read:

- ``"reference"``: the reference repository's nnU-Net v1 ``.model`` files (a dict with
  ``state_dict``; ``module.`` prefixes and ``dummy_tensor`` are dropped), nnU-Net v2 ``.pth``
  files (``network_weights``) and bare state dicts. Our module names equal the reference's.
- ``"monai"``: ``monai.networks.nets.MedNeXt`` state dicts (``enc_stages``, ``down_blocks``,
  ``up_blocks``, ``dec_stages``, ``out_blocks``). MONAI's down blocks use the stage's own
  expansion ratio; this is kept through ``down_expansion_ratios``. MONAI's down blocks have no
  GRN while ours (down_1..down_n-1) do: their GRN parameters are loaded as zeros, which makes
  GRN the identity, so outputs are unchanged.
- ``"mednext"``: our own safetensors checkpoints (:mod:`mednext.nn.checkpoint`), which carry
  their config.

Everything the weights determine is inferred from shapes; what they cannot tell (strides,
group vs layer norm, the in-block residual switch) defaults to the paper's values and can be
overridden with keyword arguments.
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

from mednext.errors import LayoutError, ShapeMismatchError
from mednext.nn.mednext import MedNeXt

__all__ = [
    "LayoutError",
    "LoadReport",
    "ShapeMismatchError",
    "TransferReport",
    "convert_state_dict",
    "infer_config",
    "inflate_2d_to_3d",
    "load_pretrained",
    "load_state_dict_exact",
    "read_source",
    "to_monai",
    "to_reference_state_dict",
    "transfer_weights",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "reference", "monai", "mednext")
# Containers that hold the weights in checkpoints written by training frameworks.
_CONTAINER_KEYS = ("state_dict", "network_weights", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys named in an error message

_BLOCK_PARAM = r"(?:(?:conv1|norm|conv2|conv3|res_conv)\.(?:weight|bias)|grn_gamma|grn_beta)"
_OUR_KEY = re.compile(
    r"^(?:stem\.(?:weight|bias)"
    rf"|(?:enc_block_\d+\.\d+|bottleneck\.\d+|dec_block_\d+\.\d+|down_\d+|up_\d+)\.{_BLOCK_PARAM}"
    r"|out_\d+\.conv_out\.(?:weight|bias))$"
)
_MONAI_ONLY = re.compile(r"^(?:enc_stages|down_blocks|up_blocks|dec_stages|out_blocks)\.")
_OURS_ONLY = re.compile(r"^(?:enc_block_\d+|down_\d+|up_\d+|dec_block_\d+|out_[1-9]\d*)\.")


# ----------------------------------------------------------------------------- reports


@dataclass
class LoadReport:
    """What :func:`load_pretrained` (or :func:`convert_state_dict`) did with a checkpoint."""

    layout: str
    origin: str
    tensors: int = 0
    stripped_prefixes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    zero_filled: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    overridden: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {self.tensors} tensors from {self.origin} ({self.layout} layout)"]
        if self.stripped_prefixes:
            lines.append(f"  stripped key prefixes: {', '.join(self.stripped_prefixes)}")
        if self.dropped:
            lines.append(f"  dropped (not part of the network): {', '.join(self.dropped)}")
        if self.renamed:
            lines.append(f"  renamed {len(self.renamed)} keys to mednext names")
        if self.zero_filled:
            lines.append(
                f"  {len(self.zero_filled)} GRN tensors the source lacks set to zero (GRN = identity): "
                + ", ".join(self.zero_filled[:_SHOW])
                + (" ..." if len(self.zero_filled) > _SHOW else "")
            )
        lines.extend(f"  {note}" for note in self.notes)
        if self.overridden:
            lines.append(f"  set by the caller, not from the weights: {', '.join(self.overridden)}")
        if self.config:
            c = self.config
            lines.append(
                f"  network: {c['spatial_dims']}D, in_channels={c['in_channels']}, num_classes={c['num_classes']}, "
                f"width={c['width']}, stages={len(c['strides'])}, kernels={_compact(c['kernel_sizes'])}, "
                f"expansion={c['expansion_ratios']}, down_expansion={c['down_expansion_ratios']}, "
                f"blocks={c['block_counts']}, grn={c['grn']}, deep_supervision={c['deep_supervision']}"
            )
        return "\n".join(lines)


def _compact(kernels: list[list[int]]) -> Any:
    flat = {k for kernel in kernels for k in kernel}
    return flat.pop() if len(flat) == 1 else kernels


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
            for key, src, dst in items[:_SHOW]:
                lines.append(f"  {title}: {key} {tuple(src)} -> {tuple(dst)}")
            if len(items) > _SHOW:
                lines.append(f"  ... and {len(items) - _SHOW} more {title}")
        for title, keys in (("left as initialised (source lacks)", self.missing), ("ignored", self.ignored)):
            if keys:
                more = f" ... (+{len(keys) - _SHOW})" if len(keys) > _SHOW else ""
                lines.append(f"  {title}: {', '.join(keys[:_SHOW])}{more}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading sources


def _first(keys: Any) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOW])
    return shown + (f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def _unwrap(obj: Any, origin: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise LayoutError(f"{origin} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _unwrap(obj[key], f"{origin}[{key!r}]")
    raise LayoutError(
        f"{origin} is a dict whose top-level keys {_first(obj.keys())} hold no state dict; expected a mapping of "
        f"names to tensors or a checkpoint dict with one of {', '.join(repr(k) for k in _CONTAINER_KEYS)}"
    )


def _strip(sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
                if prefix not in report.stripped_prefixes:
                    report.stripped_prefixes.append(prefix)
        if key in out:
            raise LayoutError(f"{report.origin}: key {key!r} appears twice once prefixes are removed")
        out[key] = value
    return out


def _detect(sd: Mapping[str, torch.Tensor], origin: str) -> str:
    monai = [k for k in sd if _MONAI_ONLY.match(k)]
    ours = [k for k in sd if _OURS_ONLY.match(k)]
    if monai and not ours:
        return "monai"
    if ours and not monai:
        return "reference"
    if monai and ours:
        raise LayoutError(
            f"{origin} mixes MONAI keys ({_first(monai)}) with reference keys ({_first(ours)}); "
            "it matches no single layout"
        )
    unplaced = [k for k in sd if not _OUR_KEY.match(k)]
    raise LayoutError(
        f"{origin} matches no known MedNeXt layout (reference/nnU-Net, MONAI, mednext); keys it could not "
        f"place: {_first(unplaced or list(sd))}"
    )


def _stage_count(sd: Mapping[str, torch.Tensor], prefix: str, origin: str) -> int:
    """Number of ``{prefix}{i}.`` modules (``down_``, ``up_`` or ``down_blocks.``), checking i = 0..n-1."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if not indices:
        raise LayoutError(f"{origin}: no {prefix}<i> blocks found, so there are no stages to build")
    if indices != set(range(len(indices))):
        raise LayoutError(f"{origin}: {prefix}<i> blocks are numbered {sorted(indices)}; expected 0..n-1")
    return len(indices)


def _monai_to_ours(sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    n = _stage_count(sd, "down_blocks.", report.origin)
    out: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in sd.items():
        new = key.replace("global_resp_gamma", "grn_gamma").replace("global_resp_beta", "grn_beta")
        if m := re.match(r"^enc_stages\.(\d+)\.(.+)$", new):
            new = f"enc_block_{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"^down_blocks\.(\d+)\.(.+)$", new):
            new = f"down_{m.group(1)}.{m.group(2)}"
        elif (m := re.match(r"^up_blocks\.(\d+)\.(.+)$", new)) and int(m.group(1)) < n:
            new = f"up_{n - 1 - int(m.group(1))}.{m.group(2)}"
        elif (m := re.match(r"^dec_stages\.(\d+)\.(.+)$", new)) and int(m.group(1)) < n:
            new = f"dec_block_{n - 1 - int(m.group(1))}.{m.group(2)}"
        elif (m := re.match(r"^out_blocks\.(\d+)\.(.+)$", new)) and int(m.group(1)) < n:
            new = f"out_{n - int(m.group(1))}.{m.group(2)}"  # out_blocks.0 reads the bottleneck
        elif _OURS_ONLY.match(new):
            new = ""  # a reference name inside a MONAI dict cannot be placed
        if not new or not _OUR_KEY.match(new):
            unplaced.append(key)
            continue
        if new.endswith("norm.weight") and value.ndim > 1:
            raise LayoutError(
                f"{report.origin}: {key!r} has shape {tuple(value.shape)}: this model was built with MONAI's "
                "norm_type='layer', a LayerNorm over (channels, kernel, kernel[, kernel]) that only runs on inputs "
                "the size of the kernel. It is not a channel LayerNorm and has no equivalent in the paper or in "
                "mednext; such weights cannot be converted. Use a model trained with norm_type='group'"
            )
        if new != key:
            report.renamed[key] = new
        out[new] = value
    if unplaced:
        raise LayoutError(f"{report.origin}: MONAI layout, but these keys could not be placed: {_first(unplaced)}")
    # MONAI builds no GRN in its down blocks; ours has it in down_1..down_n-1. Zeros make it the identity.
    if any(k.endswith("grn_gamma") for k in out):
        for i in range(1, n):
            conv2 = out.get(f"down_{i}.conv2.weight")
            if conv2 is None:
                continue
            shape = (1, conv2.shape[0]) + (1,) * (conv2.ndim - 2)
            for name in ("grn_gamma", "grn_beta"):
                key = f"down_{i}.{name}"
                if key not in out:
                    out[key] = torch.zeros(shape, dtype=conv2.dtype)
                    report.zero_filled.append(key)
    return out


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "auto", origin: str = "state dict") -> tuple[
    dict[str, torch.Tensor], LoadReport
]:  # fmt: skip
    """Translate a reference, nnU-Net or MONAI state dict (or checkpoint dict) to mednext names.

    Args:
        state_dict: a state dict, or a checkpoint dict holding one under ``state_dict``,
            ``network_weights``, ``model_state_dict``, ``model`` or ``net``.
        source: ``"auto"``, ``"reference"``, ``"monai"`` or ``"mednext"`` (same names as reference).
        origin: how to name the source in messages (a path, say).

    Returns:
        ``(state dict with mednext names, report)``; the report's ``config`` is still empty.
    """
    if source not in LAYOUTS:
        raise ValueError(f"source={source!r} is not a layout we read; use one of {', '.join(LAYOUTS)}")
    sd = _unwrap(state_dict, origin)
    report = LoadReport(layout=source, origin=origin)
    sd = _strip(sd, report)
    for key in [k for k in sd if k == "dummy_tensor"]:
        report.dropped.append(key)
        del sd[key]
    layout = _detect(sd, origin) if source == "auto" else ("reference" if source == "mednext" else source)
    report.layout = layout
    if layout == "monai":
        sd = _monai_to_ours(sd, report)
    else:
        unplaced = [k for k in sd if not _OUR_KEY.match(k)]
        if unplaced:
            raise LayoutError(f"{origin}: {layout} layout, but these keys could not be placed: {_first(unplaced)}")
    report.tensors = len(sd)
    return sd, report


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
        {k: v for k, v in arch_kwargs.items() if k in _CONFIG_KEYS and k not in ("in_channels", "num_classes")}
    )
    report.notes.append("strides, norm and residual switches from the checkpoint's mednext architecture entry")
    return config


def read_source(source: Any, layout: str = "auto") -> tuple[dict[str, torch.Tensor], LoadReport, dict[str, Any] | None]:
    """Read weights from a model, a state dict/checkpoint dict or a file (any layout we read).

    Returns ``(state dict with mednext names, report, stored config or None)``; the config is
    known when the source is a mednext model or one of our checkpoint files.
    """
    from mednext.nn import checkpoint as ckpt

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


# ----------------------------------------------------------------------------- config inference


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise LayoutError(f"the weights lack {key!r}, which every MedNeXt has; is this a MedNeXt checkpoint?")
    return sd[key]


def _block_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})
    if found != list(range(len(found))):
        raise LayoutError(f"blocks of {prefix} are numbered {found}; expected 0..{len(found) - 1} with no gaps")
    return found


class _Agree:
    """Collects one value per position from several tensors and names the conflict if they differ."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.seen: dict[int, tuple[Any, str, tuple[int, ...]]] = {}

    def add(self, pos: int, value: Any, key: str, shape: torch.Size) -> None:
        if pos in self.seen and self.seen[pos][0] != value:
            first_value, first_key, first_shape = self.seen[pos]
            raise ShapeMismatchError(
                f"tensor {key!r} has shape {tuple(shape)} but {first_key!r} has {first_shape}: they give "
                f"{self.what} {value} and {first_value} to one position, which a MedNeXt cannot express"
            )
        self.seen.setdefault(pos, (value, key, tuple(shape)))

    def get(self, pos: int, default: Any = None) -> Any:
        return self.seen[pos][0] if pos in self.seen else default


def _ratio(sd: Mapping[str, torch.Tensor], key: str) -> int:
    w = sd[key]
    if w.shape[0] % w.shape[1]:
        raise ShapeMismatchError(f"tensor {key!r} has shape {tuple(w.shape)}: output is not a multiple of input")
    return w.shape[0] // w.shape[1]


_CONFIG_KEYS = (
    "in_channels", "num_classes", "spatial_dims", "width", "strides", "expansion_ratios", "block_counts",
    "kernel_sizes", "down_expansion_ratios", "up_expansion_ratios", "residual", "resample_residual", "norm",
    "grn", "deep_supervision", "grad_checkpointing",
)  # fmt: skip


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> dict[str, Any]:
    """Infer :class:`MedNeXt` arguments from a state dict with mednext names.

    Shapes give: 2D/3D, in_channels, num_classes, width, number of stages, block counts,
    expansion ratios (blocks, down and up blocks), kernel sizes, GRN, the resampling residual
    and the deep-supervision heads. They cannot give strides (default 2 per stage), the norm
    ('group' and 'layer' have the same parameters; default 'group'), the in-block residual
    (default on) or gradient checkpointing (default off): pass those as ``overrides``, which
    also replace any inferred value.
    """
    unknown = sorted(set(overrides) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown MedNeXt argument(s) {', '.join(unknown)}; valid: {', '.join(_CONFIG_KEYS)}")
    sd = state_dict
    stem = _need(sd, "stem.weight")
    spatial_dims = stem.ndim - 2
    if spatial_dims not in (2, 3):
        raise ShapeMismatchError(f"tensor 'stem.weight' has shape {tuple(stem.shape)}: neither 2D nor 3D conv weight")
    width, in_channels = int(stem.shape[0]), int(stem.shape[1])
    n = _stage_count(sd, "down_", "the weights")
    n_up = _stage_count(sd, "up_", "the weights")
    if n_up != n:
        raise LayoutError(f"the weights have {n} down blocks but {n_up} up blocks; a MedNeXt has as many of each")
    positions = 2 * n + 1
    stage_prefix = {i: f"enc_block_{i}" for i in range(n)} | {n: "bottleneck"}
    stage_prefix |= {2 * n - i: f"dec_block_{i}" for i in range(n)}

    blocks = [0] * positions
    ratio, kernel = _Agree("expansion ratio"), _Agree("kernel size")
    for pos, prefix in stage_prefix.items():
        indices = _block_indices(sd, prefix)
        blocks[pos] = len(indices)
        for b in indices:
            for name in ("conv1.weight", "conv2.weight"):
                _need(sd, f"{prefix}.{b}.{name}")
            key = f"{prefix}.{b}.conv2.weight"
            ratio.add(pos, _ratio(sd, key), key, sd[key].shape)
            key = f"{prefix}.{b}.conv1.weight"
            kernel.add(pos, list(sd[key].shape[2:]), key, sd[key].shape)
    down_exp, up_exp = [], []
    for i in range(n):
        for prefix, pos, out in ((f"down_{i}", i, down_exp), (f"up_{i}", 2 * n - i, up_exp)):
            key = f"{prefix}.conv1.weight"
            kernel.add(pos, list(_need(sd, key).shape[2:]), key, sd[key].shape)
            _need(sd, f"{prefix}.conv2.weight")
            out.append(_ratio(sd, f"{prefix}.conv2.weight"))
    # A bottleneck without blocks has no kernel of its own; the reference uses the decoder's.
    if kernel.get(n) is None:
        kernel.seen[n] = kernel.seen[n + 1]
    exp = []
    for pos in range(positions):
        fallback = down_exp[pos] if pos < n else (up_exp[2 * n - pos] if pos > n else 2)
        exp.append(ratio.get(pos, fallback))
    out_head = _need(sd, "out_0.conv_out.weight")
    heads = [i for i in range(1, n + 1) if f"out_{i}.conv_out.weight" in sd]
    if heads and len(heads) != n:
        absent = [f"out_{i}.conv_out.weight" for i in range(1, n + 1) if i not in heads]
        raise LayoutError(f"the weights have some deep-supervision heads but lack {_first(absent)}")
    config: dict[str, Any] = {
        "in_channels": in_channels,
        "num_classes": int(out_head.shape[1]),
        "spatial_dims": spatial_dims,
        "width": width,
        "strides": [[2] * spatial_dims for _ in range(n)],
        "expansion_ratios": exp,
        "block_counts": blocks,
        "kernel_sizes": [kernel.get(pos) for pos in range(positions)],
        "down_expansion_ratios": down_exp,
        "up_expansion_ratios": up_exp,
        "residual": True,
        "resample_residual": "down_0.res_conv.weight" in sd,
        "norm": "group",
        "grn": any(k.endswith("grn_gamma") for k in sd),
        "deep_supervision": bool(heads),
        "grad_checkpointing": False,
    }
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- loading


def load_state_dict_exact(model: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str = "weights") -> None:
    """Load ``state_dict`` into ``model`` requiring the same keys and shapes, with errors that
    name the keys that could not be placed, the keys missing, or the tensor and both shapes."""
    expected = model.state_dict()
    unplaced = [k for k in state_dict if k not in expected]
    if unplaced:
        raise LayoutError(f"{origin}: the model has no place for these tensors: {_first(unplaced)}")
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise LayoutError(f"{origin}: the model needs tensors the weights lack: {_first(missing)}")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            hint = ""
            if key.startswith(("stem.", "out_")):
                hint = (
                    "; to fine-tune on data with other input channels or classes, build the new model and use "
                    "mednext.nn.weights.transfer_weights(model, source)"
                )
            raise ShapeMismatchError(
                f"{origin}: tensor {key!r} has shape {tuple(value.shape)} in the weights but "
                f"{tuple(expected[key].shape)} in the model{hint}"
            )
    model.load_state_dict(dict(state_dict), strict=True)


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
        FileNotFoundError, mednext.nn.checkpoint.CheckpointError: missing, truncated or corrupt
            file, or a pickle that would run code.
        LayoutError: keys that match no layout (named in the message).
        ShapeMismatchError: a tensor whose shape the model cannot take (tensor and both shapes named).
    """
    sd, report, stored = read_source(path_or_state_dict, source)
    if stored is not None:
        unknown = sorted(set(overrides) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown MedNeXt argument(s) {', '.join(unknown)}; valid: {', '.join(_CONFIG_KEYS)}")
        config = {**stored, **overrides}
    else:
        config = infer_config(sd, **overrides)
        if report.layout == "monai" and "residual" not in overrides:
            config["residual"] = config["resample_residual"]  # MONAI has one switch for both
    report.overridden = sorted(overrides)
    model = MedNeXt(**config)
    load_state_dict_exact(model, sd, report.origin)
    report.config = dict(model.config)
    model.load_report = report  # type: ignore[assignment]
    logger.info("%s", report.summary())
    return model.eval()


# ----------------------------------------------------------------------------- other directions


def to_reference_state_dict(model: MedNeXt) -> dict[str, torch.Tensor]:
    """The state dict the reference implementation loads (our names plus its ``dummy_tensor``).

    The reference gives ``down_0`` no GRN, as ours does, so no tensor needs renaming.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["dummy_tensor"] = torch.ones(1)
    return sd


def to_monai(model: MedNeXt) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Express ``model`` as MONAI's MedNeXt: ``(constructor kwargs, state dict)``.

    ``monai.networks.nets.MedNeXt(**kwargs).load_state_dict(state_dict)`` then gives the same
    outputs. Raises ValueError naming the setting MONAI cannot express: per-position kernels,
    strides other than 2, the reference's down-block ratios where they differ from the stage's,
    separate residual switches, layer norm, or non-zero GRN in down blocks (MONAI has none there).
    """
    c = model.config
    n = len(c["strides"])
    exp, blocks = c["expansion_ratios"], c["block_counts"]
    kernels = {k for kernel in c["kernel_sizes"] for k in kernel}
    problems = []
    if len(kernels) != 1:
        problems.append(f"kernel_sizes={c['kernel_sizes']} (MONAI has one kernel size for all blocks)")
    if any(s != 2 for stride in c["strides"] for s in stride):
        problems.append(f"strides={c['strides']} (MONAI always down-samples by 2)")
    enc = []
    for i in range(n):
        if blocks[i] and exp[i] != c["down_expansion_ratios"][i]:
            problems.append(
                f"down_{i} has expansion ratio {c['down_expansion_ratios'][i]} but enc_block_{i} has {exp[i]} "
                "(MONAI's down blocks use their stage's ratio)"
            )
        enc.append(c["down_expansion_ratios"][i])
    dec = []
    for j in range(n):
        i = n - 1 - j
        if blocks[2 * n - i] and exp[2 * n - i] != c["up_expansion_ratios"][i]:
            problems.append(f"up_{i} and dec_block_{i} have different expansion ratios")
        dec.append(c["up_expansion_ratios"][i])
    if c["residual"] != c["resample_residual"]:
        problems.append("residual != resample_residual (MONAI has one switch for both)")
    if c["norm"] != "group":
        problems.append("norm='layer' (MONAI's layer norm is a different, kernel-sized LayerNorm)")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(1, n):
        for name in ("grn_gamma", "grn_beta"):
            value = sd.pop(f"down_{i}.{name}", None)
            if value is not None and bool(value.any()):
                problems.append(f"down_{i}.{name} is not zero (MONAI's down blocks have no GRN)")
    if problems:
        raise ValueError("this model cannot be expressed as a MONAI MedNeXt: " + "; ".join(problems))
    kwargs = {
        "spatial_dims": c["spatial_dims"],
        "init_filters": c["width"],
        "in_channels": c["in_channels"],
        "out_channels": c["num_classes"],
        "encoder_expansion_ratio": enc,
        "decoder_expansion_ratio": dec,
        "bottleneck_expansion_ratio": exp[n],
        "kernel_size": kernels.pop(),
        "deep_supervision": c["deep_supervision"],
        "use_residual_connection": c["residual"],
        "blocks_down": blocks[:n],
        "blocks_bottleneck": blocks[n],
        "blocks_up": blocks[n + 1 :],
        "norm_type": "group",
        "global_resp_norm": c["grn"],
    }
    out = {}
    for key, value in sd.items():
        new = key.replace("grn_gamma", "global_resp_gamma").replace("grn_beta", "global_resp_beta")
        if m := re.match(r"^enc_block_(\d+)\.(.+)$", new):
            new = f"enc_stages.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"^down_(\d+)\.(.+)$", new):
            new = f"down_blocks.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"^up_(\d+)\.(.+)$", new):
            new = f"up_blocks.{n - 1 - int(m.group(1))}.{m.group(2)}"
        elif m := re.match(r"^dec_block_(\d+)\.(.+)$", new):
            new = f"dec_stages.{n - 1 - int(m.group(1))}.{m.group(2)}"
        elif (m := re.match(r"^out_(\d+)\.(.+)$", new)) and m.group(1) != "0":
            new = f"out_blocks.{n - int(m.group(1))}.{m.group(2)}"
        out[new] = value
    return kwargs, out


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
    src_dims = _need(source_sd, "stem.weight").ndim - 2
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
    if _need(source_sd, "stem.weight").ndim != 4 or model.state_dict()["stem.weight"].ndim != 5:
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
