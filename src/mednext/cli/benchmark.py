"""``mednext benchmark``: our MedNeXt against MONAI's, same weights, side by side in one run.

The command of the optional :mod:`mednext.bench` part: it needs MONAI (``pip install "mednext[bench]"``)
and says so, without a traceback, when MONAI is missing.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="time training step and inference against MONAI's MedNeXt (same weights)",
        description="--task step (default): a training step and an inference forward against MONAI's MedNeXt. "
        "--task predict: a whole CT volume predicted by `mednext predict` and by nnU-Net's stock predictor "
        "running MONAI's MedNeXt with the same weights (time, peak memory, agreement). "
        'Needs MONAI: pip install "mednext[bench]".',
    )
    p.add_argument("--task", choices=("step", "predict"), default="step", help="what to time (default: step)")
    p.add_argument("--model", default="S", type=str.upper, choices=("S", "B", "M", "L"))
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--dims", type=int, choices=(2, 3), default=3)
    p.add_argument("--patch", type=int, nargs="+", default=[64], help="patch size, one value or one per axis")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per variant first (default 1)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="step: subset of monai monai_cl ours_plain ours (default: all four), plus monai_kept ours_kept "
        "(the same networks with freed memory kept in the process, as mednext train on the CPU); "
        "predict: subset of engine_monai engine_ours ours_1tile ours (default: engine_monai ours)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="step, CPU: time all variants in this one process (default: each round of each variant in a "
        "fresh process, because a process's heap history changes CPU step times)",
    )
    p.add_argument("--write", metavar="MD", default=None, help="append the table to this Markdown file")
    g = p.add_argument_group("--task predict")
    g.add_argument("--tta", action="store_true", help="mirroring test-time augmentation on (default off)")
    g.add_argument(
        "--crop-z", type=int, nargs=2, default=[48, 112], metavar=("LO", "HI"),
        help="axial slices of the demo's example CT to predict (default 48 112: 64 slices of 3 mm)",
    )  # fmt: skip
    g.add_argument("--classes", type=int, default=6, help="output classes of the network (default 6)")
    g.add_argument("--tile-batch", type=int, default=2, help="tiles per forward in our predictor (default 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.bench import require_monai

    require_monai()  # a clear error before any work when MONAI is missing
    if args.task == "predict":
        return run_predict(args)
    return run_step(args)


def run_step(args: argparse.Namespace) -> int:
    import sys

    from mednext.bench.step import VARIANTS, machine_description, run_benchmark, write_markdown

    patch = args.patch * args.dims if len(args.patch) == 1 else args.patch
    if len(patch) != args.dims:
        raise ValueError(f"--patch has {len(patch)} values; give 1 or {args.dims}")
    result = run_benchmark(
        args.model, args.kernel, args.dims, patch, args.batch, device=args.device, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, memory=not args.no_memory,
        variants=args.variants or VARIANTS, log=lambda s: print(s, file=sys.stderr, flush=True),
        fresh_processes=False if args.in_process else None,
    )  # fmt: skip
    print(result.table())
    if args.write:
        command = (
            f"mednext benchmark --model {args.model} --kernel {args.kernel} --dims {args.dims} "
            f"--patch {' '.join(map(str, patch))} --batch {args.batch} --device {args.device} "
            f"--repeats {args.repeats} --warmup {args.warmup}"
            + (f" --threads {args.threads}" if args.threads else "")
            + (f" --variants {' '.join(args.variants)}" if args.variants else "")
            + (" --no-memory" if args.no_memory else "")
            + (" --in-process" if args.in_process else "")
        )
        write_markdown(args.write, result, machine_description(args.device), command)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import sys

    from mednext.bench.predict import example_ct, run_predict_benchmark, write_markdown
    from mednext.bench.step import machine_description

    if args.dims != 3:
        raise ValueError("--task predict benchmarks a 3D CT volume; use --dims 3")
    patch = args.patch * 3 if len(args.patch) == 1 else args.patch
    if len(patch) != 3:
        raise ValueError(f"--patch has {len(patch)} values; give 1 or 3")
    image, label = example_ct(tuple(args.crop_z))
    result = run_predict_benchmark(
        image, label, args.model, args.kernel, patch, tta=args.tta, repeats=args.repeats, warmup=args.warmup > 0,
        threads=args.threads, variants=args.variants or ("engine_monai", "ours"), memory=not args.no_memory,
        num_classes=args.classes, tile_batch=args.tile_batch, log=lambda s: print(s, file=sys.stderr, flush=True),
    )  # fmt: skip
    print(result.table())
    if args.write:
        command = (
            f"mednext benchmark --task predict --model {args.model} --kernel {args.kernel} "
            f"--patch {' '.join(map(str, patch))} --crop-z {args.crop_z[0]} {args.crop_z[1]} "
            f"--classes {args.classes} --tile-batch {args.tile_batch} --repeats {args.repeats} "
            f"--warmup {args.warmup}" + (" --tta" if args.tta else "")
            + (f" --threads {args.threads}" if args.threads else "")
            + (f" --variants {' '.join(args.variants)}" if args.variants else "")
            + (" --no-memory" if args.no_memory else "")
        )  # fmt: skip
        write_markdown(args.write, result, machine_description("cpu"), command)
    return 0
