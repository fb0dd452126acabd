"""Kernel launches of one training step (forward + backward, no optimizer) on the CUDA route, counted
on the CPU.

On a GPU, part of MedNeXt-L's step is spent waiting for Python to launch kernels (docs/benchmarks.md),
so the number of launches per step is a cost of its own. This script counts them without a GPU: the
network runs the CUDA route's code (``config.set_force_cuda_route``) under autocast on the CPU, with the
Triton kernels replaced by stand-ins that only count their launches (the numbers it computes are
meaningless; the sequence of operations is the route's). ATen operations that launch work are the
profiler's leaf operations other than views, allocations and metadata.

CPU operators do not map one to one onto CUDA kernels (a CPU ``sum`` may fill its output first, CPU
``addmm`` copies the bias), so compare routes with each other, not with a GPU profile.

    PYTHONPATH=src python benchmarks/count_launches.py --preset L --kernel 5 [--route norm=triton ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

NOT_LAUNCHES = {
    "aten::as_strided",
    "aten::empty_strided",
    "aten::empty",
    "aten::view",
    "aten::resolve_conj",
    "aten::detach",
    "aten::alias",
    "aten::result_type",
    "aten::_reshape_alias",
    "aten::_unsafe_view",
    "aten::_local_scalar_dense",
}


class _CountingKernel:
    """Stands in for a ``triton.jit`` function: ``kernel[grid](...)`` only counts."""

    def __init__(self, counter: collections.Counter, name: str) -> None:
        self.counter, self.name = counter, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.counter[self.name] += 1

        return launch


def count(preset: str, kernel: int, size: int, route: dict[str, str]) -> tuple[int, collections.Counter]:
    os.environ["TRITON_INTERPRET"] = "1"  # cuda_route.triton_kernels hands out the module on the CPU
    from mednext import config, create_mednext
    from mednext.nn.kernels import triton as triton_kernels
    from mednext.nn.summary import deep_supervision_loss

    triton_counts: collections.Counter = collections.Counter()
    for name in triton_kernels.KERNELS:
        setattr(triton_kernels, name, _CountingKernel(triton_counts, f"triton::{name}"))
    config.set_force_cuda_route(True)
    config.set_cuda_route(layout="channels_last", depthwise="triton", **route)
    torch.manual_seed(0)
    model = create_mednext(preset, in_channels=1, num_classes=4, kernel_size=kernel, deep_supervision=True)
    model.set_grad_checkpointing(False)
    x = torch.randn(1, 1, size, size, size)
    target = torch.randint(0, 4, (1, size, size, size))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = deep_supervision_loss(model(x), target)
        loss.backward()

    step()  # warm-up
    triton_counts.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    aten: collections.Counter = collections.Counter()
    for e in prof.events():
        leaf = not any(ch.name.startswith("aten::") for ch in e.cpu_children)
        if e.name.startswith("aten::") and leaf and e.name not in NOT_LAUNCHES:
            aten[e.name] += 1
    return sum(aten.values()) + sum(triton_counts.values()), aten + triton_counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="L", choices=["S", "B", "M", "L"])
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--size", type=int, default=32, help="cube edge of the input (launches do not depend on it)")
    p.add_argument(
        "--route", nargs="*", default=[], help="cuda_route parts, e.g. norm=triton (mednext.config.CudaRoute)"
    )
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    route = dict(kv.split("=", 1) for kv in args.route)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    total, counts = count(args.preset, args.kernel, args.size, route)
    print(f"MedNeXt-{args.preset} k{args.kernel}, CUDA route {route or 'defaults'}: {total} launches per step")
    for name, n in counts.most_common(args.top):
        print(f"{n:7d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
