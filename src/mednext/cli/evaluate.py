"""``mednext evaluate``: per-case and mean per-class Dice and normalised surface Dice of predicted label maps."""

from __future__ import annotations

import argparse
from pathlib import Path

from mednext.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice and normalised surface Dice of predictions against reference label maps",
        description="Score every label map in the prediction folder against the same-named file in the "
        "reference folder: Dice and normalised surface Dice (NSD) per class, per case and averaged. Surfaces "
        "use the spacing in the image headers. Writes JSON and CSV, nnU-Net's summary.json beside them (the "
        "engine's own evaluation, read by nnUNetv2_find_best_configuration), and prints a table. Folders are "
        "given as PRED_DIR GT_DIR, or in nnU-Net's order with --gt GT_DIR --pred PRED_DIR.",
    )
    p.add_argument("pred_dir", metavar="PRED_DIR", nargs="?", default=None, help="folder of predicted label maps")
    p.add_argument("gt_dir", metavar="GT_DIR", nargs="?", default=None, help="folder of reference label maps")
    p.add_argument("--gt", "-gt", default=None, help="folder of reference label maps (nnU-Net's first argument)")
    p.add_argument("--pred", "-pred", default=None, help="folder of predicted label maps (nnU-Net's second)")
    p.add_argument(
        "--labels", "-djfile",
        default=None,
        help="dataset.json naming the classes (default: PRED_DIR/dataset.json if present, else every value found)",
    )  # fmt: skip
    p.add_argument(
        "--tolerance", nargs="+", action="extend", default=None, metavar="MM|CLASS=MM",
        help="NSD tolerance in mm: one number for every class (default 2) and/or CLASS=MM for single classes, "
        "by their names in dataset.json (label_<value> without one), e.g. --tolerance liver=2 tumour=1 3",
    )  # fmt: skip
    p.add_argument(
        "--chill", action="store_true",
        help="allow reference cases without a prediction (listed in the JSON); by default they are an error",
    )  # fmt: skip
    p.add_argument("--strict", action="store_true", help="refuse reference cases without a prediction (the default)")
    p.add_argument("-o", "--output", default=None, help="JSON file to write (default PRED_DIR/evaluation.json); "
                   "the CSV and summary.json go beside it")  # fmt: skip
    p.set_defaults(func=run)


def _folders(args: argparse.Namespace) -> tuple[str, str]:
    pred = args.pred if args.pred is not None else args.pred_dir
    gt = args.gt if args.gt is not None else args.gt_dir
    if args.pred is not None and args.pred_dir is not None or args.gt is not None and args.gt_dir is not None:
        raise UserError("give the folders either as PRED_DIR GT_DIR or as --gt GT_DIR --pred PRED_DIR, not both")
    if pred is None or gt is None:
        raise UserError("give the prediction and reference folders: PRED_DIR GT_DIR, or --gt GT_DIR --pred PRED_DIR")
    if args.chill and args.strict:
        raise UserError("--chill and --strict contradict each other; give one")
    return pred, gt


def run(args: argparse.Namespace) -> int:
    from mednext.pipeline.evaluate import evaluate_folders, parse_tolerances, write_engine_summary, write_evaluation
    from mednext.pipeline.workdir import default_processes

    tolerances = parse_tolerances(args.tolerance)  # first: its error explains folders taken for tolerances
    pred, gt = _folders(args)
    evaluation = evaluate_folders(pred, gt, args.labels, tolerances, strict=not args.chill)
    output = Path(args.output) if args.output else Path(pred) / "evaluation.json"
    json_path, csv_path = write_evaluation(evaluation, output)
    summary = write_engine_summary(
        evaluation, json_path.parent / "summary.json", min(default_processes(), len(evaluation.cases))
    )
    print(evaluation.table())
    print(f"\nwrote {json_path}, {csv_path} and {summary}")
    return 0
