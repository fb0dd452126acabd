"""Gradient checkpointing modes side by side: none, whole blocks (True / "block") and "cheap".

    python benchmarks/checkpointing_modes.py --model S --batch 2 --patch 64 --rounds 3
    python benchmarks/checkpointing_modes.py --model L --batch 1 --patch 64 --rounds 3 --threads 1

For each round and each mode (interleaved), a fresh process builds the model (same seed), runs
one training step (forward, deep-supervision loss, backward, AdamW) whose peak-RSS rise it
reports (as ``mednext.nn.summary.training_step_memory``), then times a second step. Also counts,
on the ``meta`` device (no memory, no arithmetic), the bytes of the activations the autograd
graph keeps for the backward pass in each mode. Prints medians as a Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from mednext import create_mednext

MODES = {"none": False, "block": True, "cheap": "cheap"}


def _model(args: dict, mode: str, device: str = "cpu"):
    with torch.device(device):
        return create_mednext(
            args["model"], 1, 4, kernel_size=args["kernel"], deep_supervision=True, grad_checkpointing=MODES[mode]
        )


def worker(args: dict) -> dict:
    from mednext.nn.summary import peak_rss_rise, training_step

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    model = _model(args, args["mode"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=3e-5, eps=1e-4)
    shape = (args["batch"], 1, *(args["patch"],) * 3)
    x = torch.randn(shape)
    target = torch.randint(0, 4, (shape[0], *shape[2:]))
    start = time.perf_counter()
    rise = peak_rss_rise(lambda: training_step(model, x, target, opt))
    first = time.perf_counter() - start
    start = time.perf_counter()
    training_step(model, x, target, opt)
    return {"peak_mib": rise / 2**20, "step_s": time.perf_counter() - start, "first_step_s": first}


def saved_activation_mib(args: dict, mode: str) -> float:
    """MiB of the distinct storages saved for the backward pass (parameters excluded), on ``meta``."""
    model = _model(args, mode, "meta").train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}  # StorageImpl address, also on meta
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in params:
            kept[s._cdata] = s.nbytes()
        return t

    x = torch.empty(args["batch"], 1, *(args["patch"],) * 3, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(kept.values()) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="S")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    base = {"model": a.model, "kernel": a.kernel, "patch": a.patch, "batch": a.batch, "threads": a.threads}
    runs: dict[str, list[dict]] = {m: [] for m in a.modes}
    for r in range(a.rounds):
        for mode in a.modes if r % 2 == 0 else reversed(a.modes):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps({**base, "mode": mode})],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r} {mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
    ref = statistics.median(v["step_s"] for v in runs["none" if "none" in runs else a.modes[0]])
    print(f"\nMedNeXt-{a.model} k{a.kernel} 3D, {a.patch}^3, batch {a.batch}, {a.threads} thread(s), {a.rounds} rounds")
    print("\n| mode | saved activations MiB | peak-RSS rise MiB (median) | step s (median) | x time of none |")
    print("|---|---|---|---|---|")
    summary = {}
    for mode, vals in runs.items():
        peak = statistics.median(v["peak_mib"] for v in vals)
        step = statistics.median(v["step_s"] for v in vals)
        saved = saved_activation_mib(base, mode)
        summary[mode] = {"saved_mib": saved, "peak_mib": peak, "step_s": step, "runs": vals}
        print(f"| {mode} | {saved:,.0f} | {peak:,.0f} | {step:.2f} | {step / ref:.2f} |")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
