"""``mednext predict``: segment images with a trained MedNeXt (sliding window, Gaussian weighting, mirroring TTA)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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


def _checkpoint(text: str) -> str:
    # nnU-Net's -chk names the file: checkpoint_best.pth is --checkpoint best
    return text.removeprefix("checkpoint_").removesuffix(".pth")


def _whole_number(minimum: int, wording: str) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (``wording`` says so in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from err
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be {wording}")
        return value

    return parse


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
    p.add_argument("-d", "--dataset", required=True, help="dataset name (Dataset901_Name) or id (901)")
    p.add_argument(
        "-c", "--config", default=None, help="configuration, e.g. 3d_fullres or 2d (default: the one trained)"
    )
    p.add_argument(
        "-f", "--fold", nargs="+", type=_fold, default=None, help="fold(s) to ensemble (default: all present)"
    )
    p.add_argument(
        "-tr", "--trainer", default=None,
        help="trainer name as nnU-Net spells it, e.g. MedNeXtTrainer_Sk3 (sets --model and --kernel)",
    )  # fmt: skip
    p.add_argument(
        "--model",
        choices=("S", "B", "M", "L", "V2-BASE", "V2-WIDE"),
        type=str.upper,
        default=None,
        help="preset trained (S, B, M, L, v2-base, v2-wide)",
    )
    p.add_argument("--kernel", type=int, default=None, help="kernel size trained (3 or 5)")
    p.add_argument("-p", "--plans", default=None, help="plans identifier (MedNeXtPlans or MedNeXtPlans_paper)")
    p.add_argument(
        "--checkpoint", "-chk", type=_checkpoint, choices=("final", "best", "latest"), default="final",
        help="final, best or latest (nnU-Net's checkpoint_final.pth etc. too; default: final)",
    )  # fmt: skip
    p.add_argument(
        "--device", "-device", choices=("cpu", "cuda", "mps"), default=None, help="default: cuda, else mps, else cpu"
    )
    p.add_argument(
        "--no-tta", "--disable_tta", action="store_true", help="no mirroring test-time augmentation (faster)"
    )
    p.add_argument(
        "--step", "-step_size", type=_step, default=0.5, help="sliding-window step as a fraction of the patch (0.5)"
    )
    p.add_argument(
        "--save-probabilities", "--save_probabilities", action="store_true",
        help="also write <case>.npz class probabilities (for mednext ensemble)",
    )  # fmt: skip
    p.add_argument(
        "--tile-batch", type=int, default=2,
        help="sliding-window tiles per network forward, on the CPU and CUDA (default 2; 1 needs less memory)",
    )  # fmt: skip
    p.add_argument(
        "--continue-prediction", "--continue_prediction", action="store_true",
        help="skip the cases already segmented in the output folder by the same model and settings "
        "(a folder with another model's segmentations is refused)",
    )  # fmt: skip
    p.add_argument(
        "--num-parts", "-num_parts", type=_whole_number(1, "at least 1"), default=1, metavar="N",
        help="split the cases into N parts (every N-th case, sorted by name) to run on N machines or GPUs",
    )  # fmt: skip
    p.add_argument(
        "--part-id", "-part_id", type=_whole_number(0, "0 or more"), default=0, metavar="K",
        help="the part this command segments, 0 to N-1 (with --num-parts)",
    )  # fmt: skip
    p.add_argument(
        "--no-progress-bar", "--disable_progress_bar", action="store_true",
        help="no progress bars (a line per case is still printed); bars show only on a terminal",
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
    from mednext.errors import UserError
    from mednext.pipeline.runner import PredictSettings, predict

    if args.trainer is not None:
        from mednext.pipeline.trainer import parse_trainer_name

        parsed = parse_trainer_name(args.trainer)
        if parsed is None:
            raise UserError(
                f"-tr {args.trainer}: mednext predicts with MedNeXtTrainer_<S|B|M|L|V2Base|V2Wide>k<odd kernel> "
                "models (e.g. MedNeXtTrainer_Sk3); for nnU-Net's own trainers use nnUNetv2_predict"
            )
        for flag, given, implied in (("--model", args.model, parsed[0]), ("--kernel", args.kernel, parsed[1])):
            if given is not None and given != implied:
                raise UserError(f"-tr {args.trainer} means {flag} {implied}, but {flag} {given} was given; drop one")
        args.model, args.kernel = parsed
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
        continue_prediction=args.continue_prediction,
        num_parts=args.num_parts,
        part_id=args.part_id,
        progress_bar=False if args.no_progress_bar else None,
    )
    predict(settings)
    return 0
