"""``mednext demo``: train MedNeXt on one real CT, segment another patient's scan, and score it.

The run goes through the same code as a user's own training:

1. :func:`mednext.demo.data.prepare_demo_dataset` writes the nnU-Net v2 raw dataset Dataset990.
2. :func:`mednext.pipeline.runner.plan` fingerprints, plans (``auto`` recipe, ``2d``) and
   preprocesses it; the demo then widens the plans' CT window (:func:`set_ct_window`) and
   preprocesses again with the engine.
3. :func:`mednext.pipeline.runner.train` trains :class:`mednext.demo.trainer.MedNeXtDemoTrainer` (the
   reference recipe plus a time budget and a contrast-enhancement augmentation) on fold ``all``.
4. :func:`mednext.pipeline.predictor.predict` segments the held-out patient from its DICOM series.
5. :func:`mednext.pipeline.evaluate.evaluate_case` scores it against the reference label.

Outputs in ``out``: ``metrics.json``, ``segmentation.nii.gz``, ``overlay_axial.png``,
``overlay_coronal.png``, ``training_curve.png``. See docs/demo.md for the choices.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mednext.demo.data import prepare_demo_dataset
from mednext.demo.trainer import MedNeXtDemoTrainer, demo_trainer_class
from mednext.files import atomic_write, atomic_write_text, resolve_device, run_quietly
from mednext.pipeline import compare
from mednext.pipeline.evaluate import LabelSet, evaluate_case
from mednext.pipeline.planning import RECIPES
from mednext.pipeline.predictor import predict
from mednext.pipeline.preprocessed import preprocess
from mednext.pipeline.runner import PlanSettings, TrainSettings, find_plans, plan, results_folder_of, train
from mednext.pipeline.workdir import preprocessed_folder, use_workdir

CONFIGURATION = "2d"
FOLD = "all"
DEFAULT_MINUTES = 15.0  # training budget; set-up, prediction and scoring come on top
CT_WINDOW_HU = (-200.0, 250.0)  # wider than the fingerprint's window: enhanced organs stay inside it
CONTEXT_SLICES = 2  # 2.5D: two slices on either side (the choice is explained in docs/demo.md)
TRAINER_OVERRIDES = frozenset(
    {"rotation_degrees", "mirror_axes", "optimizer_name", "batch_size_override", "foreground_share",
     "enhancement_probability", "fov_padding"}
)  # fmt: skip


@dataclass
class DemoSettings:
    """Everything ``mednext demo`` can be told; the defaults are the documented demo."""

    out: Path = Path("mednext_demo")
    minutes: float = DEFAULT_MINUTES
    device: str | None = None  # None: cuda if available, else cpu
    model: str = "S"
    kernel: int = 3
    workdir: Path | None = None  # None: <out>/work
    compare: str | None = None  # "nnunet"
    iters_per_epoch: int = 25
    val_iters: int = 2
    max_epochs: int | None = None  # cap on top of the budget (tests)
    tta: bool = True
    ct_window: tuple[float, float] | None = CT_WINDOW_HU  # None: keep the engine's fingerprint window
    enhance: bool = True  # contrast-enhancement augmentation
    context_slices: int = CONTEXT_SLICES  # neighbouring slices per side as input channels (2.5D); 0: plain 2D
    crop_body: bool = True  # predict inside the held-out patient's body box (mednext.pipeline.body), both models
    cache_dir: Path | None = None
    show_progress: bool = True
    # experiments (benchmarks/demo_trials.py): attributes of the demo trainer to override, e.g.
    # {"rotation_degrees": 180, "optimizer_name": "sgd", "foreground_share": 0.33, "batch_size_override": 12}
    trainer_overrides: dict[str, Any] | None = None


@dataclass
class ModelResult:
    name: str
    dice: dict[str, float | None]
    nsd: dict[str, float | None]
    voxels: dict[str, dict[str, int]]
    epochs: int
    iterations: int
    train_seconds: float
    predict_seconds: float
    seconds_per_iteration: float
    curve: dict[str, list[float]]
    segmentation: Path


def _say(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)


def _none_if_nan(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


# ----------------------------------------------------------------------------- planning


def set_ct_window(plans_path: Path, window: tuple[float, float]) -> dict:
    """Set the CT normalisation's clipping window (HU) of every channel in a plans file.

    The engine's ``CTNormalization`` clips to the plans' ``percentile_00_5``/``percentile_99_5`` and
    then subtracts ``mean`` and divides by ``std``; mean and std are kept. The previous values are kept
    under ``mednext_fingerprint_window``. The file is rewritten atomically; returns the new plans."""
    low, high = float(window[0]), float(window[1])
    if not low < high:
        raise ValueError(f"CT window {window}: the lower bound must be below the upper bound")
    plans = json.loads(plans_path.read_text(encoding="utf-8"))
    props = plans["foreground_intensity_properties_per_channel"]
    plans.setdefault(
        "mednext_fingerprint_window",
        {k: [v["percentile_00_5"], v["percentile_99_5"]] for k, v in props.items()},
    )
    for channel in props.values():
        channel["percentile_00_5"], channel["percentile_99_5"] = low, high
    atomic_write_text(plans_path, json.dumps(plans, indent=1))
    return plans


# ----------------------------------------------------------------------------- training


def _trainer_logs(trainer: Any) -> dict[str, list[float]]:
    log = trainer.logger.get_checkpoint()
    per_epoch = [int(e["iterations"]) for e in getattr(trainer, "budget_log", [])]
    return {
        "train_loss": [float(v) for v in log.get("train_losses", [])],
        "val_loss": [float(v) for v in log.get("val_losses", [])],
        "pseudo_dice": [float(v) for v in log.get("mean_fg_dice", [])],
        "iteration": [int(v) for v in np.cumsum(per_epoch)],  # iterations done at the end of each epoch
    }


def train_mednext(settings: DemoSettings, dataset_name: str, device: Any, budget_s: float) -> MedNeXtDemoTrainer:
    """Train the demo MedNeXt on fold ``all`` through the pipeline's runner; returns the trainer."""
    overrides = dict(settings.trainer_overrides or {})
    for key in overrides:
        if key not in TRAINER_OVERRIDES:
            raise ValueError(f"trainer override {key!r}: choose from {', '.join(sorted(TRAINER_OVERRIDES))}")
    cls = demo_trainer_class(settings.model, settings.kernel)

    def prepare(trainer: MedNeXtDemoTrainer) -> None:
        trainer.budget_s = float(budget_s)
        trainer.max_epochs = settings.max_epochs
        if not settings.enhance:
            trainer.enhancement_probability = 0.0
        for key, value in overrides.items():
            setattr(trainer, key, tuple(value) if isinstance(value, list) else value)

    plans_id = find_plans(dataset_name, "auto")
    # the demo's own results folder is rebuilt on every run
    shutil.rmtree(results_folder_of(cls, dataset_name, plans_id, CONFIGURATION), ignore_errors=True)
    return train(
        TrainSettings(
            dataset_name,
            configuration=CONFIGURATION,
            fold=FOLD,
            device=device,
            epochs=settings.max_epochs or cls.provisional_epochs,
            iters_per_epoch=settings.iters_per_epoch,
            val_iters=settings.val_iters,
            num_workers=0 if device.type == "cpu" else None,  # the engine's single-threaded augmenter on CPU
            recipe="auto",
            validate=False,
            show_progress=settings.show_progress,
            context_slices=settings.context_slices,
            trainer_class=cls,
            prepare_trainer=prepare,
        )
    )


def compare_with_nnunet(
    settings: DemoSettings, dataset_name: str, device: Any, budget_s: float, workdir: Path, log: Callable[[str], Any]
) -> tuple[Any, dict[str, Any], float]:
    """``--compare nnunet``: the comparison machinery of ``mednext compare``
    (:mod:`mednext.pipeline.compare`) on one fold (``all``): nnU-Net's default 2d U-Net planned by the
    engine's own planner and trained with its recipe for the same budget, in a child process. Returns
    the trained nnU-Net (loaded for prediction), its record of costs and the training's seconds."""
    spec = compare.parse_model_spec(f"nnunet:{CONFIGURATION}")
    compare.prepare_model(spec, dataset_name, num_processes=1, log=log)
    # the demo's own results folder is rebuilt on every run
    shutil.rmtree(compare.fold_folder(spec, dataset_name, FOLD).parent, ignore_errors=True)
    budget = compare.Budget(
        hours=budget_s / 3600.0, iters_per_epoch=settings.iters_per_epoch, val_iters=max(1, settings.val_iters),
        max_epochs=settings.max_epochs,
    )  # fmt: skip
    job = compare.FoldJob(
        spec, dataset_name, FOLD, budget, str(workdir), str(device), 0 if device.type == "cpu" else None,
        validate=False, show_progress=settings.show_progress, label="    ",
    )  # fmt: skip
    start = time.perf_counter()
    record = compare.train_fold(job, Path(settings.out).absolute() / "compare" / "runs" / spec.slug / "fold_all.json")
    seconds = time.perf_counter() - start
    return compare.load_trained(spec, dataset_name, FOLD, device), record, seconds


# ----------------------------------------------------------------------------- scoring and pictures


def score(prediction: Path, reference: Path, dataset_json: Path) -> tuple[dict, dict, dict]:
    """Dice, NSD (2 mm) and voxel counts per class; None where prediction and reference are both empty."""
    result = evaluate_case(prediction, reference, LabelSet.from_dataset_json(dataset_json))
    dice = {k: _none_if_nan(v["dice"]) for k, v in result.metrics.items()}
    nsd = {k: _none_if_nan(v["nsd"]) for k, v in result.metrics.items()}
    voxels = {
        k: {"prediction": v["voxels_prediction"], "reference": v["voxels_reference"]} for k, v in result.metrics.items()
    }
    return dice, nsd, voxels


def dice_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """Per-class Dice of one or more models side by side (``-`` = no score: organ absent from both)."""
    names = list(results)
    classes: list[str] = []
    for d in results.values():
        classes += [c for c in d if c not in classes]
    width = max(len("class"), *(len(c) for c in classes), len("mean"))
    cols = [max(8, len(n)) for n in names]
    lines = [f"{'class':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cols, strict=True))]
    for c in classes + ["mean"]:
        cells = []
        for n, w in zip(names, cols, strict=True):
            if c == "mean":
                vals = [v for v in results[n].values() if v is not None]
                v = float(np.mean(vals)) if vals else None
            else:
                v = results[n].get(c)
            cells.append(f"{'-' if v is None else f'{v:.3f}':>{w}}")
        lines.append(f"{c:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


LABEL_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]


def _read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(float(s) for s in img.GetSpacing())  # array z, y, x; spacing x, y, z


def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def save_overlays(
    image: Path,
    reference: Path,
    predictions: Mapping[str, Path],
    labels: Mapping[str, int],
    out: Path,
    window_hu: tuple[float, float] = (-160.0, 240.0),
) -> list[Path]:
    """``overlay_axial.png`` and ``overlay_coronal.png``: the reference and each prediction over the CT.

    The axial slice and the coronal row are those with the most reference foreground."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ct, spacing = _read_array(image)
    ref, _ = _read_array(reference)
    preds = {name: _read_array(p)[0] for name, p in predictions.items()}
    for name, arr in preds.items():
        if arr.shape != ct.shape:
            raise ValueError(f"prediction {name} has shape {arr.shape}, the image {ct.shape}")
    fg = {k: v for k, v in labels.items() if k != "background"}
    top = max(fg.values()) if fg else 1
    colours = ["none"] + [LABEL_COLOURS[(v - 1) % len(LABEL_COLOURS)] for v in range(1, top + 1)]
    cmap = ListedColormap(colours)
    z = int(np.argmax((ref > 0).sum(axis=(1, 2))))
    y = int(np.argmax((ref > 0).sum(axis=(0, 2))))
    xs = np.nonzero((ref > 0).any(axis=(0, 1)))[0]
    x0, x1 = (max(0, int(xs.min()) - 20), min(ct.shape[2], int(xs.max()) + 21)) if xs.size else (0, ct.shape[2])
    views = {
        # axial: rows = y (anterior at the top), columns = x (the patient's left on the right)
        "axial": (lambda a: a[z], spacing[1] / spacing[0], f"axial slice {z + 1}/{ct.shape[0]}"),
        # coronal: rows = z (head at the top), columns = x, cropped to the labelled organs
        "coronal": (lambda a: a[::-1, y, x0:x1], spacing[2] / spacing[0], f"coronal row {y + 1}/{ct.shape[1]}"),
    }
    written = []
    panels = {"reference": ref, **preds}
    handles = [Patch(color=LABEL_COLOURS[(v - 1) % len(LABEL_COLOURS)], label=k) for k, v in fg.items()]
    for view, (cut, aspect, title) in views.items():
        with plt.style.context("default"):  # the engine's progress plot changes the global style (seaborn)
            written.append(
                _overlay_figure(
                    plt, cut, ct, panels, cmap, top, aspect, window_hu, title, handles, out / f"overlay_{view}.png"
                )
            )
    return written


def _overlay_figure(
    plt: Any,
    cut: Callable,
    ct: np.ndarray,
    panels: Mapping[str, np.ndarray],
    cmap: Any,
    top: int,
    aspect: float,
    window_hu: tuple[float, float],
    title: str,
    handles: list,
    path: Path,
) -> Path:
    rows, cols = cut(ct).shape
    height = max(1.2, 4.2 * rows * aspect / cols)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), height + 1.4), squeeze=False)
    for ax, (name, seg) in zip(axes[0], panels.items(), strict=True):
        ax.imshow(cut(ct), cmap="gray", vmin=window_hu[0], vmax=window_hu[1], aspect=aspect,
                  interpolation="nearest")  # fmt: skip
        lab = np.ma.masked_equal(cut(seg), 0)
        ax.imshow(lab, cmap=cmap, vmin=0, vmax=top, alpha=0.45, aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"held-out patient, {title}")
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.02))
    _save_figure(fig, path)
    plt.close(fig)
    return path


def save_training_curve(curves: Mapping[str, Mapping[str, list[float]]], iters_per_epoch: int, path: Path) -> Path:
    """Training loss and pseudo Dice (on the training patient) per epoch for each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # the engine's progress plot changes the global style (seaborn)
        return _curve_figure(plt, curves, iters_per_epoch, path)


def _curve_figure(plt: Any, curves: Mapping[str, Mapping[str, list[float]]], iters_per_epoch: int, path: Path) -> Path:
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        x = curve.get("iteration") or [(i + 1) * iters_per_epoch for i in range(len(curve["train_loss"]))]
        ax_loss.plot(x, curve["train_loss"], label=f"{name} train")
        if any(not math.isnan(v) for v in curve["val_loss"]):
            ax_loss.plot(x[: len(curve["val_loss"])], curve["val_loss"], "--", label=f"{name} val")
        ax_dice.plot(x[: len(curve["pseudo_dice"])], curve["pseudo_dice"], label=name)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss (Dice + CE)")
    ax_loss.legend()
    ax_dice.set_xlabel("iteration")
    ax_dice.set_ylabel("pseudo Dice (training patient)")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the demo


def prepare_data(
    settings: DemoSettings, raw_root: Path, start: float, timings: dict[str, float]
) -> tuple[Any, dict, dict]:
    """Steps 1 and 2 of the demo: the raw dataset under ``raw_root``, then the engine's planning and
    preprocessing (the CT window of ``settings`` applied). Returns the dataset description, the plans
    and the 2d configuration; adds ``data_s`` and ``plan_s`` to ``timings``."""
    _say("1/5 example scans -> nnU-Net raw dataset", start)
    t = time.perf_counter()
    info = prepare_demo_dataset(raw_root, cache_dir=settings.cache_dir)
    timings["data_s"] = time.perf_counter() - t

    _say(f"2/5 planning and preprocessing {info.dataset_name} ({CONFIGURATION}, recipe auto)", start)
    t = time.perf_counter()
    plans = run_quietly(plan, PlanSettings(info.dataset_dir, recipe="auto", configs=[CONFIGURATION], num_processes=1))
    name = plans["mednext_dataset_name"]
    if settings.ct_window is not None:
        plans_path = preprocessed_folder() / name / f"{RECIPES['auto']}.json"
        old = plans["foreground_intensity_properties_per_channel"]["0"]
        set_ct_window(plans_path, settings.ct_window)
        _say(
            f"    CT window [{old['percentile_00_5']:.0f}, {old['percentile_99_5']:.0f}] HU (fingerprint) -> "
            f"[{settings.ct_window[0]:.0f}, {settings.ct_window[1]:.0f}] HU; preprocessing again",
            start,
        )
        run_quietly(preprocess, name, RECIPES["auto"], [CONFIGURATION], 1, show_progress_bar=False)
    cfg = plans["configurations"][CONFIGURATION]
    timings["plan_s"] = time.perf_counter() - t
    _say(f"    patch {cfg['patch_size']}, batch {cfg['batch_size']}, spacing {cfg['spacing']} mm", start)

    return info, plans, cfg


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the whole demo and return what ``metrics.json`` holds."""
    import torch

    start = time.perf_counter()
    if settings.minutes <= 0:
        raise ValueError(f"--minutes {settings.minutes}: give a positive number of training minutes")
    if settings.compare not in (None, "nnunet"):
        raise ValueError(f"--compare {settings.compare!r}: the only comparison is 'nnunet'")
    # no MPS: the demo runs on CUDA or the CPU
    device = resolve_device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(settings.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(settings.workdir if settings.workdir is not None else out / "work").absolute()
    dirs = use_workdir(workdir)
    budget_s = settings.minutes * 60.0
    timings: dict[str, float] = {}
    _say(
        f"mednext demo: MedNeXt-{settings.model} k{settings.kernel} {CONFIGURATION}, {settings.minutes:g} min "
        f"of training on {device}, {torch.get_num_threads()} thread(s); output {out}",
        start,
    )

    info, plans, cfg = prepare_data(settings, dirs.raw, start, timings)
    name = plans["mednext_dataset_name"]

    _say(f"3/5 training MedNeXt-{settings.model} k{settings.kernel} for {settings.minutes:g} min", start)
    t = time.perf_counter()
    trainer = train_mednext(settings, name, device, budget_s)
    train_s = time.perf_counter() - t
    peak_mb = compare.peak_memory_mb(device)
    epochs = int(trainer.current_epoch)
    iterations = int(getattr(trainer, "iterations_done", epochs * settings.iters_per_epoch))
    curve = _trainer_logs(trainer)
    timings["train_s"] = train_s

    crop_note = ", inside the box around the body" if settings.crop_body else ""
    _say(f"4/5 predicting the held-out patient from its DICOM series{crop_note}", start)
    t = time.perf_counter()
    seg = out / "segmentation.nii.gz"
    predict(
        info.heldout_dicom_dir, seg, dataset=name, configuration=CONFIGURATION, folds=[FOLD], model=settings.model,
        kernel=settings.kernel, plans="MedNeXtPlans", device=str(device), tta=settings.tta, workdir=workdir,
        log=lambda m: _say(f"    {m}", start), crop_body=settings.crop_body,
    )  # fmt: skip
    predict_s = time.perf_counter() - t
    timings["predict_s"] = predict_s

    _say("5/5 scoring against the reference segmentation", start)
    dataset_json = info.dataset_dir / "dataset.json"
    dice, nsd, voxels = score(seg, info.heldout_label, dataset_json)
    results = {
        "mednext": ModelResult(
            f"MedNeXt-{settings.model} k{settings.kernel}",
            dice,
            nsd,
            voxels,
            epochs,
            iterations,
            train_s,
            predict_s,
            train_s / max(1, iterations),
            curve,
            seg,
        )  # fmt: skip
    }

    if settings.compare == "nnunet":
        _say(f"compare: nnU-Net's default {CONFIGURATION} U-Net, its own plans and recipe, same budget", start)
        t = time.perf_counter()
        nn_trainer, nn_record, nn_train_s = compare_with_nnunet(
            settings, name, device, budget_s, workdir, lambda m: _say(f"    {m}", start)
        )
        timings["nnunet_plan_and_train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        nn_seg = compare.predict_image(
            nn_trainer, info.heldout_image, out / "segmentation_nnunet.nii.gz", settings.tta, settings.crop_body
        )
        nn_predict_s = time.perf_counter() - t
        nn_epochs = int(nn_trainer.current_epoch)
        nn_iterations = int(nn_record.get("iterations_this_run") or nn_epochs * settings.iters_per_epoch)
        d, n, v = score(nn_seg, info.heldout_label, dataset_json)
        results["nnunet"] = ModelResult(
            "nnU-Net 2d", d, n, v, nn_epochs, nn_iterations, nn_train_s, nn_predict_s,
            nn_train_s / max(1, nn_iterations), _trainer_logs(nn_trainer), nn_seg,
        )  # fmt: skip
        timings["nnunet_train_s"], timings["nnunet_predict_s"] = nn_train_s, nn_predict_s
        # the paired report of mednext compare, on this one case and fold
        ours = compare.parse_model_spec(f"mednext:{settings.model}:k{settings.kernel}:{CONFIGURATION}")
        theirs = compare.parse_model_spec(f"nnunet:{CONFIGURATION}")
        mednext_record = {
            **compare.training_costs(trainer), "device": str(device), "peak_memory_mb": peak_mb,
            "peak_memory_kind": compare.memory_kind(device), "trained_in_this_comparison": True,
        }  # fmt: skip
        compare.write_case_comparison(
            out / "compare", name, info.heldout_case, {ours: seg, theirs: nn_seg},
            {ours: {**mednext_record, "inference_s_per_case": predict_s},
             theirs: {**nn_record, "inference_s_per_case": nn_predict_s}},
            theirs, info.heldout_label.parent, compare.Budget(**nn_record["budget"]), log=lambda m: None,
        )  # fmt: skip

    labels = json.loads(dataset_json.read_text(encoding="utf-8"))["labels"]
    pictures = save_overlays(
        info.heldout_image, info.heldout_label, {r.name: r.segmentation for r in results.values()}, labels, out
    )
    curve_png = save_training_curve(
        {r.name: r.curve for r in results.values()}, settings.iters_per_epoch, out / "training_curve.png"
    )
    timings["total_s"] = time.perf_counter() - start

    metrics: dict[str, Any] = {
        "dice": dice,
        "nsd_2mm": nsd,
        "voxels": voxels,
        "case": info.heldout_case,
        "model": {
            "preset": settings.model,
            "kernel": settings.kernel,
            "configuration": CONFIGURATION,
            "patch_size": cfg["patch_size"],
            "batch_size": cfg["batch_size"],
            "spacing_mm": cfg["spacing"],
            "ct_window_hu": list(settings.ct_window) if settings.ct_window else None,
            "contrast_augmentation": settings.enhance,
            "context_slices": settings.context_slices,
            "crop_body": settings.crop_body,
            "fov_padding_voxels": int(trainer.fov_padding),
        },
        "training": {
            "device": str(device),
            "budget_s": budget_s,
            "epochs": epochs,
            "iterations": iterations,
            "seconds_per_iteration": round(results["mednext"].seconds_per_iteration, 3),
            "budget_log": getattr(trainer, "budget_log", []),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "files": {
            "segmentation": str(seg),
            "overlays": [str(p) for p in pictures],
            "training_curve": str(curve_png),
            "comparison": str(out / "compare" / "compare.json") if settings.compare else None,
            "results_folder": str(trainer.output_folder),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }
    if "nnunet" in results:
        r = results["nnunet"]
        metrics["nnunet"] = {
            "dice": r.dice,
            "nsd_2mm": r.nsd,
            "voxels": r.voxels,
            "epochs": r.epochs,
            "iterations": r.iterations,
            "seconds_per_iteration": round(r.seconds_per_iteration, 3),
            "segmentation": str(r.segmentation),
        }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))

    table = dice_table({r.name: r.dice for r in results.values()})
    print()
    print(f"Dice on the held-out patient ({info.heldout_case}; '-' = organ in neither prediction nor reference):")
    print(table)
    print()
    for r in results.values():
        print(
            f"{r.name}: {r.iterations} iterations in {r.train_seconds / 60:.1f} min "
            f"({r.seconds_per_iteration:.2f} s each), prediction {r.predict_seconds:.0f} s"
        )
    print(f"whole run {timings['total_s'] / 60:.1f} min; outputs in {out}")
    return metrics
