"""torch.compile against eager, ours against MONAI's MedNeXt, same weights, in one process.

Two variants per network, eager and ``torch.compile``d (default backend, Inductor), for a training
step (forward + deep-supervision CE + backward + AdamW) and an inference forward (eval, no_grad). The
first call of a compiled variant (compilation) is timed on its own; then the variants are timed in
interleaved rounds and the medians are reported, as ratios against MONAI eager. Before timing, each
compiled network's eval output and first training loss are compared with its eager twin.

Networks (``--networks``): ``monai`` (MONAI's MedNeXt as shipped), ``ours`` (the default fast path)
and ``ours_unfused`` (ours with the CPU fused branch switched off, ``mednext.config``'s
``fused_blocks``, for every call: compiled, Inductor then sees norm, GELU and the GEMMs as separate ops).

    python benchmarks/compile_steps.py --model S --kernel 3 --patch 64 --batch 1 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import statistics
import sys
import time

import torch

from mednext import config
from mednext.bench.step import build_variants, machine_description
from mednext.nn.summary import training_step


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="S", type=str.upper, choices=("S", "B", "M", "L"))
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--patch", type=int, default=64, help="cubic patch edge (default 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported (default 3)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--networks", nargs="+", default=["monai", "ours"], choices=("monai", "ours", "ours_unfused"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    nets = build_variants(args.model, args.kernel, 3, 1, args.classes)
    nets["ours_unfused"] = copy.deepcopy(nets["ours"])
    base = {name: nets[name].to(dev) for name in args.networks}
    models = {}
    for name, net in base.items():
        models[name] = net
        models[f"{name}+compile"] = torch.compile(copy.deepcopy(net))
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=3e-5, eps=1e-4) for k, m in models.items()}
    torch.manual_seed(1)
    shape = (args.batch, 1, *(args.patch,) * 3)
    x = torch.randn(shape, device=dev)
    target = torch.randint(0, args.classes, (args.batch, *(args.patch,) * 3), device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def switches(name: str) -> contextlib.AbstractContextManager:
        return config.override(fused_blocks=False) if name.startswith("ours_unfused") else contextlib.nullcontext()

    def infer(name: str) -> torch.Tensor:
        models[name].eval()
        with torch.no_grad(), switches(name):
            return models[name](x)

    def train(name: str) -> float:
        models[name].train()
        with switches(name):
            return training_step(models[name], x, target, optimizers[name])

    # First calls: compilation (timed) and agreement with the eager twin, before any weight changes.
    compile_s, agreement = {}, {}
    for name in base:
        eager_out = infer(name)
        t0 = time.perf_counter()
        compiled_out = infer(f"{name}+compile")
        sync()
        compile_s[f"{name}+compile infer"] = time.perf_counter() - t0
        eager_loss = train(name)
        t0 = time.perf_counter()
        compiled_loss = train(f"{name}+compile")
        sync()
        compile_s[f"{name}+compile train"] = time.perf_counter() - t0
        agreement[name] = (
            ((compiled_out - eager_out).abs().max() / eager_out.abs().max()).item(),
            abs(compiled_loss - eager_loss) / abs(eager_loss),
        )
        _log(f"{name}: compile infer {compile_s[f'{name}+compile infer']:.0f} s, train "
             f"{compile_s[f'{name}+compile train']:.0f} s; compiled vs eager: output {agreement[name][0]:.1e}, "
             f"loss {agreement[name][1]:.1e}")  # fmt: skip

    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in models}
    for name in models:  # one untimed step each after compilation
        train(name)
        infer(name)
    for r in range(args.repeats):
        for name in models:
            sync()
            t0 = time.perf_counter()
            train(name)
            sync()
            times[name]["train"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            infer(name)
            sync()
            times[name]["infer"].append(time.perf_counter() - t0)
        _log(f"round {r + 1}/{args.repeats} done")

    med = {k: {kind: statistics.median(v) for kind, v in t.items()} for k, t in times.items()}
    ref_name = "monai" if "monai" in med else next(iter(base))
    ref = med[ref_name]
    print(f"machine: {machine_description(args.device)}; {datetime.date.today().isoformat()}")
    print(f"MedNeXt-{args.model} k{args.kernel}, patch {args.patch}^3, batch {args.batch}, median of {args.repeats}")
    print(
        f"| variant | train step s | x {ref_name} eager | x own eager | inference s | x {ref_name} eager "
        "| x own eager |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, m in med.items():
        own = med[name.removesuffix("+compile")]
        print(
            f"| {name} | {m['train']:.3f} | {ref['train'] / m['train']:.2f} | {own['train'] / m['train']:.2f} "
            f"| {m['infer']:.3f} | {ref['infer'] / m['infer']:.2f} | {own['infer'] / m['infer']:.2f} |"
        )
    print("\nfirst call of each compiled variant (compilation included), s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in compile_s.items()))  # fmt: skip
    print("compiled vs eager (relative): " + ", ".join(
        f"{k} output {o:.1e} loss {lo:.1e}" for k, (o, lo) in agreement.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
