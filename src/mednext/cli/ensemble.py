"""``mednext ensemble``: average the probabilities of several prediction folders (nnU-Net's ensembling)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ensemble",
        help="ensemble prediction folders written with --save-probabilities",
        description="Average the class probabilities of two or more prediction folders (each written by "
        "'mednext predict --save-probabilities' or nnUNetv2_predict --save_probabilities) with nnU-Net's "
        "ensemble_folders, and write the segmentations of the mean.",
    )
    p.add_argument("-i", "--input", nargs="+", required=True, help="prediction folders")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--save-probabilities", "--save_npz", action="store_true", help="also write the mean probabilities")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="processes (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.pipeline.workflow import ensemble

    written = ensemble(args.input, args.output, args.save_probabilities, args.num_processes)
    print(f"ensembled {len(args.input)} folders: {len(written)} case(s) in {args.output}")
    return 0
