"""``mednext train``: train MedNeXt on a planned dataset with the reference recipe.

Multi-GPU / multi-node: ``torchrun --nnodes N --nproc_per_node G -m mednext train ...`` (or the
``mednext`` script through ``torchrun $(which mednext) train ...``); on CPU the gloo backend is used.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train MedNeXt on a planned dataset (nnU-Net v2 trainer, reference recipe)",
        description="Train one fold of MedNeXt with the reference recipe on a dataset prepared by 'mednext plan'.",
    )
    p.add_argument("dataset", help="dataset name (Dataset901_Lesions) or id (901)")
    p.add_argument("--workdir", default=None, help="working folder (default ./mednext_work)")
    p.add_argument(
        "--config", default="3d_fullres", choices=("3d_fullres", "2d"), help="configuration (default 3d_fullres)"
    )
    p.add_argument("--fold", default="0", help="0-4 or all (default 0)")
    p.add_argument(
        "--model",
        default="S",
        type=str.upper,
        choices=("S", "B", "M", "L", "V2-BASE", "V2-WIDE"),
        help="preset: S, B, M, L or MedNeXt-v2's v2-base, v2-wide (default S)",
    )
    p.add_argument(
        "--kernel", default=3, type=int, choices=(3, 5), help="depthwise kernel size (default 3; v2 presets: 3)"
    )
    p.add_argument(
        "--recipe", choices=("auto", "paper"), default=None, help="which plans to use (default: auto if planned)"
    )
    p.add_argument(
        "--device", default=None, choices=("cpu", "cuda", "mps"), help="default: cuda if available, else mps, else cpu"
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 1000)")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="training iterations per epoch (default 250)")
    p.add_argument("--val-iters", type=int, default=None, help="validation iterations per epoch (default 50)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from checkpoint_latest.pth")
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
        "--pretrained", default=None, help="initialise from weights (our checkpoint, reference .model, MONAI)"
    )
    p.add_argument("--upkern-from", default=None, help="initialise a k5 model from a k3 checkpoint (UpKern)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from mednext.pipeline.ddp import shutdown_distributed
    from mednext.pipeline.runner import TrainSettings, train
    from mednext.pipeline.workdir import use_workdir

    use_workdir(args.workdir)
    settings = TrainSettings(
        args.dataset,
        configuration=args.config,
        fold=args.fold,
        preset=args.model,
        kernel=args.kernel,
        device=args.device,
        epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch,
        val_iters=args.val_iters,
        resume=args.resume,
        bf16=args.bf16,
        compile=args.compile,
        num_workers=args.num_workers,
        recipe=args.recipe,
        validate=not args.no_val,
        pretrained=args.pretrained,
        upkern_from=args.upkern_from,
        show_progress=not args.quiet,
    )
    start = time.perf_counter()
    try:
        trainer = train(settings)
    finally:
        shutdown_distributed()
    if trainer.local_rank == 0:
        losses = trainer.logger.get_value("train_losses", step=None)
        last = f"{float(losses[-1]):.4f}" if losses else "n/a"
        print(
            f"\ntrained {trainer.__class__.__name__} on {trainer.plans_manager.dataset_name} {trainer.configuration_name} "
            f"fold {trainer.fold} in {time.perf_counter() - start:.0f} s; last train loss {last}"
        )
        print(f"results: {trainer.output_folder}")
    return 0
