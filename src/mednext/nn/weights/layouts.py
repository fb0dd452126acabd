"""Foreign weight layouts: reference and MONAI state dicts in mednext names, and back.

Pure functions of state dicts (state dict in, state dict out), like timm's ``checkpoint_filter_fn``:

- ``"reference"``: the reference repository's nnU-Net v1 ``.model`` files (a dict with
  ``state_dict``; ``module.`` prefixes and ``dummy_tensor`` are dropped), nnU-Net v2 ``.pth``
  files (``network_weights``) and bare state dicts. Our module names equal the reference's.
- ``"monai"``: ``monai.networks.nets.MedNeXt`` state dicts (``enc_stages``, ``down_blocks``,
  ``up_blocks``, ``dec_stages``, ``out_blocks``). MONAI's down blocks use the stage's own
  expansion ratio; this is kept through ``down_expansion_ratios``. MONAI's down blocks have no
  GRN while ours (down_1..down_n-1) do: their GRN parameters are loaded as zeros, which makes
  GRN the identity, so outputs are unchanged.
- ``"mednext"``: our own names (the reference's).

Another implementation's names are one :class:`KeyTable` (module prefixes with their stage-index
maps, parameter renames), read in both directions by :func:`rename_keys`; ``MONAI_KEYS`` is MONAI's.
MedNeXt-v2's official weights (announced for nnU-Net, not published) will be one more table and one
more layout name. MedNeXt-v2 state dicts already load in our names and in MONAI's names (GRN in
``down_0`` tells :func:`infer_config` it is v2); MONAI's own network cannot run them (no GRN in its
down blocks, GRN normalised by the channel mean), so :func:`to_monai` refuses such a model.

:func:`infer_config` reads the network's arguments from a state dict's shapes; what the weights
cannot tell (strides, group vs layer norm, the in-block residual switch) defaults to the paper's
values and can be overridden with keyword arguments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mednext.errors import LayoutError, ShapeMismatchError
from mednext.nn.mednext import MedNeXt

__all__ = [
    "CONFIG_KEYS",
    "LAYOUTS",
    "MONAI_KEYS",
    "SHOW_KEYS",
    "LoadReport",
    "convert_state_dict",
    "KeyTable",
    "describe_keys",
    "infer_config",
    "rename_keys",
    "require_tensor",
    "to_monai",
    "to_reference_state_dict",
]

LAYOUTS = ("auto", "reference", "monai", "mednext")
# Containers that hold the weights in checkpoints written by training frameworks.
_CONTAINER_KEYS = ("state_dict", "network_weights", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")
SHOW_KEYS = 5  # keys named in an error message

_BLOCK_PARAM = r"(?:(?:conv1|norm|conv2|conv3|res_conv)\.(?:weight|bias)|grn_gamma|grn_beta)"
_OUR_KEY = re.compile(
    r"^(?:stem\.(?:weight|bias)"
    rf"|(?:enc_block_\d+\.\d+|bottleneck\.\d+|dec_block_\d+\.\d+|down_\d+|up_\d+)\.{_BLOCK_PARAM}"
    r"|out_\d+\.conv_out\.(?:weight|bias))$"
)
_MONAI_ONLY = re.compile(r"^(?:enc_stages|down_blocks|up_blocks|dec_stages|out_blocks)\.")
_OURS_ONLY = re.compile(r"^(?:enc_block_\d+|down_\d+|up_\d+|dec_block_\d+|out_[1-9]\d*)\.")


# ----------------------------------------------------------------------------- key tables


@dataclass(frozen=True)
class KeyTable:
    """How another implementation names a MedNeXt's tensors, as one table read in both directions.

    ``modules`` rows are ``(our prefix, their prefix, index map)``; a prefix may hold ``{i}``, a stage or
    head index, which the map turns into theirs and back: ``"same"``, ``"reversed"`` (``n - 1 - i``,
    deepest first) or ``"from_bottleneck"`` (``n - i``). Each map is its own inverse. Rows are tried in
    order and the first whose prefix matches wins. ``parameters`` rows rename a key's last part
    (``grn_gamma`` and theirs). A key that no row matches cannot be placed.
    """

    name: str
    modules: tuple[tuple[str, str, str], ...]
    parameters: tuple[tuple[str, str], ...] = ()


# index maps, each its own inverse, with the indices they accept (of n stages)
_INDEX_MAPS = {
    "same": (lambda i, n: i, lambda n: range(n)),
    "reversed": (lambda i, n: n - 1 - i, lambda n: range(n)),
    "from_bottleneck": (lambda i, n: n - i, lambda n: range(1, n + 1)),
}

# MONAI's ``monai.networks.nets.MedNeXt`` (MONAI >= 1.5).
MONAI_KEYS = KeyTable(
    name="monai",
    modules=(
        ("stem.", "stem.", "same"),
        ("enc_block_{i}.", "enc_stages.{i}.", "same"),
        ("down_{i}.", "down_blocks.{i}.", "same"),
        ("bottleneck.", "bottleneck.", "same"),
        ("up_{i}.", "up_blocks.{i}.", "reversed"),
        ("dec_block_{i}.", "dec_stages.{i}.", "reversed"),
        ("out_0.", "out_0.", "same"),
        ("out_{i}.", "out_blocks.{i}.", "from_bottleneck"),  # out_blocks.0 reads the bottleneck
    ),
    parameters=(("grn_gamma", "global_resp_gamma"), ("grn_beta", "global_resp_beta")),
)


def _prefix_pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


def rename_keys(
    state_dict: Mapping[str, torch.Tensor], table: KeyTable, num_stages: int, *, to_ours: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """``state_dict`` renamed by ``table`` into our names (``to_ours``) or into the table's.

    Returns the renamed dict, each new key's original key, and the keys that no row places (left out),
    in order. ``num_stages`` is the network's ``n``; an index outside the network's range is unplaced."""
    src, dst = (1, 0) if to_ours else (0, 1)
    rows = [(_prefix_pattern(row[src]), row[dst], row[2]) for row in table.modules]
    renamed: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    unplaced = []
    for key, value in state_dict.items():
        new = None
        for pattern, template, index_map in rows:
            m = pattern.match(key)
            if m is None:
                continue
            if m.groups():
                index = int(m.group(1))
                mapping, valid = _INDEX_MAPS[index_map]
                if (mapping(index, num_stages) if to_ours else index) not in valid(num_stages):
                    break  # checked on our side: ours is n - 1 at most (n for the heads)
                head = template.replace("{i}", str(mapping(index, num_stages)))
            else:
                head = template
            rest = key[m.end() :]
            for ours_name, theirs_name in table.parameters:
                old, repl = (theirs_name, ours_name) if to_ours else (ours_name, theirs_name)
                if rest == old or rest.endswith("." + old):
                    rest = rest[: len(rest) - len(old)] + repl
            new = head + rest
            break
        if new is None or new in renamed:
            unplaced.append(key)
            continue
        renamed[new], origins[new] = value, key
    return renamed, origins, unplaced


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
                + ", ".join(self.zero_filled[:SHOW_KEYS])
                + (" ..." if len(self.zero_filled) > SHOW_KEYS else "")
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


# ----------------------------------------------------------------------------- reading sources


def describe_keys(keys: Any) -> str:
    """The first few of ``keys``, quoted, for an error message."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:SHOW_KEYS])
    return shown + (f" (and {len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else "")


def _unwrap(obj: Any, origin: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise LayoutError(f"{origin} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _unwrap(obj[key], f"{origin}[{key!r}]")
    raise LayoutError(
        f"{origin} is a dict whose top-level keys {describe_keys(obj.keys())} hold no state dict; expected a mapping of "
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
            f"{origin} mixes MONAI keys ({describe_keys(monai)}) with reference keys ({describe_keys(ours)}); "
            "it matches no single layout"
        )
    unplaced = [k for k in sd if not _OUR_KEY.match(k)]
    raise LayoutError(
        f"{origin} matches no known MedNeXt layout (reference/nnU-Net, MONAI, mednext); keys it could not "
        f"place: {describe_keys(unplaced or list(sd))}"
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
    foreign = [k for k in sd if _OURS_ONLY.match(k)]  # a reference name inside a MONAI dict cannot be placed
    out, origins, unplaced = rename_keys({k: v for k, v in sd.items() if k not in foreign}, MONAI_KEYS, n, to_ours=True)
    unplaced = foreign + unplaced + [origins.pop(k) for k in list(out) if not _OUR_KEY.match(k)]
    if unplaced:
        raise LayoutError(
            f"{report.origin}: MONAI layout, but these keys could not be placed: {describe_keys(unplaced)}"
        )
    for key, value in out.items():
        if key.endswith("norm.weight") and value.ndim > 1:
            raise LayoutError(
                f"{report.origin}: {origins[key]!r} has shape {tuple(value.shape)}: this model was built with "
                "MONAI's norm_type='layer', a LayerNorm over (channels, kernel, kernel[, kernel]) that only runs on "
                "inputs the size of the kernel. It is not a channel LayerNorm and has no equivalent in the paper or "
                "in mednext; such weights cannot be converted. Use a model trained with norm_type='group'"
            )
    report.renamed.update({origins[k]: k for k in out if origins[k] != k})
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
            raise LayoutError(
                f"{origin}: {layout} layout, but these keys could not be placed: {describe_keys(unplaced)}"
            )
    report.tensors = len(sd)
    return sd, report


# ----------------------------------------------------------------------------- config inference


def require_tensor(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """``sd[key]``, or a LayoutError saying that every MedNeXt has it."""
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


CONFIG_KEYS = (
    "in_channels", "num_classes", "spatial_dims", "width", "strides", "expansion_ratios", "block_counts",
    "kernel_sizes", "down_expansion_ratios", "up_expansion_ratios", "residual", "resample_residual", "norm",
    "grn", "deep_supervision", "grad_checkpointing",
)  # fmt: skip


def _inferred_grn(sd: Mapping[str, torch.Tensor]) -> bool | dict[str, str]:
    """GRN as the weights show it: none, in every block but down_0 (True: the reference v1's, channel
    mean), or in down_0 too, which only MedNeXt-v2 has: v2's GRN (channel sum). The normalisation is
    not in the weights; ``grn=...`` overrides it."""
    if not any(k.endswith("grn_gamma") for k in sd):
        return False
    return {"where": "all", "norm": "sum"} if "down_0.grn_gamma" in sd else True


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> dict[str, Any]:
    """Infer :class:`MedNeXt` arguments from a state dict with mednext names.

    Shapes give: 2D/3D, in_channels, num_classes, width, number of stages, block counts,
    expansion ratios (blocks, down and up blocks), kernel sizes, where GRN sits (with GRN in
    ``down_0``, which only MedNeXt-v2 has, its channel-sum normalisation is assumed), the
    resampling residual and the deep-supervision heads. They cannot give strides (default 2 per stage), the norm
    ('group' and 'layer' have the same parameters; default 'group'), the in-block residual
    (default on) or gradient checkpointing (default off): pass those as ``overrides``, which
    also replace any inferred value.
    """
    unknown = sorted(set(overrides) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown MedNeXt argument(s) {', '.join(unknown)}; valid: {', '.join(CONFIG_KEYS)}")
    sd = state_dict
    stem = require_tensor(sd, "stem.weight")
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
                require_tensor(sd, f"{prefix}.{b}.{name}")
            key = f"{prefix}.{b}.conv2.weight"
            ratio.add(pos, _ratio(sd, key), key, sd[key].shape)
            key = f"{prefix}.{b}.conv1.weight"
            kernel.add(pos, list(sd[key].shape[2:]), key, sd[key].shape)
    down_exp, up_exp = [], []
    for i in range(n):
        for prefix, pos, out in ((f"down_{i}", i, down_exp), (f"up_{i}", 2 * n - i, up_exp)):
            key = f"{prefix}.conv1.weight"
            kernel.add(pos, list(require_tensor(sd, key).shape[2:]), key, sd[key].shape)
            require_tensor(sd, f"{prefix}.conv2.weight")
            out.append(_ratio(sd, f"{prefix}.conv2.weight"))
    # A bottleneck without blocks has no kernel of its own; the reference uses the decoder's.
    if kernel.get(n) is None:
        kernel.seen[n] = kernel.seen[n + 1]
    exp = []
    for pos in range(positions):
        fallback = down_exp[pos] if pos < n else (up_exp[2 * n - pos] if pos > n else 2)
        exp.append(ratio.get(pos, fallback))
    out_head = require_tensor(sd, "out_0.conv_out.weight")
    heads = [i for i in range(1, n + 1) if f"out_{i}.conv_out.weight" in sd]
    if heads and len(heads) != n:
        absent = [f"out_{i}.conv_out.weight" for i in range(1, n + 1) if i not in heads]
        raise LayoutError(f"the weights have some deep-supervision heads but lack {describe_keys(absent)}")
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
        "grn": _inferred_grn(sd),
        "deep_supervision": bool(heads),
        "grad_checkpointing": False,
    }
    config.update(overrides)
    return config


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
    for i in range(n):
        for name in ("grn_gamma", "grn_beta"):
            value = sd.pop(f"down_{i}.{name}", None)
            if value is not None and bool(value.any()):
                problems.append(f"down_{i}.{name} is not zero (MONAI's down blocks have no GRN)")
    grn = c["grn"]
    if (
        isinstance(grn, dict)
        and grn["norm"] == "sum"
        and any(v.any() for k, v in sd.items() if k.endswith("grn_gamma"))
    ):
        problems.append("GRN normalised by the channels' summed norm (MONAI's GRN uses their mean)")
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
        "global_resp_norm": bool(c["grn"]),
    }
    out, _, unplaced = rename_keys(sd, MONAI_KEYS, n, to_ours=False)
    if unplaced:
        raise ValueError(f"keys with no MONAI name: {describe_keys(unplaced)}")
    return kwargs, out
