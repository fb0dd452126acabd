"""``mednext compare``: MedNeXt against nnU-Net's default and residual-encoder U-Nets on the same
dataset, splits and budget, with paired statistics per class and the cost of each model."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train MedNeXt and nnU-Net on the same folds and budget; paired statistics and costs",
        description="Train each model with its own recipe on the same cross-validation folds and budget (epochs, "
        "or wall-clock hours per model and fold), score the out-of-fold predictions (Dice, NSD) and compare "
        "them case by case with a bootstrap interval and the Wilcoxon signed-rank test. Finished trainings "
        "are reused and interrupted ones resumed, so the command can simply be run again. Models: "
        "mednext:<S|B|M|L|v2-base|v2-wide>:k<odd kernel>[:<config>], nnunet:<2d|3d_fullres>, "
        "nnunet-resenc:<M|L|XL>[:<config>].",
    )
    p.add_argument("dataset", help="raw dataset folder, or dataset name (Dataset901_Lesions) or id (901)")
    p.add_argument("--workdir", default=None, help="working folder (default ./mednext_work; wins over nnUNet_*)")
    p.add_argument("--out", required=True, help="folder for the comparison's records, predictions and report")
    p.add_argument(
        "--models", nargs="+", default=None, metavar="SPEC",
        help="models to compare, e.g. mednext:S:k3 nnunet:3d_fullres nnunet-resenc:M",
    )  # fmt: skip
    p.add_argument("--folds", nargs="+", default=["0", "1", "2", "3", "4"], help="folds 0-4 (default all five)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="epochs per model and fold")
    budget.add_argument("--hours", type=float, default=None, help="wall-clock hours of training per model and fold")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="training iterations per epoch (default 250)")
    p.add_argument("--val-iters", type=int, default=None, help="validation iterations per epoch (default 50)")
    p.add_argument("--max-epochs", type=int, default=None, help="with --hours: at most this many epochs")
    p.add_argument(
        "--config", default=None, choices=("3d_fullres", "2d"),
        help="configuration of models that name none (default 3d_fullres; 2d for 2D datasets)",
    )  # fmt: skip
    p.add_argument("--baseline", default=None, help="the model the others are compared with (default: nnunet:...)")
    p.add_argument(
        "--device", default=None, choices=("cpu", "cuda", "mps"), help="default: cuda if available, else mps, else cpu"
    )
    p.add_argument("--num-workers", type=int, default=None, help="data-augmentation processes (default: 0 on CPU)")
    p.add_argument("--num-processes", type=int, default=1, help="processes for preprocessing and validation export")
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument(
        "--report-only", action="store_true",
        help="train nothing: compute the report again from the saved predictions and records in --out",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.errors import UserError
    from mednext.pipeline.compare import Budget, CompareSettings, run_compare, write_report
    from mednext.pipeline.workdir import use_workdir

    if args.report_only:
        if args.models or args.epochs is not None or args.hours is not None:
            raise UserError("--report-only trains nothing: drop --models/--epochs/--hours (the folder records them)")
        use_workdir(args.workdir)
        write_report(args.out, dataset=args.dataset)
        return 0
    if not args.models:
        raise UserError("give the models to compare: --models mednext:S:k3 nnunet:3d_fullres [...]")
    if args.num_processes < 1:
        raise UserError(f"--num-processes {args.num_processes}: give 1 or more")
    budget = Budget(
        epochs=args.epochs, hours=args.hours, iters_per_epoch=args.iters_per_epoch, val_iters=args.val_iters,
        max_epochs=args.max_epochs,
    )  # fmt: skip
    run_compare(
        CompareSettings(
            args.dataset,
            args.out,
            args.models,
            folds=args.folds,
            budget=budget,
            configuration=args.config,
            baseline=args.baseline,
            workdir=args.workdir,
            device=args.device,
            num_workers=args.num_workers,
            num_processes=args.num_processes,
            tolerance_mm=args.tolerance,
            show_progress=not args.quiet,
        )  # fmt: skip
    )
    return 0
