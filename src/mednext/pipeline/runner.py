"""The pipeline's stages as functions of one settings value each: :func:`plan`, :func:`train`
and :func:`predict`.

``mednext plan`` / ``mednext train`` / ``mednext predict`` and the demo call these; a user's script can too, after
pointing the engine at a working folder (:func:`mednext.pipeline.workdir.use_workdir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

from mednext.errors import DatasetError
from mednext.files import folder_lock, remove_stale_temporaries, resolve_device
from mednext.nn import safe_torch_load, transfer_weights, upkern
from mednext.pipeline import predictor
from mednext.pipeline.datasets import dataset_id_of, register_dataset, resolve_dataset, validate_raw_dataset
from mednext.pipeline.ddp import init_distributed
from mednext.pipeline.nnunet_trainer import nnUNetTrainer_budget
from mednext.pipeline.planning import PLANNERS, RECIPES, SUPPORTED_CONFIGS
from mednext.pipeline.preprocessed import check_preprocessed, check_splits, preprocess
from mednext.pipeline.trainer import MedNeXtTrainer, get_trainer_class
from mednext.pipeline.workdir import (
    AUGMENTATION_WORKERS,
    augmentation_workers,
    default_processes,
    engine_setting,
    preprocessed_folder,
    raw_folder,
    results_folder,
)

# ----------------------------------------------------------------------------- planning


@dataclass
class PlanSettings:
    """What ``mednext plan`` can be told.

    Attributes:
        dataset: a raw dataset folder (``DatasetXXX_Name`` with ``dataset.json``) or the name or id
            of one already registered in the working folder.
        recipe: ``"auto"`` (the engine's spacing and patch, sized for MedNeXt's memory) or
            ``"paper"`` (1 mm isotropic, 128^3 patch, batch 2).
        configs: configurations to plan; one not possible for the data (3D on a 2D dataset) is skipped.
        memory_gb: GPU memory target of the ``auto`` recipe.
        num_processes: worker processes (None: the engine's ``nnUNet_def_n_proc``, else up to 8).
        verbose: the engine's verbose output.
    """

    dataset: str | os.PathLike | int
    recipe: str = "auto"
    configs: Sequence[str] = SUPPORTED_CONFIGS
    memory_gb: float = 8.0
    num_processes: int | None = None
    verbose: bool = False


def plan(settings: PlanSettings) -> dict[str, Any]:
    """Register (if a path), check, fingerprint, plan and preprocess a dataset; return the plans.

    The working folders must be set (``use_workdir``). The plans carry the dataset's name under
    ``mednext_dataset_name`` and the skipped configurations under ``mednext_skipped``."""
    configs = list(settings.configs)
    if settings.recipe not in PLANNERS:
        raise DatasetError(f"unknown recipe {settings.recipe!r}; use one of {', '.join(PLANNERS)}")
    bad = [c for c in configs if c not in SUPPORTED_CONFIGS]
    if bad or not configs:
        raise DatasetError(f"unknown configuration(s) {bad or configs}; use {', '.join(SUPPORTED_CONFIGS)}")
    if settings.memory_gb <= 0:
        raise DatasetError(f"--memory-gb must be positive, got {settings.memory_gb}")
    spec = str(settings.dataset)
    if (os.path.isdir(spec) and (Path(spec) / "dataset.json").exists()) or os.sep in spec:
        info = validate_raw_dataset(spec)  # check the user's folder before linking it anywhere
        name = register_dataset(spec)
    else:
        name = resolve_dataset(spec)
        info = validate_raw_dataset(raw_folder() / name)
    nproc = settings.num_processes or default_processes()
    dataset_id = dataset_id_of(name)
    base = preprocessed_folder() / name
    with folder_lock(base, "mednext plan"):
        remove_stale_temporaries(base)
        DatasetFingerprintExtractor(dataset_id, nproc, verbose=settings.verbose).run(overwrite_existing=True)
        planner = PLANNERS[settings.recipe](dataset_id, gpu_memory_target_in_gb=settings.memory_gb)
        plans = planner.plan_experiment()
        available = [c for c in configs if c in plans["configurations"]]
        skipped = [c for c in configs if c not in available]
        if not available:
            raise DatasetError(
                f"{name} is a {info.spatial_dims}D dataset: none of {configs} can be planned for it; use --configs 2d"
            )
        preprocess(name, planner.plans_identifier, available, nproc, verbose=settings.verbose)
    plans["mednext_skipped"] = skipped
    plans["mednext_dataset_name"] = name
    return plans


# ----------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    """What ``mednext train`` can be told, plus the hooks the demo uses.

    Attributes:
        dataset: dataset name (``Dataset901_Lesions``) or id (901) in the working folder.
        configuration: ``"3d_fullres"`` or ``"2d"``.
        fold: 0-4 or ``"all"``.
        preset, kernel: the network (``S``/``B``/``M``/``L``, 3/5).
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or None (CUDA, else MPS, else CPU).
        epochs, iters_per_epoch, val_iters: the run's length (None: the recipe's 1000, 250, 50; on
            resume, the interrupted run's).
        resume: continue from the fold's ``checkpoint_latest.pth``.
        bf16: bfloat16 autocast on CUDA instead of float16 with gradient scaling.
        compile: ``torch.compile`` the network where that pays (CUDA; see
            :meth:`MedNeXtTrainer.configure_run`); ``nnUNet_compile=1`` asks the same.
        num_workers: data-augmentation processes (None: 0 on CPU unless ``nnUNet_n_proc_DA`` is
            set, the engine's choice elsewhere).
        recipe: which plans to train with (``"auto"``, ``"paper"``; None: auto if planned).
        validate: run the engine's sliding-window validation of the fold's cases at the end.
        pretrained: initialise from these weights (our checkpoint, reference ``.model``, MONAI).
        upkern_from: initialise a kernel-5 network from this kernel-3 checkpoint (UpKern).
        show_progress: a progress bar per epoch.
        context_slices: 2D only: neighbouring slices per side as input channels.
        trainer_class: the trainer to use (None: :func:`get_trainer_class` of preset and kernel); the
            engine's recipe runs as :class:`~mednext.pipeline.nnunet_trainer.nnUNetTrainer_budget`.
        plans: the plans identifier to train with (e.g. ``nnUNetPlans``); None: that of ``recipe``.
        prepare_trainer: called with the new trainer before it is initialised, to set attributes the
            settings above do not cover.
        save_probabilities: the final validation also writes each case's probabilities
            (``validation/<case>.npz``), which ``find_best_configuration`` needs to ensemble.
        validation_only: do not train; validate the fold's trained network (nnU-Net's ``--val``).
        validation_checkpoint: ``"final"`` or ``"best"`` (nnU-Net's ``--val_best``): the weights
            the validation uses.
    """

    dataset: str | int
    configuration: str = "3d_fullres"
    fold: int | str = 0
    preset: str = "S"
    kernel: int = 3
    device: str | torch.device | None = None
    epochs: int | None = None
    iters_per_epoch: int | None = None
    val_iters: int | None = None
    resume: bool = False
    bf16: bool = False
    compile: bool = False
    num_workers: int | None = None
    recipe: str | None = None
    validate: bool = True
    pretrained: str | None = None
    upkern_from: str | None = None
    show_progress: bool = True
    context_slices: int = 0
    trainer_class: type[MedNeXtTrainer] | type[nnUNetTrainer_budget] | None = None
    prepare_trainer: Callable[[Any], None] | None = None
    save_probabilities: bool = False
    validation_only: bool = False
    validation_checkpoint: str = "final"
    plans: str | None = None


def _plans_of(settings: TrainSettings, dataset_name: str) -> str:
    """The plans identifier ``settings`` trains with (checked to exist)."""
    if settings.plans is None:
        return find_plans(dataset_name, settings.recipe)
    path = preprocessed_folder() / dataset_name / f"{settings.plans}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: plan {dataset_name} with plans {settings.plans} first")
    return settings.plans


def find_plans(dataset_name: str, recipe: str | None = None) -> str:
    """The plans identifier to train with: that of ``recipe``, else the auto plans if present, else
    the paper plans."""
    folder = preprocessed_folder() / dataset_name
    candidates = [RECIPES[recipe]] if recipe else list(RECIPES.values())
    for ident in candidates:
        if (folder / f"{ident}.json").is_file():
            return ident
    wanted = f"--recipe {recipe}" if recipe else ""
    raise FileNotFoundError(
        f"{folder} has no {' or '.join(c + '.json' for c in candidates)}; run "
        f"'mednext plan {dataset_name} {wanted}'".rstrip()
        + " first (with the same --workdir)"
    )


def parse_fold(fold: str | int) -> int | str:
    """``0``-``4`` as an int, or ``"all"``."""
    text = str(fold)
    if text == "all":
        return "all"
    if text.isdigit() and 0 <= int(text) <= 4:
        return int(text)
    raise ValueError(f"--fold {fold!r}: use 0, 1, 2, 3, 4 (five-fold cross-validation) or all")


def results_folder_of(trainer_class: type, dataset_name: str, plans_id: str, configuration: str) -> Path:
    """The engine's results folder of a trainer class (without ``fold_X``)."""
    return results_folder() / dataset_name / f"{trainer_class.__name__}__{plans_id}__{configuration}"


def fold_folder(settings: TrainSettings) -> Path:
    """``<results>/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>`` of ``settings``."""
    name = resolve_dataset(settings.dataset)
    cls = settings.trainer_class or get_trainer_class(str(settings.preset).upper(), int(settings.kernel))
    return results_folder_of(cls, name, _plans_of(settings, name), settings.configuration) / (
        f"fold_{parse_fold(settings.fold)}"
    )


def train(settings: TrainSettings) -> MedNeXtTrainer | nnUNetTrainer_budget:
    """Train one fold (the working folders must be set, see ``use_workdir``) and return the trainer;
    with ``settings.validation_only``, validate the trained fold instead.

    Results go to ``<results>/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>/``."""
    name = resolve_dataset(settings.dataset)
    fold = parse_fold(settings.fold)
    cls = settings.trainer_class or get_trainer_class(str(settings.preset).upper(), int(settings.kernel))
    device = resolve_device(settings.device)
    if settings.validation_checkpoint not in ("final", "best"):
        raise ValueError(f"validation_checkpoint {settings.validation_checkpoint!r}: use 'final' or 'best'")
    if settings.validation_only and (settings.resume or settings.pretrained or settings.upkern_from):
        raise ValueError("--val validates a finished training; drop --resume/--pretrained/--upkern-from")
    if settings.pretrained and settings.upkern_from:
        raise ValueError("--pretrained and --upkern-from both initialise the weights; pass one of them")
    if settings.resume and (settings.pretrained or settings.upkern_from):
        raise ValueError("--resume continues from the run's own checkpoint; drop --pretrained/--upkern-from")
    plans_id = _plans_of(settings, name)
    base = preprocessed_folder() / name
    plans = json.loads((base / f"{plans_id}.json").read_text(encoding="utf-8"))
    configuration = settings.configuration
    if configuration not in plans["configurations"]:
        raise ValueError(
            f"configuration {configuration!r} was not planned for {name} (plans {plans_id} has "
            f"{', '.join(plans['configurations'])}); run 'mednext plan {name} --configs {configuration}'"
        )
    data_identifier = plans["configurations"][configuration]["data_identifier"]
    data_dir = base / data_identifier
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        raise FileNotFoundError(
            f"{data_dir} is missing or empty: {configuration} was planned but not preprocessed; run "
            f"'mednext plan {name} --configs {configuration}'"
        )
    workers = settings.num_workers
    if workers is not None and workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {workers}")
    if workers is None and augmentation_workers() is None and device.type == "cpu":
        workers = 0  # on CPU the network, not augmentation, is the bottleneck; workers only compete for cores

    distributed = init_distributed(device.type)
    dataset_json = json.loads((base / "dataset.json").read_text(encoding="utf-8"))
    plans["continue_training"] = settings.resume
    fold_folder = results_folder_of(cls, name, plans_id, configuration) / f"fold_{fold}"
    with contextlib.ExitStack() as held:
        # a plan cannot rewrite the data under a training; one training per fold folder (rank 0 of a DDP run)
        held.enter_context(folder_lock(base, "mednext train", shared=True))
        cases = check_preprocessed(name, configuration, data_identifier)
        if fold != "all":
            check_splits(name, cases)
        if not distributed or torch.distributed.get_rank() == 0:
            held.enter_context(folder_lock(fold_folder, f"mednext train (fold {fold})"))
            remove_stale_temporaries(fold_folder)
        with engine_setting(AUGMENTATION_WORKERS, workers):
            trainer = cls(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json, device=device)
            if settings.validation_only:
                _validate(trainer, settings, fold_folder)
                return trainer
            _start(trainer, settings)
            trainer.run_training()
            if settings.validate:
                if settings.validation_checkpoint == "best":
                    trainer.load_checkpoint(str(fold_folder / "checkpoint_best.pth"))
                trainer.perform_actual_validation(save_probabilities=settings.save_probabilities)
    return trainer


def _validate(trainer: MedNeXtTrainer, settings: TrainSettings, folder: Path) -> None:
    """The engine's validation of a trained fold with its final (or best) checkpoint."""
    checkpoint = folder / f"checkpoint_{settings.validation_checkpoint}.pth"
    if not checkpoint.is_file():
        have = ", ".join(sorted(p.name for p in folder.glob("checkpoint_*.pth"))) or "no checkpoints"
        raise FileNotFoundError(
            f"{checkpoint} not found ({folder} holds {have}); --val validates a finished training: train the "
            "fold first" + ("" if settings.validation_checkpoint == "best" else ", or pass --val-best")
        )
    trainer.configure_run(show_progress=settings.show_progress, context_slices=settings.context_slices or None)
    trainer.load_checkpoint(str(checkpoint))
    trainer.perform_actual_validation(save_probabilities=settings.save_probabilities)


def _start(trainer: MedNeXtTrainer, settings: TrainSettings) -> None:
    """Configure and initialise ``trainer``: from its latest checkpoint on resume, else afresh with
    the optional initial weights."""
    out = Path(trainer.output_folder)
    latest, final = out / "checkpoint_latest.pth", out / "checkpoint_final.pth"
    epochs, iters, val_iters = settings.epochs, settings.iters_per_epoch, settings.val_iters
    state = None
    if settings.resume:
        if not latest.is_file():
            if final.is_file():
                raise ValueError(f"{final} exists: this fold already finished training; nothing to resume")
            raise FileNotFoundError(f"{latest} not found: nothing to resume; start the run without --resume")
        state = safe_torch_load(latest)
        saved = state.get("mednext", {})
        epochs = epochs if epochs is not None else saved.get("num_epochs")
        iters = iters if iters is not None else saved.get("iterations_per_epoch")
        val_iters = val_iters if val_iters is not None else saved.get("val_iterations_per_epoch")
    else:
        for ckpt in (latest, final):
            if ckpt.is_file():
                raise ValueError(
                    f"{ckpt} exists from an earlier run; pass --resume to continue it, or delete {out} to start over"
                )
    trainer.configure_run(
        epochs=epochs,
        iters_per_epoch=iters,
        val_iters=val_iters,
        bf16=settings.bf16,
        compile=settings.compile,
        show_progress=settings.show_progress,
        context_slices=settings.context_slices or None,
    )
    if settings.prepare_trainer is not None:
        settings.prepare_trainer(trainer)
    if state is not None:
        trainer.load_checkpoint(state)
        return
    trainer.initialize()
    if settings.pretrained:
        report = transfer_weights(trainer.unwrapped_network(), settings.pretrained)
        trainer.print_to_log_file(f"initialised from {settings.pretrained}: {report.summary()}")
    if settings.upkern_from:
        report = upkern(trainer.unwrapped_network(), settings.upkern_from)
        trainer.print_to_log_file(f"UpKern from {settings.upkern_from}: {report.summary()}")


# ----------------------------------------------------------------------------- prediction


@dataclass
class PredictSettings:
    """What ``mednext predict`` can be told.

    Attributes:
        input_path: an image file, a folder of images (nnU-Net naming) or a DICOM series folder.
        output: a folder, or for one case a file with the dataset's file ending.
        dataset: dataset name or id whose trained model to use.
        configuration, folds, model, kernel, plans: which training (None: the only one there is;
            folds None: every fold present, ensembled).
        checkpoint: ``"final"``, ``"best"`` or ``"latest"``.
        device: as for training.
        tta: mirroring test-time augmentation.
        step_size: sliding-window step as a fraction of the patch.
        save_probabilities: also write ``<case>.npz`` class probabilities.
        workdir: the working folder (None: ``./mednext_work``; nnU-Net's variables win when set).
        tile_batch: sliding-window tiles per network forward (CPU and CUDA).
        crop_body: CT only: predict inside the box around the patient's body.
        allow_irregular_slices: resample a DICOM series with missing, duplicate or unevenly spaced
            slices onto a regular grid instead of refusing it.
        continue_prediction: skip the cases the output folder already holds from the same model
            and settings.
        num_parts, part_id: segment only part ``part_id`` of ``num_parts`` (every ``num_parts``-th
            case, sorted by name).
        progress_bar: progress bars on standard error (None: when it is a terminal).
    """

    input_path: str | os.PathLike
    output: str | os.PathLike
    dataset: str | int
    configuration: str | None = None
    folds: Sequence[int | str] | None = None
    model: str | None = None
    kernel: int | None = None
    plans: str | None = None
    checkpoint: str = "final"
    device: str | torch.device | None = None
    tta: bool = True
    step_size: float = 0.5
    save_probabilities: bool = False
    workdir: str | os.PathLike | None = None
    tile_batch: int = 2
    crop_body: bool = False
    allow_irregular_slices: bool = False
    continue_prediction: bool = False
    num_parts: int = 1
    part_id: int = 0
    progress_bar: bool | None = None


def predict(settings: PredictSettings, log: Callable[[str], Any] = print) -> list[Path]:
    """Segment every case of ``settings.input_path``; returns the segmentation files written."""
    return predictor.predict(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}, log=log)
