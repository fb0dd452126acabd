"""``mednext predict``: segment images with a trained MedNeXt (sliding window, Gaussian weighting, mirroring TTA)."""

from __future__ import annotations

import argparse


def _fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"fold {text!r} is not a number (0-4) or 'all'") from err


def _step(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"step {text!r} is not a number") from err
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"step {value} must be in (0, 1]: the window shift as a fraction of the patch")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment images with a trained MedNeXt",
        description="Segment an image file, a folder of images (nnU-Net naming, <case>_0000<ending> per channel; "
        "single-channel files may omit the suffix) or a DICOM series folder with a trained MedNeXt. Outputs "
        "keep each input's size, spacing, origin and direction and use the dataset's file ending.",
    )
    p.add_argument("-i", "--input", required=True, help="image file, folder of images, or DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="output folder (or, for one case, an output file)")
    p.add_argument("--workdir", default=None, help="working folder of plan/train (default ./mednext_work)")
    p.add_argument("--dataset", required=True, help="dataset name (Dataset901_Name) or id (901)")
    p.add_argument("--config", default=None, help="configuration, e.g. 3d_fullres or 2d (default: the one trained)")
    p.add_argument("--fold", nargs="+", type=_fold, default=None, help="fold(s) to ensemble (default: all present)")
    p.add_argument(
        "--model",
        choices=("S", "B", "M", "L", "V2-BASE", "V2-WIDE"),
        type=str.upper,
        default=None,
        help="preset trained (S, B, M, L, v2-base, v2-wide)",
    )
    p.add_argument("--kernel", type=int, default=None, help="kernel size trained (3 or 5)")
    p.add_argument("--plans", default=None, help="plans identifier (MedNeXtPlans or MedNeXtPlans_paper)")
    p.add_argument("--checkpoint", choices=("final", "best", "latest"), default="final", help="default: final")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    p.add_argument("--step", type=_step, default=0.5, help="sliding-window step as a fraction of the patch (0.5)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>.npz class probabilities")
    p.add_argument(
        "--tile-batch", type=int, default=2,
        help="CPU: sliding-window tiles per network forward (default 2; 1 needs less memory)",
    )  # fmt: skip
    p.add_argument(
        "--crop-body", action="store_true",
        help="CT: predict only inside the box around the patient's body (for scans with a wider field of view "
        "than the training scans: arms, table, air); background outside it",
    )  # fmt: skip
    p.add_argument(
        "--allow-irregular-slices", action="store_true",
        help="DICOM: resample a series with missing, duplicate or unevenly spaced slices onto a regular grid "
        "(default: refuse it, naming the slice positions)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.pipeline.runner import PredictSettings, predict

    settings = PredictSettings(
        input_path=args.input,
        output=args.output,
        dataset=args.dataset,
        configuration=args.config,
        folds=args.fold,
        model=args.model,
        kernel=args.kernel,
        plans=args.plans,
        checkpoint=args.checkpoint,
        device=args.device,
        tta=not args.no_tta,
        step_size=args.step,
        save_probabilities=args.save_probabilities,
        workdir=args.workdir,
        tile_batch=args.tile_batch,
        crop_body=args.crop_body,
        allow_irregular_slices=args.allow_irregular_slices,
    )
    predict(settings)
    return 0
