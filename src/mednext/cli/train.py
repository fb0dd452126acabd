"""``mednext train``: train MedNeXt on a planned dataset with the reference recipe.

nnU-Net's order works as it does for ``nnUNetv2_train``: ``mednext train 901 3d_fullres 0 1 2 3 4
--npz``, with nnU-Net's short flags (``-tr``, ``-p``, ``--c``, ``--val``, ``--val_best``,
``-device``, ``-pretrained_weights``) beside mednext's own.

Multi-GPU / multi-node: ``torchrun --nnodes N --nproc_per_node G -m mednext train ...`` (or the
``mednext`` script through ``torchrun $(which mednext) train ...``); on CPU the gloo backend is used.
"""

from __future__ import annotations

import argparse

from mednext.errors import UserError

CONFIGURATIONS = ("3d_fullres", "2d")
_PLANS = {"MedNeXtPlans": "auto", "MedNeXtPlans_paper": "paper"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train MedNeXt on a planned dataset (nnU-Net v2 trainer, reference recipe)",
        description="Train folds of MedNeXt with the reference recipe on a dataset prepared by 'mednext plan'. "
        "Positional arguments follow nnUNetv2_train: DATASET CONFIGURATION FOLD [FOLD ...] (e.g. "
        "'mednext train 901 3d_fullres 0 1 2 3 4'); --config and --fold do the same.",
    )
    p.add_argument("dataset", help="dataset name (Dataset901_Lesions) or id (901)")
    p.add_argument("configuration", nargs="?", default=None, help="3d_fullres or 2d (as --config)")
    p.add_argument("folds", nargs="*", default=[], help="folds 0-4, several, or 'all' (as --fold)")
    p.add_argument("--workdir", default=None, help="working folder (default ./mednext_work; wins over nnUNet_*)")
    p.add_argument("--config", default=None, choices=CONFIGURATIONS, help="configuration (default 3d_fullres)")
    p.add_argument("--fold", default=None, help="0-4 or all (default 0)")
    p.add_argument(
        "--model",
        default="S",
        type=str.upper,
        choices=("S", "B", "M", "L", "V2-BASE", "V2-WIDE"),
        help="preset: S, B, M, L or MedNeXt-v2's v2-base, v2-wide (default S)",
    )
    p.add_argument("--kernel", default=3, type=int, help="odd depthwise kernel size: 3, 5, 7, ... (default 3)")
    p.add_argument(
        "-tr", "--trainer", default=None,
        help="trainer name as nnU-Net spells it, e.g. MedNeXtTrainer_Bk5 or MedNeXtTrainer_V2Basek3 (sets --model "
        "and --kernel)",
    )  # fmt: skip
    p.add_argument(
        "--recipe", choices=("auto", "paper"), default=None, help="which plans to use (default: auto if planned)"
    )
    p.add_argument("-p", "--plans", default=None, choices=tuple(_PLANS), help="plans identifier (as --recipe)")
    p.add_argument(
        "--device", "-device", default=None, choices=("cpu", "cuda", "mps"),
        help="default: cuda if available, else mps, else cpu",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 1000)")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="training iterations per epoch (default 250)")
    p.add_argument("--val-iters", type=int, default=None, help="validation iterations per epoch (default 50)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from checkpoint_latest.pth")
    p.add_argument(
        "--c", "--continue", dest="continue_", action="store_true",
        help="as nnU-Net's --c: per fold, skip it if finished, resume it if interrupted, else start it",
    )  # fmt: skip
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA instead of float16 + grad scaling")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (CUDA; on the CPU it is slower, see docs/benchmarks.md, and is skipped "
        "with a note); nnUNet_compile=1 asks the same",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data-augmentation processes (default: 0 on CPU, the engine's on GPU)",
    )
    p.add_argument(
        "--no-val", action="store_true", help="skip the sliding-window validation of the fold's cases at the end"
    )
    p.add_argument(
        "--npz", action="store_true",
        help="the final validation also saves each case's probabilities (needed to ensemble configurations)",
    )  # fmt: skip
    p.add_argument("--val", action="store_true", help="only validate the trained fold(s), do not train")
    p.add_argument(
        "--val-best", "--val_best", action="store_true", help="validate with checkpoint_best.pth instead of _final"
    )
    p.add_argument(
        "--pretrained", "-pretrained_weights", default=None,
        help="initialise from weights (our checkpoint, reference .model, MONAI)",
    )  # fmt: skip
    p.add_argument("--upkern-from", default=None, help="initialise a k5 model from a k3 checkpoint (UpKern)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _choices(args: argparse.Namespace) -> tuple[str, list[str], str, int, str | None]:
    """(configuration, folds, preset, kernel, recipe) from positional arguments and flags."""
    if args.configuration is not None and args.configuration not in CONFIGURATIONS:
        raise UserError(
            f"configuration {args.configuration!r}: use {' or '.join(CONFIGURATIONS)} "
            f"(mednext train DATASET CONFIGURATION FOLD ...)"
        )
    if args.configuration and args.config and args.configuration != args.config:
        raise UserError(f"configuration given twice: {args.configuration} and --config {args.config}; give one")
    configuration = args.configuration or args.config or "3d_fullres"
    if args.folds and args.fold is not None and args.folds != [args.fold]:
        raise UserError(f"folds given twice: {' '.join(args.folds)} and --fold {args.fold}; give one")
    folds = args.folds or [args.fold or "0"]
    if "all" in folds and len(folds) > 1:
        raise UserError("fold 'all' trains on every case; give it alone, not with numbered folds")
    if len(set(folds)) != len(folds):
        raise UserError(f"fold listed twice: {' '.join(folds)}")
    preset, kernel = args.model, args.kernel
    if args.trainer is not None:
        from mednext.pipeline.trainer import parse_trainer_name

        parsed = parse_trainer_name(args.trainer)
        if parsed is None:
            raise UserError(
                f"-tr {args.trainer}: mednext trains MedNeXtTrainer_<S|B|M|L|V2Base|V2Wide>k<odd kernel> (e.g. "
                "MedNeXtTrainer_Sk3); train nnU-Net's own trainers with nnUNetv2_train"
            )
        preset, kernel = parsed
    recipe = args.recipe
    if args.plans is not None:
        if recipe is not None and _PLANS[args.plans] != recipe:
            raise UserError(f"-p {args.plans} and --recipe {recipe} disagree; give one")
        recipe = _PLANS[args.plans]
    return configuration, folds, preset, kernel, recipe


def run(args: argparse.Namespace) -> int:
    import time
    from dataclasses import replace

    from mednext.pipeline.ddp import shutdown_distributed
    from mednext.pipeline.runner import TrainSettings, fold_folder, parse_fold, train
    from mednext.pipeline.workdir import use_workdir

    configuration, folds, preset, kernel, recipe = _choices(args)
    for fold in folds:
        parse_fold(fold)  # every fold checked before the first one trains
    if args.resume and args.continue_:
        raise UserError("--resume and --c both continue runs; --c also starts folds that never ran: give one")
    dirs = use_workdir(args.workdir)
    if dirs.describe():
        print(dirs.describe())
    base = TrainSettings(
        args.dataset,
        configuration=configuration,
        preset=preset,
        kernel=kernel,
        device=args.device,
        epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch,
        val_iters=args.val_iters,
        resume=args.resume,
        bf16=args.bf16,
        compile=args.compile,
        num_workers=args.num_workers,
        recipe=recipe,
        validate=not args.no_val,
        pretrained=args.pretrained,
        upkern_from=args.upkern_from,
        show_progress=not args.quiet,
        save_probabilities=args.npz,
        validation_only=args.val,
        validation_checkpoint="best" if args.val_best else "final",
    )
    try:
        for fold in folds:
            settings = replace(base, fold=fold)
            if args.continue_ and not args.val:
                folder = fold_folder(settings)
                if (folder / "checkpoint_final.pth").is_file():
                    print(f"fold {fold}: already trained ({folder / 'checkpoint_final.pth'}); skipped")
                    continue
                if (folder / "checkpoint_latest.pth").is_file():
                    settings = replace(settings, resume=True, pretrained=None, upkern_from=None)
            start = time.perf_counter()
            trainer = train(settings)
            if trainer.local_rank == 0:
                _report(trainer, args.val, time.perf_counter() - start)
    finally:
        shutdown_distributed()
    return 0


def _report(trainer: object, validated_only: bool, seconds: float) -> None:
    what = "validated" if validated_only else "trained"
    line = (
        f"\n{what} {trainer.__class__.__name__} on {trainer.plans_manager.dataset_name} "
        f"{trainer.configuration_name} fold {trainer.fold} in {seconds:.0f} s"
    )
    if not validated_only:
        losses = trainer.logger.get_value("train_losses", step=None)
        line += f"; last train loss {float(losses[-1]):.4f}" if losses else ""
    print(line)
    print(f"results: {trainer.output_folder}")
