"""Training step and inference forward of each variant, each in a fresh Python process.

`mednext benchmark --in-process` times every variant in one process, interleaved. On the CPU a process's
heap history changes what later allocations cost (glibc reuses freed heap chunks instead of
mapping fresh pages; see mednext/memory.py), so in one process the variants timed later, or
after a kept-memory variant, get some of that reuse for free. Here every variant runs in a new
process, as a user's script would: build the network (MONAI's seeded initialisation, converted
for ours, as the benchmark), one untimed training step, ``--steps`` timed steps, one untimed and
``--steps`` timed inference forwards; the variants alternate round by round.

A variant name ending in ``+kept`` runs with glibc's mmap off for the whole process
(``MALLOC_MMAP_MAX_=0``, no trimming), which is what ``mednext train`` switches on around its
epoch loop on the CPU.

    python benchmarks/fresh_process_steps.py --rounds 2 --variants monai ours monai_cl ours+kept monai+kept
    python benchmarks/fresh_process_steps.py --dims 2 --patch 112 128 --batch 5 --steps 10 --rounds 3 \
        --variants monai ours_plain ours_plain+kept      # the demo's 2D step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = """
import json, resource, sys, time, torch
from mednext.bench.step import _worker_setup
from mednext.nn.summary import training_step
spec = json.loads(sys.argv[1])
m, x, target, opt = _worker_setup(spec)
training_step(m, x, target, opt)
train = []
for _ in range(spec["steps"]):
    t = time.perf_counter(); training_step(m, x, target, opt); train.append(time.perf_counter() - t)
m.eval()
infer = []
with torch.no_grad():
    m(x)
    for _ in range(spec["steps"]):
        t = time.perf_counter(); m(x); infer.append(time.perf_counter() - t)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"train": train, "infer": infer, "max_rss_mib": rss}))
"""


def run_variant(name: str, args: argparse.Namespace) -> dict:
    base, *policies = name.split("+")
    env = dict(os.environ)
    for policy in policies:
        if policy == "kept":
            env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="100000000000")
        elif policy == "thp":
            env.update(THP_MEM_ALLOC_ENABLE="1")
        else:
            raise SystemExit(f"unknown policy {policy!r} in variant {name!r}; use NAME, NAME+kept, NAME+thp")
    patch = args.patch * args.dims if len(args.patch) == 1 else args.patch
    if len(patch) != args.dims:
        raise SystemExit(f"--patch takes 1 or {args.dims} sizes for --dims {args.dims}, got {args.patch}")
    spec = {"variant": base, "preset": args.model, "kernel": args.kernel, "dims": args.dims, "classes": 4,
            "patch": patch, "batch": args.batch, "threads": args.threads, "steps": args.steps}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="S")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--dims", type=int, default=3, choices=[2, 3])
    p.add_argument("--patch", type=int, nargs="+", default=[64], help="one size for every axis, or one per axis")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps and forwards per process (default 2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["monai", "ours", "monai_cl", "ours+kept", "monai+kept"])
    args = p.parse_args()
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rnd in range(args.rounds):
        for v in args.variants:
            r = run_variant(v, args)
            results[v].append(r)
            print(f"round {rnd + 1} {v}: train {statistics.mean(r['train']):.2f} s, "
                  f"infer {statistics.mean(r['infer']):.2f} s, max RSS {r['max_rss_mib']:,.0f} MiB", flush=True)  # fmt: skip
    first = "monai" if "monai" in results else args.variants[0]  # the ratios' reference
    ref = {k: statistics.median(statistics.mean(r[k]) for r in results[first]) for k in ("train", "infer")}
    print(f"\n| variant (own process) | train s | x {first} | infer s | x {first} | max RSS MiB |")
    print("|---|---|---|---|---|---|")
    for v, rs in results.items():
        tr = statistics.median(statistics.mean(r["train"]) for r in rs)
        inf = statistics.median(statistics.mean(r["infer"]) for r in rs)
        rss = statistics.median(r["max_rss_mib"] for r in rs)
        print(f"| {v} | {tr:.2f} | {tr / ref['train']:.2f} | {inf:.2f} | {inf / ref['infer']:.2f} | {rss:,.0f} |")


if __name__ == "__main__":
    main()
