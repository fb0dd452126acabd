"""``mednext benchmark``: our MedNeXt against MONAI's, same weights, side by side in one run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="time training step and inference against MONAI's MedNeXt (same weights)")
    p.add_argument("--model", default="S", type=str.upper, choices=("S", "B", "M", "L"))
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--dims", type=int, choices=(2, 3), default=3)
    p.add_argument("--patch", type=int, nargs="+", default=[64], help="patch size, one value or one per axis")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per variant first (default 1)")
    p.add_argument(
        "--variants", nargs="+", default=None, help="subset of monai monai_cl ours_plain ours (default: all four)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--write", metavar="MD", default=None, help="append the table to this Markdown file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from mednext.benchmark import VARIANTS, machine_description, run_benchmark, write_markdown

    patch = args.patch * args.dims if len(args.patch) == 1 else args.patch
    if len(patch) != args.dims:
        raise ValueError(f"--patch has {len(patch)} values; give 1 or {args.dims}")
    result = run_benchmark(
        args.model, args.kernel, args.dims, patch, args.batch, device=args.device, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, memory=not args.no_memory,
        variants=args.variants or VARIANTS, log=lambda s: print(s, file=sys.stderr, flush=True),
    )  # fmt: skip
    print(result.table())
    if args.write:
        command = (
            f"mednext benchmark --model {args.model} --kernel {args.kernel} --dims {args.dims} "
            f"--patch {' '.join(map(str, patch))} --batch {args.batch} --device {args.device} "
            f"--repeats {args.repeats} --warmup {args.warmup}"
            + (f" --variants {' '.join(args.variants)}" if args.variants else "")
            + (" --no-memory" if args.no_memory else "")
        )
        write_markdown(args.write, result, machine_description(args.device), command)
    return 0
