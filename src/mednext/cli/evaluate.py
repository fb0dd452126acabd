"""``mednext evaluate``: per-case and mean per-class Dice and normalised surface Dice of predicted label maps."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice and normalised surface Dice of predictions against reference label maps",
        description="Score every label map in PRED_DIR against the same-named file in GT_DIR: Dice and "
        "normalised surface Dice (NSD) per class, per case and averaged. Surfaces use the spacing in the "
        "image headers. Writes JSON and CSV and prints a table.",
    )
    p.add_argument("pred_dir", metavar="PRED_DIR", help="folder of predicted label maps")
    p.add_argument("gt_dir", metavar="GT_DIR", help="folder of reference label maps with the same file names")
    p.add_argument(
        "--labels",
        default=None,
        help="dataset.json naming the classes (default: PRED_DIR/dataset.json if present, else every value found)",
    )
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("--strict", action="store_true", help="fail if a reference case has no prediction")
    p.add_argument("-o", "--output", default=None, help="JSON file to write (default PRED_DIR/evaluation.json); "
                   "the CSV goes beside it")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.pipeline.evaluate import evaluate_folders, write_evaluation

    evaluation = evaluate_folders(args.pred_dir, args.gt_dir, args.labels, args.tolerance, args.strict)
    output = Path(args.output) if args.output else Path(args.pred_dir) / "evaluation.json"
    json_path, csv_path = write_evaluation(evaluation, output)
    print(evaluation.table())
    print(f"\nwrote {json_path} and {csv_path}")
    return 0
