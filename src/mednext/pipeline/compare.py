"""``mednext compare``: MedNeXt against nnU-Net on the same data, splits and budget, with paired statistics.

One comparison is a set of models (:class:`ModelSpec`: ``mednext:S:k3``, ``nnunet:3d_fullres``,
``nnunet-resenc:M`` ...), a set of folds of the dataset's ``splits_final.json`` and one budget per
model and fold (:class:`Budget`: epochs, or wall-clock hours). :func:`run_compare`

1. plans and preprocesses what each model needs: MedNeXt's plans through :func:`runner.plan
   <mednext.pipeline.runner.plan>`, nnU-Net's default and residual-encoder plans with the engine's own
   planners (``ExperimentPlanner``, ``nnUNetPlannerResEncM/L/XL``); all share one split file;
2. trains each model and fold through the ordinary training (:func:`runner.train
   <mednext.pipeline.runner.train>`): MedNeXt with its recipe, nnU-Net with the engine's
   (:class:`~mednext.pipeline.nnunet_trainer.nnUNetTrainer_budget`). A finished training is reused, an
   interrupted one resumed, as ``mednext train --c`` does. Each training runs in a child process, so
   its peak memory is its own;
3. lets the engine's validation predict each fold's validation cases (out-of-fold predictions), timed,
   and copies them to ``OUT/predictions/<model>/``; a record of each model and fold
   (``OUT/runs/<model>/fold_<f>.json``) keeps its costs;
4. writes the report (:func:`write_report`): ``compare.json``, ``compare.md`` and the plots, computed
   from the saved predictions and records alone, so :func:`write_report` recomputes them at any time
   (``mednext compare --report-only``).

What exists on disk is the state: a model and fold with a record and its predictions is done; the rest
is trained (or resumed) and validated when the command runs again.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mednext.errors import UserError
from mednext.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    folder_lock,
    remove_stale_temporaries,
    run_quietly,
)
from mednext.pipeline.compare_report import INFERENCE_CASES, METRICS, OVERALL, count, markdown, overall, save_plots
from mednext.pipeline.stats import ALPHA, CONFIDENCE, RESAMPLES, SEED, TIE_MARGIN, paired_comparison
from mednext.pipeline.trainer import PRESETS, trainer_class_name
from mednext.pipeline.workdir import DEFAULT_PROCESSES, engine_setting

__all__ = [
    "Budget",
    "CompareSettings",
    "ModelSpec",
    "parse_model_spec",
    "run_compare",
    "train_fold",
    "write_report",
]

FORMAT_VERSION = 1
CONFIGURATIONS = ("2d", "3d_fullres")
ENGINE_TRAINER = "nnUNetTrainer_budget"
NNUNET_PLANS = "nnUNetPlans"
# the engine's residual-encoder presets: planner class and plans identifier (nnunetv2's names)
RESENC_PRESETS = {
    "M": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    "L": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
    "XL": ("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans"),
}
SPEC_FORMS = (
    "mednext:<S|B|M|L|v2-base|v2-wide>:k<odd kernel>[:<2d|3d_fullres>] (e.g. mednext:S:k3), "
    "nnunet:<2d|3d_fullres> (the engine's default U-Net), nnunet-resenc:<M|L|XL>[:<2d|3d_fullres>] "
    "(the engine's residual-encoder presets)"
)
RECORD_KEYS = ("model", "fold", "budget")


# ----------------------------------------------------------------------------- what is compared


@dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison: its spec as written, a label for reports, and the training it is."""

    text: str  # canonical: every part written out (mednext:S:k3:3d_fullres)
    kind: str  # "mednext", "nnunet", "nnunet-resenc"
    label: str
    trainer: str  # the trainer class name (the results folder's first part)
    plans: str  # the plans identifier
    configuration: str
    preset: str | None = None  # MedNeXt preset, or the ResEnc preset
    kernel: int | None = None

    @property
    def slug(self) -> str:
        """A folder name for this model (``mednext_S_k3_3d_fullres``)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.text.replace(":", "_")).strip("_")

    def results_name(self) -> str:
        """The engine's results folder name (``<trainer>__<plans>__<configuration>``)."""
        return f"{self.trainer}__{self.plans}__{self.configuration}"


def parse_model_spec(text: str, default_configuration: str = "3d_fullres") -> ModelSpec:
    """The :class:`ModelSpec` of ``text`` (see :data:`SPEC_FORMS`); a bad spec is a ``UserError``
    naming it and the valid forms. ``default_configuration`` serves specs that name none."""
    parts = [p.strip() for p in str(text).split(":")]
    kind = parts[0].lower()

    def bad(why: str) -> UserError:
        return UserError(f"--models {text!r}: {why}; use {SPEC_FORMS}")

    def configuration_of(rest: list[str]) -> str:
        if len(rest) > 1:
            raise bad("too many ':' parts")
        configuration = rest[0] if rest else default_configuration
        if configuration not in CONFIGURATIONS:
            raise bad(f"configuration {configuration!r} is not one of {', '.join(CONFIGURATIONS)}")
        return configuration

    if kind == "mednext":
        if len(parts) < 3:
            raise bad("a MedNeXt model needs a preset and a kernel")
        preset = parts[1].upper()
        if preset not in PRESETS:
            raise bad(f"preset {parts[1]!r} is not one of S, B, M, L, v2-base, v2-wide")
        match = re.fullmatch(r"[kK](\d+)", parts[2])
        if match is None or int(match.group(1)) % 2 == 0:
            raise bad(f"kernel {parts[2]!r} is not k followed by an odd number (k3, k5, ...)")
        kernel = int(match.group(1))
        if preset.startswith("V2") and kernel != 3:
            raise bad("MedNeXt-v2 presets have kernel 3 only")
        configuration = configuration_of(parts[3:])
        name = preset.lower() if preset.startswith("V2") else preset
        return ModelSpec(
            f"mednext:{name}:k{kernel}:{configuration}", "mednext", f"MedNeXt-{name} k{kernel} {configuration}",
            trainer_class_name(preset, kernel), "MedNeXtPlans", configuration, preset, kernel,
        )  # fmt: skip
    if kind == "nnunet":
        if len(parts) != 2:
            raise bad("nnU-Net's default U-Net is named by its configuration only")
        configuration = configuration_of(parts[1:])
        return ModelSpec(
            f"nnunet:{configuration}", "nnunet", f"nnU-Net {configuration}", ENGINE_TRAINER, NNUNET_PLANS, configuration
        )
    if kind == "nnunet-resenc":
        if len(parts) < 2 or parts[1].upper() not in RESENC_PRESETS:
            raise bad(f"the residual-encoder preset must be one of {', '.join(RESENC_PRESETS)}")
        preset = parts[1].upper()
        configuration = configuration_of(parts[2:])
        return ModelSpec(
            f"nnunet-resenc:{preset}:{configuration}", "nnunet-resenc", f"nnU-Net ResEnc {preset} {configuration}",
            ENGINE_TRAINER, RESENC_PRESETS[preset][1], configuration, preset,
        )  # fmt: skip
    raise bad(f"unknown kind {parts[0]!r}")


@dataclass(frozen=True)
class Budget:
    """The same training budget for every model and fold: ``epochs``, or ``hours`` of wall-clock
    training (the fair comparison when one model is slower). ``iters_per_epoch`` and ``val_iters``
    (None: each recipe's own, 250 and 50) and ``max_epochs`` (a cap under an hours budget) apply to
    every model alike."""

    epochs: int | None = None
    hours: float | None = None
    iters_per_epoch: int | None = None
    val_iters: int | None = None
    max_epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.hours is None):
            raise UserError("give the budget as --epochs N or as --hours H (per model and fold), one of them")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise UserError(f"--epochs {self.epochs!r}: give a positive whole number of epochs")
        if self.hours is not None and not (isinstance(self.hours, (int, float)) and 0 < self.hours < math.inf):
            raise UserError(f"--hours {self.hours!r}: give a positive number of hours per model and fold")
        for name in ("iters_per_epoch", "max_epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"--{name.replace('_', '-')} {value!r}: give a positive whole number")
        if self.val_iters is not None and (not isinstance(self.val_iters, int) or self.val_iters < 0):
            raise UserError(f"--val-iters {self.val_iters!r}: give a whole number >= 0")

    def describe(self) -> str:
        what = count(self.epochs, "epoch") if self.epochs is not None else f"{self.hours:g} h of training"
        if self.iters_per_epoch is not None:
            what += f" of {self.iters_per_epoch} iterations"
        if self.max_epochs is not None:
            what += f" (at most {self.max_epochs} epochs)"
        return what + " per model and fold"


@dataclass
class CompareSettings:
    """What ``mednext compare`` can be told.

    Attributes:
        dataset: a raw dataset folder, or the name or id of one registered in the working folder.
        out: the comparison's folder (records, predictions, report).
        models: model specs (:func:`parse_model_spec`); at least two.
        folds: folds of ``splits_final.json`` (0-4).
        budget: the training budget per model and fold.
        configuration: the configuration of specs that name none (None: 3d_fullres, or 2d for 2D data).
        baseline: the spec every other model is compared with (None: the first ``nnunet`` model, else
            the last one listed).
        workdir: the working folder (None: ``./mednext_work``; nnU-Net's variables win when set).
        device: ``cpu``, ``cuda``, ``mps`` or None (CUDA, else MPS, else CPU).
        num_workers: data-augmentation processes (None: 0 on CPU, the engine's elsewhere).
        num_processes: processes for planning, preprocessing and the validation's export.
        tolerance_mm: the NSD tolerance.
        show_progress: progress bars and per-epoch lines.
    """

    dataset: str | int
    out: str | os.PathLike
    models: Sequence[str]
    folds: Sequence[int] = (0, 1, 2, 3, 4)
    budget: Budget = field(default_factory=lambda: Budget(epochs=1000))
    configuration: str | None = None
    baseline: str | None = None
    workdir: str | os.PathLike | None = None
    device: str | None = None
    num_workers: int | None = None
    num_processes: int = 1
    tolerance_mm: float = 2.0
    show_progress: bool = True


# ----------------------------------------------------------------------------- planning


def _register(dataset: str | int) -> str:
    """The registered name of ``dataset`` (a raw folder is checked and registered first)."""
    from mednext.pipeline.datasets import register_dataset, resolve_dataset, validate_raw_dataset

    spec = str(dataset)
    if (os.path.isdir(spec) and (Path(spec) / "dataset.json").exists()) or os.sep in spec:
        validate_raw_dataset(spec)
        return register_dataset(spec)
    return resolve_dataset(spec)


def _prepared(name: str, plans_id: str, configuration: str) -> bool:
    """Whether ``plans_id`` exists with ``configuration`` preprocessed and recorded as complete."""
    from mednext.pipeline.preprocessed import MANIFEST
    from mednext.pipeline.workdir import preprocessed_folder

    base = preprocessed_folder() / name
    plans_path, manifest = base / f"{plans_id}.json", base / MANIFEST
    if not plans_path.is_file() or not manifest.is_file():
        return False
    plans = json.loads(plans_path.read_text(encoding="utf-8"))
    config = plans.get("configurations", {}).get(configuration)
    if config is None or "data_identifier" not in config:
        return False
    return config["data_identifier"] in json.loads(manifest.read_text(encoding="utf-8")).get("data", {})


def _engine_planner(spec: ModelSpec) -> Any:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners

    if spec.kind == "nnunet":
        return ExperimentPlanner
    return getattr(residual_encoder_unet_planners, RESENC_PRESETS[str(spec.preset)][0])


def prepare_model(
    spec: ModelSpec, dataset_name: str, num_processes: int = 1, log: Callable[[str], Any] = print
) -> None:
    """Plan and preprocess what ``spec`` trains on, unless that is done: MedNeXt's plans with
    ``mednext plan``'s code, nnU-Net's with the engine's own planner; the preprocessing is recorded
    as complete (:mod:`mednext.pipeline.preprocessed`) either way."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    from mednext.pipeline.datasets import dataset_id_of
    from mednext.pipeline.preprocessed import preprocess
    from mednext.pipeline.runner import PlanSettings, plan
    from mednext.pipeline.workdir import preprocessed_folder

    if _prepared(dataset_name, spec.plans, spec.configuration):
        return
    log(f"planning and preprocessing {spec.label} ({spec.plans}, {spec.configuration})")
    if spec.kind == "mednext":
        plans = plan(PlanSettings(dataset_name, configs=[spec.configuration], num_processes=num_processes))
        if spec.configuration in plans["mednext_skipped"]:
            raise UserError(f"{spec.text}: {spec.configuration} cannot be planned for {dataset_name}; use :2d")
        return
    base = preprocessed_folder() / dataset_name
    dataset_id = dataset_id_of(dataset_name)
    with folder_lock(base, "mednext compare (planning)"):
        if not (base / "dataset_fingerprint.json").is_file():
            run_quietly(DatasetFingerprintExtractor(dataset_id, num_processes, verbose=False).run)
        planner = _engine_planner(spec)(dataset_id)
        plans = run_quietly(planner.plan_experiment)
        if spec.configuration not in plans["configurations"]:
            raise UserError(
                f"{spec.text}: the engine planned no {spec.configuration} for {dataset_name} (it planned "
                f"{', '.join(plans['configurations'])}); choose another configuration, e.g. {spec.kind}:2d"
            )
        run_quietly(preprocess, dataset_name, spec.plans, [spec.configuration], num_processes, verbose=False)


def ensure_splits(dataset_name: str, configuration: str, plans_id: str) -> list[dict[str, list[str]]]:
    """The dataset's ``splits_final.json`` (written as the engine writes it, seeded five folds of the
    preprocessed cases, when there is none yet), so that every model trains on the same folds."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from mednext.pipeline.preprocessed import check_preprocessed, check_splits
    from mednext.pipeline.workdir import preprocessed_folder

    base = preprocessed_folder() / dataset_name
    path = base / "splits_final.json"
    plans = json.loads((base / f"{plans_id}.json").read_text(encoding="utf-8"))
    cases = check_preprocessed(dataset_name, configuration, plans["configurations"][configuration]["data_identifier"])
    if not path.is_file():
        if len(cases) < 5:
            raise UserError(
                f"{dataset_name} has {len(cases)} cases; five-fold cross-validation needs at least 5 (or write "
                f"your own {path})"
            )
        atomic_write_json(path, generate_crossval_split(sorted(cases), seed=12345, n_splits=5), indent=1)
    check_splits(dataset_name, cases)
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- one model, one fold


@dataclass(frozen=True)
class FoldJob:
    """One training (and validation) of one model on one fold, as the child process runs it."""

    spec: ModelSpec
    dataset: str
    fold: int | str
    budget: Budget
    workdir: str
    device: str | None = None
    num_workers: int | None = None
    num_processes: int = 1
    validate: bool = True
    show_progress: bool = True
    label: str = ""  # for progress lines ("[2/6] ...")


def _trainer_class(spec: ModelSpec) -> type:
    if spec.kind == "mednext":
        from mednext.pipeline.trainer import get_trainer_class

        return get_trainer_class(str(spec.preset), int(spec.kernel or 3))
    from mednext.pipeline.nnunet_trainer import nnUNetTrainer_budget

    return nnUNetTrainer_budget


def fold_folder(spec: ModelSpec, dataset_name: str, fold: int | str) -> Path:
    """The engine's results folder of ``spec``'s training on ``fold``."""
    from mednext.pipeline.workdir import results_folder

    return results_folder() / dataset_name / spec.results_name() / f"fold_{fold}"


BUDGET_FILE = "mednext_budget.json"  # the budget a training in a results folder was started under
PEAK_FILE = "mednext_training_peak.json"  # its peak memory, measured when it finished
RECIPE_ITERATIONS = 250  # training iterations per epoch of both recipes when the budget names none


def _check_budget(folder: Path, budget: Budget, spec: ModelSpec) -> None:
    """Refuse to reuse or resume a training made under another budget (the comparison would not be fair)."""
    from mednext.nn import safe_torch_load

    wanted = asdict(budget)
    path = folder / BUDGET_FILE
    fix = f"delete {folder} to train it again under this budget, or compare with the budget it was trained with"
    if path.is_file():
        had = json.loads(path.read_text(encoding="utf-8"))
        if had != wanted:
            raise UserError(f"{spec.text}: {folder} was trained under another budget ({had}, not {wanted}); {fix}")
        return
    checkpoints = [folder / n for n in ("checkpoint_final.pth", "checkpoint_latest.pth") if (folder / n).is_file()]
    if not checkpoints:
        return
    # trained outside a comparison (mednext train): reusable when its run length is this budget's
    saved = safe_torch_load(checkpoints[0]).get("mednext", {})
    same = (
        budget.epochs is not None
        and saved.get("num_epochs") == budget.epochs
        and saved.get("iterations_per_epoch") == (budget.iters_per_epoch or RECIPE_ITERATIONS)
    )
    if not same:
        raise UserError(
            f"{spec.text}: {folder} holds a training of {saved.get('num_epochs')} epochs of "
            f"{saved.get('iterations_per_epoch')} iterations, not this comparison's budget ({budget.describe()}); {fix}"
        )


def _epoch_line(job: FoldJob) -> Callable[[Any, Any], None]:
    start = time.perf_counter()

    def line(trainer: Any, timing: Any) -> None:
        done, total = int(trainer.current_epoch), int(trainer.num_epochs)
        left = (total - done) * timing.seconds
        if trainer.budget_s is not None:
            left = max(0.0, trainer.budget_s - trainer.budget_spent_before - timing.elapsed)
        print(
            f"{job.label}{job.spec.text} fold {job.fold}: epoch {done}/{total}, {timing.seconds:.1f} s/epoch, "
            f"training time left {_hms(left)} (this run {_hms(time.perf_counter() - start)})",
            flush=True,
        )

    return line


def _hms(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def run_fold(job: FoldJob) -> dict[str, Any]:
    """Train (or resume, or reuse) ``job``'s model on its fold and, with ``job.validate``, let the
    engine's validation predict the fold's validation cases; return the record of costs. Runs in the
    calling process (:func:`train_fold` runs it in a child)."""
    from dataclasses import replace

    import torch

    from mednext.files import resolve_device
    from mednext.pipeline.runner import TrainSettings, train
    from mednext.pipeline.workdir import use_workdir

    use_workdir(job.workdir)
    spec, budget = job.spec, job.budget
    folder = fold_folder(spec, job.dataset, job.fold)
    _check_budget(folder, budget, spec)
    device = resolve_device(job.device)
    listener = _epoch_line(job) if job.show_progress else None
    budget_s = budget.hours * 3600.0 if budget.hours is not None else None

    def prepare(trainer: Any) -> None:
        trainer.budget_s = budget_s
        trainer.max_epochs = budget.max_epochs
        trainer.epoch_listener = listener

    settings = TrainSettings(
        job.dataset, configuration=spec.configuration, fold=job.fold, device=device,
        epochs=budget.epochs if budget.epochs is not None else (budget.max_epochs or 1000),
        iters_per_epoch=budget.iters_per_epoch, val_iters=budget.val_iters, num_workers=job.num_workers,
        trainer_class=_trainer_class(spec), plans=spec.plans, validate=False, show_progress=job.show_progress,
        prepare_trainer=prepare,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trained_here = not (folder / "checkpoint_final.pth").is_file()
    trainer = None
    iterations = 0
    if trained_here:
        resume = (folder / "checkpoint_latest.pth").is_file()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / BUDGET_FILE, asdict(budget))
        trainer = train(replace(settings, resume=resume))
        iterations = int(trainer.iterations_done)
        # kept beside the training, so that a comparison interrupted during validation still knows it
        atomic_write_json(
            folder / PEAK_FILE,
            {"peak_memory_mb": peak_memory_mb(device), "peak_memory_kind": memory_kind(device),
             "device": str(device), "resumed": resume},
        )  # fmt: skip
    peak = json.loads((folder / PEAK_FILE).read_text(encoding="utf-8")) if (folder / PEAK_FILE).is_file() else {}
    record: dict[str, Any] = {
        "model": spec.text,
        "fold": job.fold,
        "budget": asdict(budget),
        "results_folder": str(folder),
        "device": str(device),
        "trained_in_this_comparison": trained_here,
        "peak_memory_mb": peak.get("peak_memory_mb"),
        "peak_memory_kind": peak.get("peak_memory_kind", memory_kind(device)),
        "training_device": peak.get("device"),
    }
    if job.validate:
        start = time.perf_counter()
        trainer = train(replace(settings, validation_only=True))
        seconds = time.perf_counter() - start
        cases = sorted(p.name for p in (folder / "validation").iterdir() if _is_prediction(p, trainer.dataset_json))
        record["validation_cases"] = len(cases)
        record["validation_s_per_case"] = seconds / max(1, len(cases))
        timed = inference_seconds(trainer)
        record["inference_s_per_case"] = float(np.mean(timed)) if timed else None
        record["inference_cases_timed"] = len(timed)
    if trainer is not None:
        record.update(training_costs(trainer), iterations_this_run=iterations)
    return record


def training_costs(trainer: Any) -> dict[str, Any]:
    """Parameters, epochs and epoch times (the engine's log of every epoch, resumed ones included) and
    the iterations this process trained, of a trained or loaded trainer."""
    network = trainer.unwrapped_network()
    log = trainer.logger.get_checkpoint()
    starts, ends = log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])
    epoch_s = [float(e - s) for s, e in zip(starts, ends, strict=False)]
    return {
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "epochs": len(epoch_s),
        "epoch_s": float(np.mean(epoch_s)) if epoch_s else None,
        "train_s": float(np.sum(epoch_s)),
        "iterations_this_run": int(getattr(trainer, "iterations_done", 0)),
    }


def load_trained(spec: ModelSpec, dataset_name: str, fold: int | str, device: Any) -> Any:
    """``spec``'s trainer of ``fold``, initialised with its final weights (read with ``weights_only=True``),
    ready to predict."""
    folder = fold_folder(spec, dataset_name, fold)
    checkpoint = folder / "checkpoint_final.pth"
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint} not found: {spec.text} fold {fold} has not finished training")
    plans = json.loads((folder.parent / "plans.json").read_text(encoding="utf-8"))
    plans["continue_training"] = False  # the engine's trainer reads (and pops) this key
    dataset_json = json.loads((folder.parent / "dataset.json").read_text(encoding="utf-8"))
    trainer = run_quietly(
        _trainer_class(spec), plans=plans, configuration=spec.configuration, fold=fold, dataset_json=dataset_json,
        device=device,
    )  # fmt: skip
    run_quietly(trainer.load_checkpoint, str(checkpoint))
    return trainer


def predict_image(trainer: Any, image: Path, output: Path, tta: bool, crop_body: bool = False) -> Path:
    """Segment the image file ``image`` with the network of ``trainer`` (the engine's predictor, as its
    validation predicts; ``crop_body``: inside the box around a CT's body) into ``output``."""
    import tempfile

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from mednext.pipeline.io import InputCase
    from mednext.pipeline.predictor import predict_case

    trainer.set_deep_supervision_enabled(False)
    network = trainer.network
    network.eval()
    predictor = run_quietly(
        nnUNetPredictor, tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
        perform_everything_on_device=trainer.device.type == "cuda", device=trainer.device, verbose=False,
        allow_tqdm=False,
    )  # fmt: skip
    predictor.manual_initialization(
        network, trainer.plans_manager, trainer.configuration_manager,
        [{k: v.detach().clone() for k, v in network.state_dict().items()}], trainer.dataset_json,
        type(trainer).__name__, trainer.inference_allowed_mirroring_axes,
    )  # fmt: skip
    ending = trainer.dataset_json["file_ending"]
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".compare-predict-") as tmp:
        case = InputCase(output.name[: -len(ending)], [image])
        files = predict_case(predictor, case, Path(tmp) / "pred", crop_body=crop_body)
        os.replace(files[0], output)
    return output


def write_case_comparison(
    out: Path,
    dataset_name: str,
    case: str,
    predictions: dict[ModelSpec, Path],
    records: dict[ModelSpec, dict[str, Any]],
    baseline: ModelSpec,
    reference_folder: Path,
    budget: Budget,
    fold: int | str = "all",
    tolerance_mm: float = 2.0,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """A comparison of models on one case held out of their training (``mednext demo --compare``):
    each model's prediction of ``case`` (``predictions``) and its record of costs (``records``) are
    stored in ``out`` as :func:`run_compare` stores its own, then :func:`write_report` writes the same
    report from them, scored against ``reference_folder/<case><ending>``."""
    from mednext.pipeline.workdir import preprocessed_folder

    dataset_json = preprocessed_folder() / dataset_name / "dataset.json"
    ending = json.loads(dataset_json.read_text(encoding="utf-8"))["file_ending"]
    specs = list(predictions)
    out.mkdir(parents=True, exist_ok=True)
    for spec, path in predictions.items():
        target = _predictions_folder(out, spec) / f"{case}{ending}"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp, p=path: shutil.copyfile(p, tmp))
        record_path = out / "runs" / spec.slug / f"fold_{fold}.json"
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_path, {"model": spec.text, "fold": fold, **records[spec]}, indent=1)
    setup = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset_name,
        "models": [s.text for s in specs],
        "baseline": baseline.text,
        "folds": [fold],
        "budget": asdict(budget),
        "tolerance_mm": tolerance_mm,
        "cases": [case],
        "reference_folder": str(Path(reference_folder)),
    }
    atomic_write_json(out / "compare_settings.json", setup, indent=1)
    return write_report(out, log=log)


def inference_seconds(trainer: Any, max_cases: int = INFERENCE_CASES) -> list[float]:
    """Seconds of the engine's sliding-window prediction (Gaussian weighting, mirroring, as the
    engine's validation predicts) of each of the first ``max_cases`` validation cases of the
    trainer's fold, from the preprocessed case to the logits (no resampling or export)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    cuda = trainer.device.type == "cuda"
    predictor = run_quietly(
        nnUNetPredictor, tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
        perform_everything_on_device=cuda, device=trainer.device, verbose=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.manual_initialization(
        trainer.network, trainer.plans_manager, trainer.configuration_manager, None, trainer.dataset_json,
        type(trainer).__name__, trainer.inference_allowed_mirroring_axes,
    )  # fmt: skip
    _, val_keys = run_quietly(trainer.do_split)
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(val_keys)[:max_cases])
    seconds = []
    for key in dataset.identifiers:
        data = torch.from_numpy(np.asarray(dataset.load_case(key)[0][:]))
        if cuda:
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        with torch.no_grad():
            predictor.predict_sliding_window_return_logits(data)
        if cuda:
            torch.cuda.synchronize(trainer.device)
        seconds.append(time.perf_counter() - start)
    trainer.set_deep_supervision_enabled(True)
    return seconds


def memory_kind(device: Any) -> str:
    """What :func:`peak_memory_mb` measures on ``device``, in words."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during training"
    return "peak resident memory of the training process"


def peak_memory_mb(device: Any) -> float:
    """The peak memory of this process so far, in MiB: ``torch.cuda.max_memory_allocated`` on CUDA,
    else the peak resident memory since the process started its program: ``VmHWM`` on Linux (its
    ``ru_maxrss`` carries the parent's peak over through fork and exec), ``ru_maxrss`` elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, kB elsewhere


def _is_prediction(path: Path, dataset_json: dict) -> bool:
    return path.is_file() and path.name.endswith(dataset_json["file_ending"]) and not path.name.startswith(".")


def _child(job: FoldJob, result: str) -> None:
    _end_with_parent()
    atomic_write_json(result, run_fold(job), indent=1)


def _end_with_parent() -> None:
    """On Linux, have the kernel stop this process when the comparison that started it dies, so that a
    killed comparison leaves no training behind that holds its folders (every write is atomic)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request was made
        os._exit(1)


def train_fold(job: FoldJob, result_path: str | os.PathLike) -> dict[str, Any]:
    """:func:`run_fold` in a child process (its peak memory is the training's own); the record is
    also written to ``result_path``. A failed child is a ``UserError`` naming the model, the fold and
    the training's folder; running again resumes it."""
    result_path = Path(result_path)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_name(f".{result_path.name}.child")
    tmp.unlink(missing_ok=True)
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_child, args=(job, str(tmp)), name=f"mednext-compare-{job.spec.slug}-{job.fold}")
    # the engine reads its process count (validation export, scoring) once, when the child imports it
    with engine_setting(DEFAULT_PROCESSES, job.num_processes):
        process.start()
    try:
        process.join()
    except BaseException:
        process.terminate()
        process.join()
        raise
    if process.exitcode != 0 or not tmp.is_file():
        raise UserError(
            f"{job.spec.text} fold {job.fold}: the training process failed (exit code {process.exitcode}); its log "
            f"is in {fold_folder(job.spec, job.dataset, job.fold)}. Run the command again to resume it"
        )
    record = json.loads(tmp.read_text(encoding="utf-8"))
    os.replace(tmp, result_path)
    return record


# ----------------------------------------------------------------------------- the comparison


def _record_path(out: Path, spec: ModelSpec, fold: int | str) -> Path:
    return out / "runs" / spec.slug / f"fold_{fold}.json"


def _predictions_folder(out: Path, spec: ModelSpec) -> Path:
    return out / "predictions" / spec.slug


def _default_configuration(dataset_name: str) -> str:
    from mednext.pipeline.workdir import raw_folder

    raw = raw_folder() / dataset_name / "dataset.json"
    if raw.is_file():
        ending = json.loads(raw.read_text(encoding="utf-8")).get("file_ending", "")
        if ending.lower() in (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"):
            return "2d"
    return "3d_fullres"


def resolve_models(texts: Sequence[str], configuration: str, baseline: str | None) -> tuple[list[ModelSpec], ModelSpec]:
    """The specs of ``texts`` (each once) and the baseline among them."""
    specs = [parse_model_spec(t, configuration) for t in texts]
    keys = [s.text for s in specs]
    if len(specs) < 2:
        raise UserError("--models: give at least two models to compare (e.g. mednext:S:k3 nnunet:3d_fullres)")
    if len(set(keys)) != len(keys):
        raise UserError(f"--models lists a model twice: {' '.join(texts)}")
    if baseline is not None:
        wanted = parse_model_spec(baseline, configuration)
        chosen = [s for s in specs if s.text == wanted.text]
        if not chosen:
            raise UserError(f"--baseline {baseline}: not one of --models ({' '.join(s.text for s in specs)})")
        return specs, chosen[0]
    engine = [s for s in specs if s.kind == "nnunet"]
    return specs, engine[0] if engine else specs[-1]


def run_compare(settings: CompareSettings, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Plan, train, validate and report every model of ``settings`` on every fold; what exists is
    reused. Returns what ``compare.json`` holds."""
    from mednext.pipeline.workdir import use_workdir

    folds = [_fold(f) for f in settings.folds]
    if not folds or len(set(folds)) != len(folds):
        raise UserError(f"--folds {' '.join(map(str, settings.folds))}: give each fold (0-4) once")
    budget = settings.budget
    resolve_models(settings.models, settings.configuration or "3d_fullres", settings.baseline)  # spelling first
    dirs = use_workdir(settings.workdir)
    if dirs.describe():
        log(dirs.describe())
    name = _register(settings.dataset)
    configuration = settings.configuration or _default_configuration(name)
    specs, baseline = resolve_models(settings.models, configuration, settings.baseline)
    out = Path(settings.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "mednext compare"):
        remove_stale_temporaries(out)
        setup = {
            "format_version": FORMAT_VERSION,
            "dataset": name,
            "models": [s.text for s in specs],
            "baseline": baseline.text,
            "folds": folds,
            "budget": asdict(budget),
            "tolerance_mm": settings.tolerance_mm,
        }
        _check_setup(out, setup)
        for spec in specs:
            prepare_model(spec, name, settings.num_processes, log)
        splits = ensure_splits(name, specs[0].configuration, specs[0].plans)
        for f in folds:
            if f >= len(splits):
                raise UserError(f"--folds {f}: {name}'s splits_final.json has {len(splits)} folds")
        atomic_write_json(out / "compare_settings.json", setup, indent=1)
        jobs = [(s, f) for f in folds for s in specs]
        todo = [(s, f) for s, f in jobs if not _done(out, s, f)]
        log(
            f"mednext compare: {len(specs)} models x {len(folds)} folds of {name}, {budget.describe()}; "
            f"{len(jobs) - len(todo)} of {len(jobs)} done already"
        )
        durations: list[float] = []
        for i, (spec, fold) in enumerate(todo):
            left = _time_left(budget, len(todo) - i, durations)
            label = f"[{i + 1}/{len(todo)}] "
            log(f"{label}{spec.label} ({spec.text}, {spec.configuration}) fold {fold}: training; {left}")
            start = time.perf_counter()
            job = FoldJob(
                spec, name, fold, budget, str(dirs.raw.parent), settings.device, settings.num_workers,
                settings.num_processes, True, settings.show_progress, label,
            )  # fmt: skip
            record = train_fold(job, out / "runs" / spec.slug / f".fold_{fold}.pending.json")
            _save_predictions(out, spec, name, fold)
            atomic_write_json(_record_path(out, spec, fold), record, indent=1)
            (out / "runs" / spec.slug / f".fold_{fold}.pending.json").unlink(missing_ok=True)
            durations.append(time.perf_counter() - start)
            log(f"{label}{spec.text} fold {fold}: done in {_hms(durations[-1])}")
        return write_report(out, log=log)


def _fold(value: int | str) -> int:
    text = str(value)
    if not text.isdigit() or int(text) > 4:
        raise UserError(f"--folds {value!r}: use folds 0-4 (out-of-fold predictions need numbered folds)")
    return int(text)


def _check_setup(out: Path, setup: dict[str, Any]) -> None:
    """Refuse an output folder that holds a comparison of another dataset, budget or tolerance."""
    path = out / "compare_settings.json"
    if not path.is_file():
        return
    had = json.loads(path.read_text(encoding="utf-8"))
    for key in ("dataset", "budget", "tolerance_mm"):
        if had.get(key) != setup[key]:
            raise UserError(
                f"{out} holds a comparison with {key} {had.get(key)!r}, not {setup[key]!r}; choose another --out, "
                "or delete the folder to start over"
            )


def _done(out: Path, spec: ModelSpec, fold: int | str) -> bool:
    return _record_path(out, spec, fold).is_file()


def _time_left(budget: Budget, jobs_left: int, durations: list[float]) -> str:
    if budget.hours is not None:
        return f"about {_hms(jobs_left * budget.hours * 3600)} of training left in the comparison"
    if durations:
        return f"about {_hms(jobs_left * float(np.mean(durations)))} left in the comparison"
    return f"{jobs_left} trainings left in the comparison"


def _save_predictions(out: Path, spec: ModelSpec, dataset_name: str, fold: int) -> None:
    """Copy the fold's out-of-fold predictions into ``OUT/predictions/<model>/`` (atomically)."""
    from mednext.pipeline.workdir import preprocessed_folder

    ending = json.loads((preprocessed_folder() / dataset_name / "dataset.json").read_text(encoding="utf-8"))[
        "file_ending"
    ]
    source = fold_folder(spec, dataset_name, fold) / "validation"
    target = _predictions_folder(out, spec)
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.is_file() and p.name.endswith(ending))
    if not files:
        raise UserError(f"{spec.text} fold {fold}: {source} holds no predictions; run the command again")
    for path in files:
        atomic_write(target / path.name, lambda tmp, p=path: shutil.copyfile(p, tmp))


# ----------------------------------------------------------------------------- the report


def _scores(
    out: Path, spec: ModelSpec, dataset_name: str, cases: Sequence[str], tolerance_mm: float, references: Path
) -> dict:
    """Case -> class -> {"dice", "nsd"} of ``spec``'s saved predictions of ``cases`` against the label
    maps of the same names in ``references``."""
    from mednext.pipeline.evaluate import LabelSet, evaluate_case
    from mednext.pipeline.workdir import preprocessed_folder

    base = preprocessed_folder() / dataset_name
    dataset_json = base / "dataset.json"
    ending = json.loads(dataset_json.read_text(encoding="utf-8"))["file_ending"]
    labels = LabelSet.from_dataset_json(dataset_json)
    folder = _predictions_folder(out, spec)
    scores = {}
    for case in cases:
        prediction = folder / f"{case}{ending}"
        if not prediction.is_file():
            raise UserError(f"{prediction} is missing; run 'mednext compare' again to predict it")
        result = evaluate_case(prediction, references / f"{case}{ending}", labels, tolerance_mm)
        scores[case] = {
            c: {m: (None if math.isnan(v[m]) else float(v[m])) for m in METRICS} for c, v in result.metrics.items()
        }
    return scores


def _summary(values: Sequence[float | None]) -> dict[str, float | int | None]:
    kept = np.array([v for v in values if v is not None], dtype=float)
    if kept.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(kept.mean()), "sd": float(kept.std(ddof=1)) if kept.size > 1 else None, "n": int(kept.size)}


def _costs(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def values(key: str) -> list[float]:
        return [float(r[key]) for r in records if r.get(key) is not None]

    epoch_s, train_s, peak = values("epoch_s"), values("train_s"), values("peak_memory_mb")
    inference = values("inference_s_per_case")
    validation = values("validation_s_per_case")
    params = [int(r["parameters"]) for r in records if r.get("parameters") is not None]
    return {
        "parameters": params[0] if params else None,
        "epochs_per_fold": [r.get("epochs") for r in records],
        "time_per_epoch_s": float(np.mean(epoch_s)) if epoch_s else None,
        "train_s_per_fold": float(np.mean(train_s)) if train_s else None,
        "train_s_total": float(np.sum(train_s)) if train_s else None,
        "peak_memory_mb": float(np.max(peak)) if peak else None,
        "peak_memory_kind": records[0].get("peak_memory_kind") if records else None,
        "inference_s_per_case": float(np.mean(inference)) if inference else None,
        "validation_s_per_case": float(np.mean(validation)) if validation else None,
        "device": sorted({str(r.get("device")) for r in records}),
        "folds_trained_in_this_comparison": [r["fold"] for r in records if r.get("trained_in_this_comparison")],
    }


def build_report(out: str | os.PathLike, dataset: str | int | None = None) -> dict[str, Any]:
    """What ``compare.json`` holds, computed from ``out``'s settings, records and saved predictions
    (the working folder must be set: :func:`mednext.pipeline.workdir.use_workdir`); ``dataset``, when
    given, must be the compared one."""
    from mednext.pipeline.datasets import resolve_dataset
    from mednext.pipeline.workdir import preprocessed_folder

    out = Path(out)
    settings_path = out / "compare_settings.json"
    if not settings_path.is_file():
        raise UserError(f"{out} holds no comparison (no compare_settings.json); run 'mednext compare' first")
    setup = json.loads(settings_path.read_text(encoding="utf-8"))
    name, folds = setup["dataset"], setup["folds"]
    if dataset is not None and not os.path.isdir(str(dataset)) and resolve_dataset(dataset) != name:
        raise UserError(f"{out} holds a comparison on {name}, not on {dataset}; give {name} or another --out")
    specs = [parse_model_spec(t) for t in setup["models"]]
    baseline = parse_model_spec(setup["baseline"])
    if setup.get("cases") is not None:  # cases held out of the training (the demo), scored against their labels
        cases = sorted(setup["cases"])
        fold_of = {c: folds[0] for c in cases}
    else:
        splits = json.loads((preprocessed_folder() / name / "splits_final.json").read_text(encoding="utf-8"))
        cases = sorted(c for f in folds for c in splits[f]["val"])
        fold_of = {c: f for f in folds for c in splits[f]["val"]}
    records: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        missing = [f for f in folds if not _done(out, spec, f)]
        if missing:
            raise UserError(
                f"{spec.text} has no results for fold(s) {', '.join(map(str, missing))} in {out}; run 'mednext "
                "compare' with the same --out to train them"
            )
        records[spec.text] = [json.loads(_record_path(out, spec, f).read_text(encoding="utf-8")) for f in folds]
    references = Path(setup.get("reference_folder") or preprocessed_folder() / name / "gt_segmentations")
    scores = {s.text: _scores(out, s, name, cases, float(setup["tolerance_mm"]), references) for s in specs}
    classes = list(next(iter(scores[specs[0].text].values())).keys()) if cases else []
    per_model: dict[str, Any] = {}
    for spec in specs:
        rows = scores[spec.text]
        per_model[spec.text] = {
            m: {
                **{c: _summary([rows[case][c][m] for case in cases]) for c in classes},
                OVERALL: _summary([overall(rows[case], m) for case in cases]),
            }
            for m in METRICS
        }
    comparisons = []
    for spec in specs:
        if spec == baseline:
            continue
        for metric in METRICS:
            for c in [*classes, OVERALL]:

                def value(model: str, case: str, c: str = c, metric: str = metric) -> float:
                    row = scores[model][case]
                    v = overall(row, metric) if c == OVERALL else row[c][metric]
                    return math.nan if v is None else v

                a = [value(spec.text, case) for case in cases]
                b = [value(baseline.text, case) for case in cases]
                comparisons.append(
                    {
                        "model": spec.text,
                        "baseline": baseline.text,
                        "metric": metric,
                        "class": c,
                        **paired_comparison(a, b).to_dict(),
                    }  # fmt: skip
                )
    return {
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "folds": folds,
        "budget": setup["budget"],
        "models": [
            {
                "spec": s.text,
                "label": s.label,
                "kind": s.kind,
                "trainer": s.trainer,
                "plans": s.plans,
                "configuration": s.configuration,
                "results_folder": s.results_name(),
            }  # fmt: skip
            for s in specs
        ],
        "baseline": baseline.text,
        "classes": classes,
        "case_source": "held-out cases" if setup.get("cases") is not None else "out-of-fold validation cases",
        "cases": {c: {"fold": fold_of[c], **{s.text: scores[s.text][c] for s in specs}} for c in cases},
        "means": per_model,
        "comparisons": comparisons,
        "costs": {s.text: {**_costs(records[s.text]), "per_fold": records[s.text]} for s in specs},
        "statistics": {
            "pairing": "per validation case (out-of-fold), a class scored where both models have a score",
            "overall": "per case, the mean over the classes scored there",
            "difference": "model minus baseline",
            "interval": f"percentile bootstrap of the mean difference, {RESAMPLES} resamples of the cases, seed "
            f"{SEED}, {CONFIDENCE:.0%} (scipy.stats.bootstrap)",
            "test": "two-sided Wilcoxon signed-rank test, zero differences dropped (scipy.stats.wilcoxon); p = 1 "
            "when every difference is zero",
            "alpha": ALPHA,
            "tie_margin": TIE_MARGIN,
            "verdict": "better/worse when p < alpha and the interval excludes 0, else not distinguishable",
            "nsd_tolerance_mm": setup["tolerance_mm"],
        },
    }


def write_report(
    out: str | os.PathLike, log: Callable[[str], Any] = print, dataset: str | int | None = None
) -> dict[str, Any]:
    """Compute the report from ``out``'s saved predictions and records (:func:`build_report`) and write
    ``compare.json``, ``compare.md`` and the plots, each atomically; return the report."""
    out = Path(out)
    report = build_report(out, dataset)
    atomic_write_json(out / "compare.json", report, indent=1, allow_nan=False)
    text = markdown(report)
    atomic_write_text(out / "compare.md", text)
    plots = save_plots(report, out)
    log(text)
    log(f"report: {out / 'compare.json'}, {out / 'compare.md'}, " + ", ".join(p.name for p in plots))
    return report
