"""``mednext find-best``: the best configuration or ensemble of trained models, as nnU-Net chooses it."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "find-best",
        help="choose the best configuration or ensemble from cross-validation (nnU-Net's procedure)",
        description="Run nnU-Net's find_best_configuration on trained results: the cross-validation Dice of each "
        "model and of each pair's ensemble, the best of them, and the postprocessing that improves it. By default "
        "every MedNeXt results folder of the dataset takes part; -tr adds or selects others, nnU-Net's own "
        "trainers included (e.g. -tr MedNeXtTrainer_Sk3 nnUNetTrainer). Every fold needs its validation "
        "(mednext train ... --npz for ensembles). Prints the commands that predict with the winner.",
    )
    p.add_argument("dataset", help="dataset name (Dataset901_Lesions) or id (901)")
    p.add_argument("--workdir", default=None, help="working folder (default ./mednext_work; wins over nnUNet_*)")
    p.add_argument("-c", "--configs", nargs="+", default=None, help="configurations (default: every one trained)")
    p.add_argument("-tr", "--trainers", nargs="+", default=None, help="trainers (default: every MedNeXt trainer)")
    p.add_argument("-p", "--plans", nargs="+", default=None, help="plans identifiers (default: any)")
    p.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default 0 1 2 3 4)")
    p.add_argument("--disable-ensembling", "--disable_ensembling", action="store_true", help="single models only")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="processes for evaluation (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.pipeline.workdir import use_workdir
    from mednext.pipeline.workflow import find_best, trained_models

    dirs = use_workdir(args.workdir)
    if dirs.describe():
        print(dirs.describe())
    models = trained_models(args.dataset, args.trainers, args.plans, args.configs, args.folds)
    find_best(args.dataset, models, args.folds, not args.disable_ensembling, args.num_processes)
    return 0
