"""``mednext postprocess``: apply the postprocessing that ``mednext find-best`` chose."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "postprocess",
        help="apply the postprocessing chosen by find-best to a folder of segmentations",
        description="Apply nnU-Net's connected-component postprocessing as chosen by 'mednext find-best' (or "
        "nnUNetv2_find_best_configuration), read from its postprocessing.json, to every segmentation in a folder.",
    )
    p.add_argument("-i", "--input", required=True, help="folder of segmentations (mednext predict / ensemble output)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--pp", "-pp_json", required=True, help="postprocessing.json written by find-best")
    p.add_argument("--plans", "-plans_json", default=None, help="plans.json (default: the input folder's)")
    p.add_argument("--dataset-json", default=None, help="dataset.json (default: the input folder's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.pipeline.workflow import apply_postprocessing

    written = apply_postprocessing(args.input, args.output, args.pp, args.plans, args.dataset_json)
    print(f"postprocessed {len(written)} segmentation(s) into {args.output}")
    return 0
