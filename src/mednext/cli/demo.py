"""``mednext demo``: train MedNeXt on a real CT, segment another patient's scan, score it (docs/demo.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--minutes {text!r} is not a number") from err
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--minutes {value} must be positive")
    return value


def _context(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--context-slices {text!r} is not a whole number") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"--context-slices {value} must be 0 or more")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train MedNeXt on an example CT and segment another patient (15 minutes of training by default)",
        description="Fetch TotalSegmentator's two example CT scans (cached after the first run), train a 2D "
        "MedNeXt on one patient's liver, spleen, stomach, aorta and kidneys through the normal nnU-Net v2 "
        "pipeline for a fixed time, segment the other patient from its DICOM series, and write Dice scores, "
        "overlay pictures, the training curve and the segmentation to --out.",
    )
    p.add_argument("--out", type=Path, default=Path("mednext_demo"), help="output folder (default ./mednext_demo)")
    p.add_argument(
        "--minutes", type=_minutes, default=None, help="training time budget in minutes (default 15; set-up and "
        "prediction come on top)",
    )  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--model", choices=("S", "B", "M", "L"), type=str.upper, default="S", help="preset (default S)")
    p.add_argument("--kernel", type=int, choices=(3, 5), default=3, help="kernel size (default 3)")
    p.add_argument("--workdir", type=Path, default=None, help="nnU-Net working folders (default OUT/work)")
    p.add_argument(
        "--compare", choices=("nnunet",), default=None,
        help="also train nnU-Net's default 2d U-Net with its own recipe for the same time and compare",
    )  # fmt: skip
    p.add_argument(
        "--context-slices", type=_context, default=None, metavar="K",
        help="2.5D input: the K slices on either side of each slice as extra channels (default: the demo's "
        "setting, see docs/demo.md; 0 = plain 2D)",
    )  # fmt: skip
    p.add_argument(
        "--no-tta", action="store_true",
        help="no mirroring at prediction (the demo's MedNeXt trains without mirroring, so this only speeds up "
        "the nnU-Net comparison)",
    )  # fmt: skip
    p.add_argument(
        "--no-crop-body", action="store_true",
        help="predict on the held-out scan's whole field of view instead of the box around its body (both "
        "models; see docs/demo.md for why the crop is the default)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.demo.run import CONTEXT_SLICES, DEFAULT_MINUTES, DemoSettings, run_demo

    settings = DemoSettings(
        out=args.out,
        minutes=args.minutes if args.minutes is not None else DEFAULT_MINUTES,
        device=args.device,
        model=args.model,
        kernel=args.kernel,
        workdir=args.workdir,
        compare=args.compare,
        tta=not args.no_tta,
        crop_body=not args.no_crop_body,
        context_slices=args.context_slices if args.context_slices is not None else CONTEXT_SLICES,
    )
    run_demo(settings)
    return 0
