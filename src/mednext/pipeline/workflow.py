"""nnU-Net's steps after training, on MedNeXt results: choose the best configuration (or ensemble),
ensemble predictions, apply the chosen postprocessing.

Each step is the engine's own implementation (``find_best_configuration``, ``ensemble_folders``,
its connected-component postprocessing); what mednext adds is the choice of models by default
(every MedNeXt results folder of the dataset, nnU-Net's trainers allowed beside them), commands
that continue with ``mednext``, and a postprocessing step that reads the engine's
``postprocessing.json`` instead of unpickling its ``postprocessing.pkl``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mednext.errors import UserError
from mednext.files import atomic_write, atomic_write_json, atomic_write_text
from mednext.pipeline.datasets import resolve_dataset
from mednext.pipeline.integrity import check_complete
from mednext.pipeline.trainer import parse_trainer_name
from mednext.pipeline.workdir import results_folder

__all__ = ["apply_postprocessing", "ensemble", "find_best", "trained_models"]

_TRAINER = "MedNeXtTrainer"


def trained_models(
    dataset: str | int,
    trainers: Sequence[str] | None = None,
    plans: Sequence[str] | None = None,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int] = (0, 1, 2, 3, 4),
) -> list[dict[str, str]]:
    """The results folders of ``dataset`` that match the filters (None: every MedNeXt trainer, any
    plans, any configuration), as the engine's model dicts; a folder that lacks a fold's validation
    (``fold_<f>/validation/summary.json``) is an error that names it."""
    name = resolve_dataset(dataset)
    root = results_folder() / name
    found, incomplete = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        parts = folder.name.split("__")
        if len(parts) != 3:
            continue
        trainer, plan, configuration = parts
        if (trainers is None and not trainer.startswith(_TRAINER)) or (
            trainers is not None and trainer not in trainers
        ):
            continue
        if (plans is not None and plan not in plans) or (
            configurations is not None and configuration not in configurations
        ):
            continue
        missing = [f for f in folds if not (folder / f"fold_{f}" / "validation" / "summary.json").is_file()]
        if missing:
            incomplete.append(f"{folder.name} (folds {', '.join(map(str, missing))})")
            continue
        found.append({"plans": plan, "configuration": configuration, "trainer": trainer})
    if incomplete:
        raise UserError(
            f"{root}: these results lack the validation of some of folds {', '.join(map(str, folds))}: "
            + "; ".join(incomplete)
            + ". Train the missing folds with --npz (mednext train DATASET CONFIGURATION FOLD ... --npz), "
            "or narrow the choice with -c/-tr/-p/-f"
        )
    if not found:
        raise UserError(
            f"no trained results of {name} in {root} match (trainers {trainers or _TRAINER + '_*'}, plans "
            f"{plans or 'any'}, configurations {configurations or 'any'}); train them first"
        )
    return found


def find_best(
    dataset: str | int,
    models: Sequence[dict[str, str]],
    folds: Sequence[int] = (0, 1, 2, 3, 4),
    allow_ensembling: bool = True,
    num_processes: int = 1,
    log: Callable[[str], Any] = print,
) -> dict:
    """The engine's ``find_best_configuration`` over ``models``: cross-validation Dice of each model
    and of each pair's ensemble, the best of them and its postprocessing. Returns the engine's
    result and writes ``inference_information.json`` and ``inference_instructions.txt`` (with
    ``mednext`` commands) in the dataset's results folder."""
    from nnunetv2.evaluation.find_best_configuration import find_best_configuration

    if len(models) < 2:
        allow_ensembling = False
    engine_output = io.StringIO()
    with contextlib.redirect_stdout(engine_output):
        best = find_best_configuration(
            resolve_dataset(dataset), list(models), allow_ensembling=allow_ensembling,
            num_processes=max(1, num_processes), overwrite=True, folds=tuple(folds), strict=True,
        )  # fmt: skip
    for key, value in best["all_results"].items():
        log(f"{key}: Dice {value:.4f}")
    chosen = best["best_model_or_ensemble"]
    log(
        f"best: {' + '.join(m['configuration'] + ' ' + m['trainer'] for m in chosen['selected_model_or_models'])}: "
        f"Dice {chosen['result_on_crossval_pre_pp']:.4f}, after postprocessing {chosen['result_on_crossval_post_pp']:.4f}"
    )
    instructions = inference_commands(best)
    folder = results_folder() / resolve_dataset(dataset)
    atomic_write_text(folder / "inference_instructions.txt", instructions + "\n")
    log("\n" + instructions)
    return best


def inference_commands(best: dict) -> str:
    """Commands that predict with the chosen model or ensemble and apply its postprocessing."""
    chosen = best["best_model_or_ensemble"]
    members = chosen["selected_model_or_models"]
    folds = " ".join(map(str, best["folds"]))
    dataset = best["dataset_name_or_id"]
    outputs = ["OUTPUT_FOLDER"] if len(members) == 1 else [f"OUTPUT_FOLDER_MODEL_{i + 1}" for i in range(len(members))]
    lines = []
    for member, out in zip(members, outputs, strict=True):
        trainer, plans, configuration = member["trainer"], member["plans_identifier"], member["configuration"]
        npz = " --save-probabilities" if len(members) > 1 else ""
        parsed = parse_trainer_name(trainer)
        if parsed is not None:
            preset, kernel = parsed
            lines.append(
                f"mednext predict -i INPUT_FOLDER -o {out} --dataset {dataset} --config {configuration} --model "
                f"{preset.lower() if preset.startswith('V2') else preset} --kernel {kernel} --plans {plans} "
                f"--fold {folds}{npz}"
            )
        else:  # one of nnU-Net's own trainers
            lines.append(
                f"nnUNetv2_predict -i INPUT_FOLDER -o {out} -d {dataset} -c {configuration} -tr {trainer} -p {plans} "
                f"-f {folds}" + (" --save_probabilities" if npz else "")
            )
    final = "OUTPUT_FOLDER"
    if len(members) > 1:
        lines.append(f"mednext ensemble -i {' '.join(outputs)} -o {final}")
    postprocessing = Path(chosen["postprocessing_file"]).with_suffix(".json")
    lines.append(f"mednext postprocess -i {final} -o {final}_PP --pp {postprocessing}")
    return "\n".join(lines)


def ensemble(
    inputs: Sequence[str | os.PathLike], output: str | os.PathLike, save_probabilities: bool = False,
    num_processes: int = 1,
) -> list[Path]:  # fmt: skip
    """Average the probabilities of several prediction folders (each written with
    ``--save-probabilities``) with the engine's ``ensemble_folders``; returns the segmentations."""
    from nnunetv2.ensembling.ensemble import ensemble_folders

    folders = [Path(p) for p in inputs]
    if len(folders) < 2:
        raise UserError("give at least two prediction folders to ensemble (-i A B ...)")
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"prediction folder {folder} does not exist")
        if not list(folder.glob("*.npz")):
            raise UserError(
                f"{folder} holds no probabilities (<case>.npz); predict with --save-probabilities to ensemble"
            )
        if not (folder / "dataset.json").is_file() or not (folder / "plans.json").is_file():
            raise UserError(f"{folder} lacks dataset.json/plans.json, which mednext predict writes beside predictions")
    cases = [{p.name for p in folder.glob("*.npz")} for folder in folders]
    if any(c != cases[0] for c in cases):
        raise UserError(
            "the folders hold probabilities of different cases: "
            + "; ".join(f"{f}: {len(c)}" for f, c in zip(folders, cases, strict=True))
        )
    ending = json.loads((folders[0] / "dataset.json").read_text(encoding="utf-8"))["file_ending"]
    with contextlib.redirect_stdout(io.StringIO()):
        ensemble_folders([str(f) for f in folders], str(output), save_probabilities, max(1, num_processes))
    # the engine copies dataset.json; plans.json too, so that postprocessing finds its reader
    atomic_write_text(Path(output) / "plans.json", (folders[0] / "plans.json").read_text(encoding="utf-8"))
    return sorted(Path(output).glob(f"*{ending}"))


def _postprocessing_functions() -> dict[str, Callable]:
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    return {"remove_all_but_largest_component_from_segmentation": remove_all_but_largest_component_from_segmentation}


def apply_postprocessing(
    input_folder: str | os.PathLike,
    output_folder: str | os.PathLike,
    postprocessing: str | os.PathLike,
    plans: str | os.PathLike | None = None,
    dataset_json: str | os.PathLike | None = None,
) -> list[Path]:
    """Apply the postprocessing chosen by ``find_best`` (the engine's ``postprocessing.json``: which
    connected-component steps, with which labels) to every segmentation of ``input_folder``;
    writes them to ``output_folder`` with ``dataset.json`` and ``plans.json``, and returns them.

    Only the engine's own steps are applied, looked up by name; nothing is unpickled."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    source = Path(input_folder)
    spec = json.loads(Path(postprocessing).read_text(encoding="utf-8"))
    names, kwargs = spec.get("postprocessing_fns"), spec.get("postprocessing_kwargs")
    known = _postprocessing_functions()
    if not isinstance(names, list) or not isinstance(kwargs, list) or len(names) != len(kwargs):
        raise UserError(f"{postprocessing} is not the engine's postprocessing.json (postprocessing_fns/_kwargs)")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"{postprocessing} names postprocessing steps mednext does not know: {', '.join(unknown)}")
    plans_path = Path(plans) if plans else source / "plans.json"
    dataset_path = Path(dataset_json) if dataset_json else source / "dataset.json"
    for path, flag in ((plans_path, "--plans"), (dataset_path, "--dataset-json")):
        if not path.is_file():
            raise UserError(f"{path} not found; give it with {flag} (mednext predict writes it beside the predictions)")
    dataset = json.loads(dataset_path.read_text(encoding="utf-8"))
    writer = PlansManager(json.loads(plans_path.read_text(encoding="utf-8"))).image_reader_writer_class()
    out = Path(output_folder)
    written = []
    for file in sorted(source.glob(f"*{dataset['file_ending']}")):
        check_complete(file)
        with contextlib.redirect_stdout(io.StringIO()):
            seg, properties = writer.read_seg(str(file))
        result = seg[0]
        for name, arguments in zip(names, kwargs, strict=True):
            result = known[name](result, **arguments)
        target = out / file.name
        atomic_write(target, lambda tmp, s=result, p=properties: _write_seg(writer, s, tmp, p, dataset["file_ending"]))
        written.append(target)
    atomic_write_json(out / "dataset.json", dataset)
    atomic_write_text(out / "plans.json", plans_path.read_text(encoding="utf-8"))
    return written


def _write_seg(writer: Any, seg: np.ndarray, tmp: Path, properties: dict, ending: str) -> None:
    # the engine's writers choose the format from the file name's ending
    named = tmp.with_name(tmp.name + ending)
    try:
        writer.write_seg(seg, str(named), properties)
        os.replace(named, tmp)
    finally:
        named.unlink(missing_ok=True)
