"""Speed and memory of our MedNeXt against MONAI's, side by side in one run, same weights.

Variants: MONAI's MedNeXt as shipped (NCDHW), MONAI in ``channels_last_3d``, ours with the fast
path off (plain NCDHW convolutions) and ours as users get it (fast path on for 3D, plain for 2D),
plus, asked for by name, MONAI's and ours with freed memory kept in the process. All hold the same
weights (MONAI's, converted by :func:`mednext.nn.load_pretrained`), and the outputs are checked
against MONAI's in the same run before anything is timed.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mednext.bench import monai_name, require_monai
from mednext.files import atomic_write_text
from mednext.memory import reuse_freed_memory
from mednext.nn import load_pretrained
from mednext.nn.summary import peak_rss_rise, training_step

VARIANTS = ("monai", "monai_cl", "ours_plain", "ours")
# Variants timed with freed memory kept in the process (mednext.memory.reuse_freed_memory), as
# `mednext train` and `mednext predict` run on the CPU: not in the default set, asked for by name.
KEPT_MEMORY_VARIANTS = ("monai_kept", "ours_kept")
ALL_VARIANTS = VARIANTS + KEPT_MEMORY_VARIANTS
_MONAI = monai_name()
LABELS = {
    "monai": f"{_MONAI} as shipped",
    "monai_cl": f"{_MONAI}, channels_last_3d",
    "ours_plain": "mednext, fast path off",
    "ours": "mednext (default)",
    "monai_kept": f"{_MONAI} as shipped, freed memory kept",
    "ours_kept": "mednext (default), freed memory kept (as mednext train on the CPU)",
}


def _base(variant: str) -> str:
    """The network a variant runs: ``ours_kept`` runs ``ours``, ``monai_kept`` runs ``monai``."""
    return variant.removesuffix("_kept")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(
    preset: str, kernel_size: int, spatial_dims: int, in_channels: int, num_classes: int, seed: int = 0
) -> dict[str, nn.Module]:
    """Every variant with identical weights (MONAI's random initialisation, converted)."""
    monai_create = require_monai().create_mednext
    torch.manual_seed(seed)
    monai = monai_create(
        preset, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
        kernel_size=kernel_size, deep_supervision=True,
    )  # fmt: skip
    ours = load_pretrained(monai.state_dict(), source="monai")
    ours.set_deep_supervision(True)
    ours.set_grad_checkpointing(False)  # MONAI has none; compare like with like
    plain = load_pretrained(monai.state_dict(), source="monai")
    plain.set_deep_supervision(True)
    plain.set_grad_checkpointing(False)
    plain.set_fast_path(False)
    monai_cl = monai_create(
        preset, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
        kernel_size=kernel_size, deep_supervision=True,
    )  # fmt: skip
    monai_cl.load_state_dict(monai.state_dict())
    fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    monai_cl = monai_cl.to(memory_format=fmt)
    monai_cl._mednext_input_format = fmt  # the benchmark converts its input too
    models = {"monai": monai, "monai_cl": monai_cl, "ours_plain": plain, "ours": ours}
    for name in KEPT_MEMORY_VARIANTS:  # their own copies: their own optimizer states
        models[name] = copy.deepcopy(models[_base(name)])
    return models


def _prepare_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fmt = getattr(model, "_mednext_input_format", None)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def check_parity(models: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    """Worst relative difference of each variant's eval output against MONAI as shipped."""
    with torch.no_grad():
        ref = models["monai"].eval()(x)
        scale = ref.abs().max().item()
        diffs = {}
        for name, model in models.items():
            out = model.eval()(_prepare_input(model, x))
            diffs[name] = (out.float() - ref.float()).abs().max().item() / scale
    return diffs


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class BenchmarkResult:
    preset: str
    kernel_size: int
    spatial_dims: int
    patch: tuple[int, ...]
    batch: int
    device: str
    threads: int
    repeats: int
    parity: dict[str, float]
    train_s: dict[str, list[float]] = field(default_factory=dict)
    infer_s: dict[str, list[float]] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    fresh_processes: bool = False

    def median(self, kind: str, variant: str) -> float:
        return statistics.median(getattr(self, kind)[variant])

    def table(self) -> str:
        base = "monai"
        head = (
            "| variant | train step s (median) | x MONAI | x MONAI CL | inference s (median) | x MONAI "
            "| peak MiB (train) | max rel. diff vs MONAI |"
        )
        lines = [head, "|" + "---|" * 8]
        for v in ALL_VARIANTS:
            if v not in self.train_s:
                continue  # variant not run
            tr, inf = self.median("train_s", v), self.median("infer_s", v)
            lines.append(
                f"| {LABELS[v]} | {tr:.3f} | {tr / self.median('train_s', base):.2f} | "
                f"{tr / self.median('train_s', 'monai_cl'):.2f} | {inf:.3f} | {inf / self.median('infer_s', base):.2f} | "
                f"{self.peak_mib.get(v, float('nan')):,.0f} | {self.parity.get(v, float('nan')):.1e} |"
            )
        return "\n".join(lines)


def _worker_setup(spec: dict[str, Any]) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    """In a fresh process: the variant's network (training mode), its input, target and optimizer."""
    torch.set_num_threads(spec["threads"])
    models = build_variants(spec["preset"], spec["kernel"], spec["dims"], 1, spec["classes"])
    model = models[spec["variant"]].train()
    del models
    torch.manual_seed(1)
    x = _prepare_input(model, torch.randn(spec["batch"], 1, *spec["patch"]))
    target = torch.randint(0, spec["classes"], (spec["batch"], *spec["patch"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=3e-5, eps=1e-4)
    return model, x, target, opt


def _memory_worker(spec: dict[str, Any]) -> float:
    """Peak RSS rise of one training step of one variant, in a fresh process."""
    model, x, target, opt = _worker_setup(spec)
    with reuse_freed_memory(spec["variant"] in KEPT_MEMORY_VARIANTS):
        return peak_rss_rise(lambda: training_step(model, x, target, opt)) / 2**20


def _timing_worker(spec: dict[str, Any]) -> dict[str, float]:
    """One round of one variant in a fresh process: ``warmup`` untimed training steps, one timed,
    then one untimed and one timed inference forward. A kept-memory variant keeps freed memory
    for the whole process, as ``mednext train`` does for its epoch loop."""
    model, x, target, opt = _worker_setup(spec)
    dev = torch.device("cpu")
    with reuse_freed_memory(spec["variant"] in KEPT_MEMORY_VARIANTS):
        train = _median_time(lambda: training_step(model, x, target, opt), dev, 1, max(1, spec["warmup"]))
        model.eval()
        with torch.no_grad():
            infer = _median_time(lambda: model(x), dev, 1, 1)
    return {"train": train[0], "infer": infer[0]}


def _in_fresh_process(worker: str, spec: dict[str, Any]) -> Any:
    """``mednext.bench.step.<worker>(spec)`` run in a new Python process; its JSON result."""
    code = (
        f"import json,sys; from mednext.bench.step import {worker}; "
        f"print(json.dumps({worker}(json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} of {spec['variant']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_memory(spec: dict[str, Any], device: torch.device, model: nn.Module, x, target) -> float:
    if device.type == "cuda":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=3e-5, eps=1e-4)
        training_step(model, x, target, opt)  # allocate optimizer state outside the measured step
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        training_step(model, x, target, opt)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return float(_in_fresh_process("_memory_worker", spec))


def run_benchmark(
    preset: str = "S",
    kernel_size: int = 3,
    spatial_dims: int = 3,
    patch: Sequence[int] = (64, 64, 64),
    batch: int = 2,
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    variants: Sequence[str] = VARIANTS,
    memory: bool = True,
    num_classes: int = 4,
    log: Callable[[str], None] = print,
    fresh_processes: bool | None = None,
) -> BenchmarkResult:
    """Time a training step and an inference forward of each variant, interleaved round by round
    so that background load hits all variants alike; optionally measure peak memory.

    ``fresh_processes`` (default: on the CPU): every round of every variant runs in a new Python
    process (``warmup`` untimed steps first, at least one), as a user's script would. In one
    process the variants timed later reuse heap memory that earlier ones freed, which on the CPU
    changes a step's time a lot (see mednext.memory)."""
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise ValueError(f"unknown benchmark variant(s) {unknown}; choose from {' '.join(ALL_VARIANTS)}")
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    patch = tuple(int(v) for v in patch)
    models = {k: m.to(dev) for k, m in build_variants(preset, kernel_size, spatial_dims, 1, num_classes).items()}
    models = {k: models[k] for k in variants}
    if "monai" not in models or "monai_cl" not in models:
        raise ValueError("the benchmark needs the variants 'monai' and 'monai_cl' as its reference columns")
    torch.manual_seed(1)
    x = torch.randn(batch, 1, *patch, device=dev)
    target = torch.randint(0, num_classes, (batch, *patch), device=dev)
    parity = check_parity(models, x)
    log("parity (max |out - MONAI| / max |MONAI|): " + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()))
    # MONAI's own network in channels_last runs PyTorch's channels-last kernels, whose float32 sums
    # round differently from the NCDHW ones: it gets 1e-3, our variants 1e-4.
    bad = {k: v for k, v in parity.items() if v > (1e-3 if k == "monai_cl" else 1e-4)}
    if bad:
        raise RuntimeError(
            f"outputs differ from MONAI's beyond 1e-4 relative (1e-3 for monai_cl): {bad}; timings would be meaningless"
        )
    result = BenchmarkResult(
        preset=preset, kernel_size=kernel_size, spatial_dims=spatial_dims, patch=patch, batch=batch,
        device=str(dev), threads=torch.get_num_threads(), repeats=repeats, parity=parity,
    )  # fmt: skip
    if fresh_processes is None:
        fresh_processes = dev.type == "cpu"
    if fresh_processes and dev.type != "cpu":
        raise ValueError("fresh_processes times CPU runs only; on CUDA the caching allocator already reuses memory")
    spec = {
        "preset": preset, "kernel": kernel_size, "dims": spatial_dims, "classes": num_classes,
        "batch": batch, "patch": list(patch), "threads": torch.get_num_threads(), "warmup": warmup,
    }  # fmt: skip
    if fresh_processes:
        result.fresh_processes = True
        for rnd in range(repeats):
            for k in models:
                t = _in_fresh_process("_timing_worker", {**spec, "variant": k})
                result.train_s.setdefault(k, []).append(t["train"])
                result.infer_s.setdefault(k, []).append(t["infer"])
            log(f"round {rnd + 1}/{repeats}: " + ", ".join(f"{k} {result.train_s[k][-1]:.2f}s" for k in models))
        if memory:
            for k in models:
                result.peak_mib[k] = _measure_memory({**spec, "variant": k}, dev, models[k].train(), x, target)
        return result
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=3e-5, eps=1e-4) for k, m in models.items()}
    inputs = {k: _prepare_input(m, x) for k, m in models.items()}
    for k, m in models.items():  # warm-up (and optimizer state allocation) before any timing
        m.train()
        for _ in range(warmup):
            training_step(m, inputs[k], target, optimizers[k])
    for rnd in range(repeats):
        for k, m in models.items():
            # A kept-memory variant keeps it only while it runs, after one untimed step that grows the
            # heap; leaving returns the memory, so the other variants run with glibc's defaults.
            kept = k in KEPT_MEMORY_VARIANTS and dev.type == "cpu"
            with reuse_freed_memory(kept):
                m.train()
                step = lambda m=m, k=k: training_step(m, inputs[k], target, optimizers[k])  # noqa: E731
                t = _median_time(step, dev, 1, 1 if kept else 0)
                result.train_s.setdefault(k, []).extend(t)
                m.eval()
                with torch.no_grad():
                    t = _median_time(lambda m=m, k=k: m(inputs[k]), dev, 1, 1 if rnd == 0 or kept else 0)
                result.infer_s.setdefault(k, []).extend(t)
        log(f"round {rnd + 1}/{repeats}: " + ", ".join(f"{k} {result.train_s[k][-1]:.2f}s" for k in models))
    if memory:
        for k in models:
            result.peak_mib[k] = _measure_memory({**spec, "variant": k}, dev, models[k].train(), inputs[k], target)
    return result


def machine_description(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def write_markdown(path: str | os.PathLike, result: BenchmarkResult, machine: str, command: str) -> None:
    """Append one result (heading, machine, command, table) to a Markdown file, atomically."""
    target = Path(path)
    old = target.read_text(encoding="utf-8") if target.exists() else "# Benchmarks\n"
    patch = "x".join(map(str, result.patch))
    section = (
        f"\n## MedNeXt-{result.preset} k{result.kernel_size} {result.spatial_dims}D, patch {patch}, batch {result.batch}, "
        f"{result.device}\n\n- machine: {machine}\n- command: `{command}`\n- median of {result.repeats} interleaved "
        f"rounds{' (each round of each variant in a fresh process)' if result.fresh_processes else ' (all in one process)'}; a training step is forward + deep-supervision CE + backward + AdamW; peak memory is "
        f"{'max_memory_allocated' if result.device.startswith('cuda') else 'the peak-RSS rise of a fresh process'} "
        f"during one training step\n\n{result.table()}\n"
    )
    atomic_write_text(target, old.rstrip("\n") + "\n" + section)
