"""``mednext export CKPT --format onnx|torchscript -o OUT``: deployable files with dynamic axes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mednext.errors import UserError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript (dynamic batch and spatial axes)",
        description=(
            "Export a MedNeXt checkpoint (mednext .safetensors, reference .model, nnU-Net v2 .pth or MONAI "
            "state dict) to ONNX or TorchScript. Batch and spatial axes are dynamic; spatial sizes must be "
            "multiples of the network's total stride (16 for 4 stages). The file is checked against PyTorch "
            "on two input sizes unless --no-verify is given."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint to export")
    parser.add_argument("--format", dest="fmt", choices=("onnx", "torchscript"), required=True)
    parser.add_argument("-o", "--output", type=Path, required=True, help="output file (.onnx or .pt)")
    parser.add_argument(
        "--source-layout", choices=("auto", "reference", "monai", "mednext"), default="auto", help="layout of CKPT"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mednext.nn import example_input, export_model, load_pretrained, run_exported

    if args.output.exists() and not args.overwrite:
        raise UserError(f"{str(args.output)!r} exists; choose another -o path or pass --overwrite")
    model = load_pretrained(args.checkpoint, source=args.source_layout).eval()
    kwargs = {"opset": args.opset} if args.fmt == "onnx" else {}
    export_model(model, args.output, args.fmt, **kwargs)
    print(f"wrote {args.output} ({args.fmt}; dynamic batch and spatial axes, multiples of {model.total_stride})")
    if not args.no_verify:
        base = [2 * s for s in model.total_stride]
        for spatial, batch in ((base, 1), ([b + s for b, s in zip(base, model.total_stride)], 2)):
            x = example_input(model, spatial, batch=batch)
            with torch.no_grad():
                expected = model(x)
            got = run_exported(args.output, args.fmt, x)
            rel = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
            print(f"  input {tuple(x.shape)}: max difference to PyTorch {rel:.2e} (relative)")
            if rel > 1e-4:
                raise UserError(f"the exported file differs from PyTorch by {rel:.2e} (relative) on {tuple(x.shape)}")
    return 0
