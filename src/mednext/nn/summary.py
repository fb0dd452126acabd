"""Model summary: per-stage table, parameters, multiply-accumulates and training-step memory.

MACs are counted on the ``meta`` device (shapes only, no memory, no arithmetic) for every
convolution and transposed convolution, the layers that hold >99% of the work; norms,
GELU, additions and padding are not counted, like the reference README's figures.

The activations a training forward keeps for the backward pass are counted on the ``meta``
device too (autograd's saved tensors, each storage once, the weights excluded): the part of a
step's memory that grows with the patch, for any patch size without running the network.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mednext.nn.mednext import MedNeXt, create_mednext


@dataclass
class StageRow:
    name: str
    resolution: tuple[int, ...]
    channels: int
    blocks: int
    parameters: int
    macs: int


@dataclass
class ModelSummary:
    preset: str | None
    kernel_size: Any
    spatial_dims: int
    input_shape: tuple[int, ...]
    rows: list[StageRow]
    total_parameters: int
    total_macs: int
    memory: list[dict[str, Any]] = field(default_factory=list)
    saved_activations: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        head = f"{'stage':<14}{'resolution':>18}{'channels':>10}{'blocks':>8}{'parameters':>14}{'GMACs':>10}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            res = "x".join(str(v) for v in r.resolution)
            lines.append(f"{r.name:<14}{res:>18}{r.channels:>10}{r.blocks:>8}{r.parameters:>14,}{r.macs / 1e9:>10.2f}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<14}{'':>18}{'':>10}{'':>8}{self.total_parameters:>14,}{self.total_macs / 1e9:>10.2f}")
        shape = "x".join(str(v) for v in self.input_shape)
        lines.append(
            f"\n{self.total_parameters / 1e6:.2f} M parameters; {self.total_macs / 1e9:.1f} G multiply-accumulates "
            f"({2 * self.total_macs / 1e9:.1f} GFLOPs) for one forward pass of a {shape} input"
        )
        if self.saved_activations:
            a = self.saved_activations
            lines.append(
                f"activations saved for the backward pass (float32, batch {a['batch']}, no checkpointing, plain "
                f"path): {a['bytes'] / 2**20:,.0f} MiB"
            )
        for m in self.memory:
            lines.append(
                f"training step peak memory ({m['device']}, batch {m['batch']}, patch {m['patch']}, "
                f"checkpointing {_CHECKPOINT_LABELS[m['grad_checkpointing']]}): {m['peak_mib']:,.0f} MiB "
                f"({m['measure']})"
            )
        return "\n".join(lines)


_CHECKPOINT_LABELS = {False: "off", True: "whole blocks", "cheap": "cheap (norm, expansion, GELU)"}


def _stage_layout(model: MedNeXt) -> list[tuple[str, int, int]]:
    """(module name, resolution level, output channels) of every stage in execution order."""
    n, w = model.num_stages, model.widths
    out = [("stem", 0, w[0])]
    for i in range(n):
        out += [(f"enc_block_{i}", i, w[i]), (f"down_{i}", i + 1, w[i + 1])]
    out.append(("bottleneck", n, w[n]))
    for i in reversed(range(n)):
        out += [(f"up_{i}", i, w[i]), (f"dec_block_{i}", i, w[i])]
    out += [(f"out_{i}", i, model.num_classes) for i in range(n + 1) if hasattr(model, f"out_{i}")]
    return out


def _conv_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    kernel = math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # every input voxel scatters a kernel-sized patch into each of out/groups channels
        return inp.numel() * (module.out_channels // module.groups) * kernel
    return out.numel() * (module.in_channels // module.groups) * kernel


def summarize(model: MedNeXt, input_size: Sequence[int], *, preset: str | None = None) -> ModelSummary:
    """Per-stage table, parameters and MACs of ``model`` for a batch of one ``input_size`` patch."""
    size = tuple(int(v) for v in input_size)
    if len(size) != model.spatial_dims:
        raise ValueError(
            f"input size {size} has {len(size)} axes; this {model.spatial_dims}D model needs {model.spatial_dims}"
        )
    # Rebuild on the meta device: shapes flow, nothing is allocated or computed.
    with torch.device("meta"):
        meta = MedNeXt(**{**model.config, "grad_checkpointing": False})
    meta.eval()
    meta.set_fast_path(False)  # count the conv modules themselves; the fast path computes the same convs
    x = torch.empty((1, model.in_channels, *size), device="meta")
    meta.check_input(x)
    macs: dict[nn.Module, int] = {}
    hooks = []
    for mod in meta.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            hooks.append(mod.register_forward_hook(lambda m, i, o: macs.__setitem__(m, _conv_macs(m, i[0], o))))
    # Heads out_1..out_n only run in training mode with deep supervision; run them explicitly.
    meta.deep_supervision = meta.config["deep_supervision"]
    meta.train()
    with torch.no_grad():
        meta(x)
    for h in hooks:
        h.remove()
    levels = [size]
    for stride in model.strides:
        levels.append(tuple(v // s for v, s in zip(levels[-1], stride)))
    rows = []
    for name, level, channels in _stage_layout(model):
        mod = getattr(model, name)
        rows.append(
            StageRow(
                name=name,
                resolution=levels[level],
                channels=channels,
                blocks=len(mod) if isinstance(mod, nn.Sequential) else int(name.startswith(("down", "up"))),
                parameters=sum(p.numel() for p in mod.parameters()),
                macs=sum(macs.get(m, 0) for m in getattr(meta, name).modules()),
            )
        )
    config = model.config
    return ModelSummary(
        preset=preset,
        kernel_size=config["kernel_sizes"][0][0] if len({tuple(k) for k in config["kernel_sizes"]}) == 1 else "mixed",
        spatial_dims=model.spatial_dims,
        input_shape=(model.in_channels, *size),
        rows=rows,
        total_parameters=sum(p.numel() for p in model.parameters()),
        total_macs=sum(macs.values()),
    )


# ----------------------------------------------------------------------------- memory


def saved_activation_bytes(model: MedNeXt, batch: int, patch: Sequence[int]) -> int:
    """Bytes of the tensors a float32 training forward (deep supervision as configured, no gradient
    checkpointing, the plain path) saves for the backward pass, counted on the ``meta`` device:
    every saved storage once, the weights excluded. Exact for what it counts (a real forward saves
    the same tensors); a step's peak adds the gradients, the optimizer state and temporaries."""
    with torch.device("meta"):
        meta = MedNeXt(**{**model.config, "grad_checkpointing": False})
    meta.train()
    meta.set_fast_path(False)  # the meta device runs PyTorch's own ops only
    weights = {p.untyped_storage()._cdata for p in meta.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    x = torch.empty((batch, model.in_channels, *patch), device="meta")
    meta.check_input(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = meta(x)
    del outputs
    return sum(saved.values())


def deep_supervision_loss(outputs: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on every deep-supervision output (weights 1, 1/2, ... normalised), the
    target nearest-downsampled to each output's size."""
    outputs = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
    weights = [1 / 2**i for i in range(len(outputs))]
    total = sum(weights)
    loss = outputs[0].new_zeros(())
    for w, out in zip(weights, outputs):
        t = target
        if out.shape[2:] != target.shape[1:]:
            t = nn.functional.interpolate(target[:, None].float(), size=out.shape[2:], mode="nearest")
            t = t[:, 0].long()
        loss = loss + w / total * nn.functional.cross_entropy(out, t)
    return loss


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """Forward, deep-supervision loss, backward and optimizer step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = deep_supervision_loss(model(x), target)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _training_step(model: MedNeXt, batch: int, patch: Sequence[int], device: torch.device) -> None:
    """Forward, deep-supervision cross-entropy, backward and AdamW step on random data."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=3e-5, eps=1e-4)
    x = torch.randn(batch, model.in_channels, *patch, device=device)
    target = torch.randint(0, model.num_classes, (batch, *patch), device=device)
    training_step(model, x, target, opt)


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so imports before a step cannot hide its peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_rss_rise(step: Any) -> int:
    """Bytes by which the resident set peaks above its size before ``step()`` runs."""
    before = _rss_bytes()
    if not _reset_peak_rss():
        before = max(before, _peak_rss_bytes())
    step()
    return _peak_rss_bytes() - before


def _memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process so that the peak RSS belongs to this one step only."""
    torch.manual_seed(0)
    model = MedNeXt(**spec["config"])
    rise = peak_rss_rise(lambda: _training_step(model, spec["batch"], spec["patch"], torch.device("cpu")))
    return {"peak_bytes": rise}


def training_step_memory(
    model: MedNeXt, batch: int, patch: Sequence[int], device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Peak memory of one training step (forward, loss, backward, AdamW) beyond the model's weights.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step. CPU: the
    rise of the peak resident set size of a fresh process over its size before the step (model
    weights and interpreter excluded; the allocator's caching is included).
    """
    device = torch.device(device)
    patch = tuple(int(v) for v in patch)
    result = {
        "device": str(device),
        "batch": batch,
        "patch": "x".join(map(str, patch)),
        "grad_checkpointing": model.grad_checkpointing,
    }
    if device.type == "cuda":
        m = MedNeXt(**model.config).to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _training_step(m, batch, patch, device)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        measure = "torch.cuda.max_memory_allocated above the weights"
    elif device.type == "cpu":
        spec = {"config": model.config, "batch": batch, "patch": list(patch)}
        code = (
            "import json, sys; from mednext.nn.summary import _memory_worker; "
            "print(json.dumps(_memory_worker(json.loads(sys.argv[1]))))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the memory measurement process failed:\n{proc.stderr[-2000:]}")
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
        measure = "peak RSS of a fresh process above its RSS before the step"
    else:
        raise ValueError(f"memory measurement supports cpu and cuda devices, not {device}")
    result.update({"peak_mib": peak / 2**20, "measure": measure})
    return result


def model_summary(
    preset: str = "S",
    *,
    kernel_size: int = 3,
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 4,
    input_size: Sequence[int] | None = None,
    deep_supervision: bool = True,
    memory_batch: int | None = None,
    memory_patch: Sequence[int] | None = None,
    device: str = "cpu",
) -> ModelSummary:
    """Summary of a preset (S, B, M, L, v2-base, v2-wide) with the activations a training forward of
    ``memory_batch`` (default 2) patches of ``input_size`` saves for the backward pass; with
    ``memory_batch`` also one training step's measured peak memory on ``device`` without gradient
    checkpointing, with whole-block checkpointing and with "cheap" checkpointing."""
    model = create_mednext(
        preset, in_channels, num_classes, kernel_size=kernel_size, spatial_dims=spatial_dims,
        deep_supervision=deep_supervision,
    )  # fmt: skip
    size = tuple(input_size) if input_size else (128,) * spatial_dims
    summary = summarize(model, size, preset=preset.upper())
    batch = memory_batch or 2
    summary.saved_activations = {
        "batch": batch,
        "patch": "x".join(map(str, size)),
        "bytes": saved_activation_bytes(model, batch, size),
    }
    if memory_batch:
        patch = tuple(memory_patch) if memory_patch else size
        for ckpt in (False, True, "cheap"):
            model.set_grad_checkpointing(ckpt)
            summary.memory.append(training_step_memory(model, memory_batch, patch, device))
    return summary
