"""``mednext upkern SRC DST --kernel 5``: initialise a larger-kernel model from a trained one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mednext.errors import UserError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "upkern",
        help="initialise a larger-kernel MedNeXt from a trained one (UpKern)",
        description=(
            "Build the source's network with another depthwise kernel size and initialise it from the source "
            "with UpKern: kernels resized by trilinear (3D) or bilinear (2D) interpolation, everything else "
            "copied. SRC may be a mednext .safetensors checkpoint, a reference nnU-Net v1 .model, an nnU-Net v2 "
            ".pth or a MONAI state dict; DST is written as a mednext .safetensors checkpoint."
        ),
    )
    parser.add_argument("src", type=Path, help="trained checkpoint (any layout mednext reads)")
    parser.add_argument("dst", type=Path, help="output checkpoint (.safetensors)")
    parser.add_argument("--kernel", type=int, required=True, help="new odd kernel size for every block, e.g. 5")
    parser.add_argument(
        "--source-layout",
        choices=("auto", "reference", "monai", "mednext"),
        default="auto",
        help="layout of SRC's keys (default: detect)",
    )
    parser.add_argument(
        "--norm",
        choices=("group", "layer"),
        default=None,
        help="norm of a reference/MONAI source (the weights cannot tell; default group)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.nn import MedNeXt, load_pretrained, save_checkpoint, upkern

    if args.kernel < 1 or args.kernel % 2 == 0:
        raise UserError(f"--kernel {args.kernel}: the kernel size must be odd and positive (3, 5, 7, ...)")
    if args.dst.exists() and not args.overwrite:
        raise UserError(f"{str(args.dst)!r} exists; choose another DST or pass --overwrite")
    if args.dst.resolve() == args.src.resolve():
        raise UserError("DST is the same file as SRC; write the new checkpoint to another path")
    overrides = {"norm": args.norm} if args.norm else {}
    source = load_pretrained(args.src, source=args.source_layout, **overrides)
    config = dict(source.config, kernel_sizes=args.kernel)
    target = MedNeXt(**config)
    report = upkern(target, source)
    old = sorted({k for kernel in source.config["kernel_sizes"] for k in kernel})
    save_checkpoint(
        target,
        args.dst,
        upkern={"source": str(args.src), "source_kernel_sizes": old, "kernel_size": args.kernel, **report.counts()},
    )
    print(f"UpKern {args.src} (kernel {', '.join(map(str, old))}) -> {args.dst} (kernel {args.kernel})")
    print(report.summary())
    return 0
