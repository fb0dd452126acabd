"""``mednext export CKPT --format onnx|torchscript -o OUT``: deployable files with dynamic axes.

A checkpoint from a results folder (``.../<trainer>__<plans>__<configuration>/fold_0/checkpoint_final.pth``,
or any checkpoint with ``--results-folder``) also gets what a deployment needs to preprocess a raw
image and read the output (:mod:`mednext.pipeline.deployment`): in the file and as ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument(
        "--results-folder",
        type=Path,
        help="results folder whose plans and dataset.json describe CKPT (default: the folder CKPT sits in, if any)",
    )
    parser.add_argument(
        "--no-deployment-info", action="store_true", help="export the network only, without plans and labels"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mednext.nn import example_input, export_model, load_pretrained, run_exported

    sidecar = args.output.with_name(args.output.name + ".json")
    for target in (args.output, sidecar):
        if target.exists() and not args.overwrite:
            raise UserError(f"{str(target)!r} exists; choose another -o path or pass --overwrite")
    model = load_pretrained(args.checkpoint, source=args.source_layout).eval()
    folder = None if args.no_deployment_info else _results_folder(args)
    info = None
    if folder is not None:
        from mednext.pipeline.deployment import deployment_info, results_folder_of_checkpoint
        from mednext.pipeline.predictor import network_from_results_folder

        info = deployment_info(
            folder, args.checkpoint if results_folder_of_checkpoint(args.checkpoint) == folder else None
        )
        _check_fits(args, model, info, folder)
        # The plans fix what the weights cannot show (anisotropic strides): rebuild from them.
        model = network_from_results_folder(folder, model.state_dict())
    kwargs: dict[str, Any] = {"opset": args.opset} if args.fmt == "onnx" else {}
    if info is not None:
        from mednext.pipeline.deployment import DEPLOYMENT_KEY

        kwargs["metadata"] = {DEPLOYMENT_KEY: json.dumps(info, sort_keys=True)}
    export_model(model, args.output, args.fmt, **kwargs)
    print(f"wrote {args.output} ({args.fmt}; dynamic batch and spatial axes, multiples of {model.total_stride})")
    if info is not None:
        from mednext.files import atomic_write_json

        atomic_write_json(sidecar, info)
        print(f"wrote {sidecar} (plans, normalisation, spacing, patch and labels of {info['dataset']})")
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


def _results_folder(args: argparse.Namespace) -> Path | None:
    """The results folder named by --results-folder or holding the checkpoint; None without one."""
    try:
        from mednext.pipeline.deployment import results_folder_of_checkpoint
    except ImportError as err:  # the network-only install
        if args.results_folder is not None:
            raise UserError(
                f"--results-folder needs the pipeline's dependencies ({err.name} is missing): "
                'install the "pipeline" extra (pip install ".[pipeline]" in a checkout of mednext)'
            ) from err
        return None
    if args.results_folder is not None:
        return Path(args.results_folder).resolve()
    folder = results_folder_of_checkpoint(args.checkpoint)
    if folder is None:
        print("no results folder holds the checkpoint: the network alone is exported (--results-folder adds its plans)")
    return folder


def _check_fits(args: argparse.Namespace, model: Any, info: dict[str, Any], folder: Path) -> None:
    expected = len(info["channel_names"]) * (2 * info["context_slices"] + 1)
    if model.in_channels != expected or model.num_classes != len(info["class_values"]):
        raise UserError(
            f"{args.checkpoint} takes {model.in_channels} channel(s) and gives {model.num_classes} classes, but "
            f"{folder} describes {expected} and {len(info['class_values'])}; pass the --results-folder it was "
            "trained in, or --no-deployment-info"
        )
