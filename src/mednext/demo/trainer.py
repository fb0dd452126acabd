"""Trainers for ``mednext demo``: a wall-clock budget and a contrast-enhancement augmentation.

* :class:`TimeBudgetMixin` replaces the engine's fixed epoch loop by one that fits a time budget.
  The first epoch runs with a provisional epoch count; after every epoch the measured duration of
  the last epoch sets how many epochs are left (``floor(remaining / epoch_time)``), and the poly
  learning-rate schedule is re-targeted to that total, so the schedule ends (learning rate near 0)
  when the budget ends. When no full epoch fits any more, a shorter last epoch takes as many
  iterations as fit (at least ``min_last_epoch_iterations``); when an epoch overruns the budget,
  training stops after it.
* :func:`simulate_contrast_enhancement` raises the intensity of soft tissue, per training label,
  by random amounts in Hounsfield units, so a network trained on a non-contrast CT sees organs as
  bright as on a contrast-enhanced (portal-venous) CT. The demo trainer applies it to each training
  volume as it is loaded (:func:`enhanced_dataset_class`), before the engine's augmentation, on the
  training labels, clipped to the plans' CT window.
* :class:`MedNeXtDemoTrainer` is the pipeline's :class:`~mednext.pipeline.trainer.MedNeXtTrainer`
  (the reference recipe) with both, in-plane rotation limited to +-15 degrees and no mirroring (the
  demo's scans share one orientation), and optionally neighbouring slices as input channels
  (``context_slices``, :mod:`mednext.pipeline.context`); :class:`NnUNetBudgetTrainer` is the engine's
  own ``nnUNetTrainer`` (its recipe unchanged) with the time budget only, for ``--compare nnunet``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from mednext.memory import keeps_freed_memory, reuse_freed_memory
from mednext.pipeline.context import context_dataset_class
from mednext.pipeline.trainer import MedNeXtTrainer, trainer_class_name

# Enhancement ranges (HU added, drawn uniformly from [0, max]) per demo label name. The held-out
# patient's organs are brighter than the training patient's by about: liver +45, spleen +47,
# aorta +135 HU (docs/demo-data.md); the ranges cover these with margin. "background" applies to
# background soft tissue (muscle, vessels, bowel wall), not to fat, air or bone.
ENHANCEMENT_HU: dict[str, float] = {
    "liver": 80.0,
    "spleen": 90.0,
    "stomach": 50.0,
    "aorta": 260.0,
    "kidney": 200.0,
    "background": 40.0,
}
SOFT_TISSUE_HU = (-100.0, 150.0)  # only voxels in this range are enhanced (no fat, air or bone)


def simulate_contrast_enhancement(
    data: torch.Tensor,
    target: torch.Tensor,
    labels: Mapping[str, int],
    mean: float,
    std: float,
    window: tuple[float, float],
    max_shift_hu: Mapping[str, float] = ENHANCEMENT_HU,
    probability: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``data`` (normalised CT, ``(B, 1, *spatial)``) with soft tissue brightened per label.

    ``target`` holds the labels of the same batch (``(B, 1, *spatial)``). Each sample is enhanced with
    ``probability``; each label (and background soft tissue) gets its own shift drawn from
    ``[0, max_shift_hu[name]]`` HU. Voxels outside :data:`SOFT_TISSUE_HU` are left alone. The result
    is clipped to ``window`` (HU), the range the plans' CT normalisation clips to."""
    if data.shape[1] != 1:
        raise ValueError(f"contrast enhancement expects one CT channel, got {data.shape[1]}")
    hu = data * std + mean
    soft = (hu > SOFT_TISSUE_HU[0]) & (hu < SOFT_TISSUE_HU[1])
    label = target.to(torch.long)
    shift = torch.zeros_like(hu)
    names = {0: "background", **{int(v): k for k, v in labels.items() if k != "background"}}
    for b in range(data.shape[0]):
        if torch.rand((), generator=generator).item() >= probability:
            continue
        for value, name in names.items():
            top = max_shift_hu.get(name, 0.0)
            if top <= 0:
                continue
            amount = float(torch.rand((), generator=generator).item()) * top
            shift[b][label[b] == value] = amount
    hu = torch.where(soft, hu + shift, hu).clamp(window[0], window[1])
    return ((hu - mean) / std).to(data.dtype)


class TimeBudgetMixin:
    """An epoch loop that fits ``budget_s`` seconds of training (see the module docstring)."""

    budget_s: float = 600.0
    provisional_epochs: int = 1000
    max_epochs: int | None = None  # optional cap on top of the budget
    min_last_epoch_iterations = 3  # a shorter last epoch uses the budget's rest if this many iterations fit
    show_progress: bool = True

    def print_to_log_file(self, *args: object, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        # the engine's log file keeps everything; the terminal gets the demo's own progress lines
        super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)

    def run_training(self) -> None:
        self.num_epochs = max(self.num_epochs, self.current_epoch + 1)
        self.on_train_start()
        # As in `mednext train` (MedNeXtTrainer.run_training): on the CPU freed memory stays in the
        # process between steps (mednext.memory), for the MedNeXt run and the engine's U-Net alike.
        with reuse_freed_memory(keeps_freed_memory(self.device)):
            self._run_budgeted_epochs()
        self.on_train_end()

    def _run_budgeted_epochs(self) -> None:  # noqa: C901 (one loop, the engine's hooks in order)
        from tqdm import tqdm

        start = time.perf_counter()
        self.budget_log: list[dict[str, float]] = []
        self.iterations_done = 0
        while self.current_epoch < self.num_epochs:
            epoch_start = time.perf_counter()
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            bar = tqdm(
                total=self.num_iterations_per_epoch,
                desc=f"epoch {self.current_epoch + 1}/{self.num_epochs}",
                leave=False,
                dynamic_ncols=True,
                disable=not self.show_progress,
            )
            for _ in range(self.num_iterations_per_epoch):
                outputs.append(self.train_step(next(self.dataloader_train)))
                left = max(0.0, self.budget_s - (time.perf_counter() - start))
                bar.set_postfix_str(f"loss {float(outputs[-1]['loss']):.4f} budget left {left:.0f} s", refresh=False)
                bar.update(1)
            bar.close()
            iterations = self.num_iterations_per_epoch
            self.iterations_done += iterations
            per_iteration = (time.perf_counter() - epoch_start) / iterations
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [
                    self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)
                ]
                self.on_validation_epoch_end(val)
            self.on_epoch_end()  # increments current_epoch
            now = time.perf_counter()
            epoch_time = now - epoch_start
            remaining = self.budget_s - (now - start)
            more = int(remaining // epoch_time) if remaining > 0 else 0
            short = 0  # iterations of a shorter last epoch that fits what is left of the budget
            if more == 0 and remaining > 0:
                short = int((remaining - (epoch_time - iterations * per_iteration)) // per_iteration)
                more = 1 if short >= self.min_last_epoch_iterations else 0
            self.num_epochs = self.current_epoch + more
            if self.max_epochs is not None:
                self.num_epochs = min(self.num_epochs, self.max_epochs)
                more = self.num_epochs - self.current_epoch
            if more == 1 and short:
                self.num_iterations_per_epoch = min(short, self.num_iterations_per_epoch)
            if more > 0:
                self.lr_scheduler.max_steps = self.num_epochs  # poly schedule ends with the budget
            self.budget_log.append(
                {
                    "epoch": self.current_epoch,
                    "epoch_time_s": epoch_time,
                    "elapsed_s": now - start,
                    "iterations": iterations,
                    "planned_epochs": self.num_epochs,
                }
            )
            if self.show_progress:
                print(
                    f"  epoch {self.current_epoch}: {epoch_time:.1f} s "
                    f"({epoch_time / iterations:.2f} s/iteration incl. validation), "
                    f"loss {float(self.logger.get_value('train_losses', step=-1)):.4f}, "
                    f"{now - start:.0f}/{self.budget_s:.0f} s used -> {self.num_epochs} epochs in all",
                    flush=True,
                )


class MedNeXtDemoTrainer(TimeBudgetMixin, MedNeXtTrainer):
    """MedNeXt's reference recipe, time-budgeted, with the contrast-enhancement augmentation."""

    enhancement_probability = 0.8
    foreground_share = 0.6  # the engine's 0.33: 61 of the 112 training slices hold no organ

    rotation_degrees = 15.0  # the engine: +-180 degrees in 2D when the patch is near square
    mirror_axes: tuple[int, ...] | None = None  # the engine: every axis
    optimizer_name = "adamw"  # the reference recipe; "sgd": the engine's SGD (lr 1e-2, Nesterov momentum 0.99)
    fov_padding = 40  # pad each volume in-plane with air, 0..40 voxels (120 mm at 3 mm) per side, at random
    batch_size_override: int | None = None  # None: the plans' batch size

    def _set_batch_size_and_oversample(self) -> None:
        super()._set_batch_size_and_oversample()
        if self.batch_size_override is not None:
            self.batch_size = int(self.batch_size_override)

    def configure_optimizers(self) -> tuple:
        if self.optimizer_name == "adamw":
            return super().configure_optimizers()
        if self.optimizer_name != "sgd":
            raise ValueError(f"optimizer_name {self.optimizer_name!r}: use 'adamw' or 'sgd'")
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        self.initial_lr = 1e-2
        optimizer = torch.optim.SGD(
            self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self) -> tuple:
        """The engine's spatial augmentation, with in-plane rotation limited to +-``rotation_degrees`` and
        mirroring only along ``mirror_axes`` (none by default).

        The demo's scans share one orientation (docs/demo-data.md), so the liver is always on the image's
        left and the spleen on its right; mirroring left-right would teach the network that either organ
        can be on either side, and a half-turn rotation that the spine can be in front."""
        rotation, dummy_2d, _, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        limit = math.radians(self.rotation_degrees)
        rotation = (max(rotation[0], -limit), min(rotation[1], limit))
        patch_size = self.configuration_manager.patch_size
        dim = len(patch_size)
        initial = get_patch_size(patch_size[-dim:], rotation, rotation, rotation, (0.85, 1.25))
        if dummy_2d:
            initial[0] = patch_size[0]
        mirror = tuple(self.mirror_axes) if self.mirror_axes else None
        self.inference_allowed_mirroring_axes = mirror
        return rotation, dummy_2d, initial, mirror

    def initialize(self) -> None:
        self.oversample_foreground_percent = self.foreground_share
        super().initialize()
        if self.enhancement_probability > 0 or self.fov_padding > 0:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            # enhance (and pad) the whole volume as it is loaded, before the context slices are stacked and
            # before the engine's augmentation: every slice of a sample gets the same shift per organ
            base = infer_dataset_class(self.preprocessed_dataset_folder)
            if self.enhancement_probability > 0:
                base = enhanced_dataset_class(base, self)
            if self.fov_padding > 0:
                base = padded_dataset_class(base, self)
            self.dataset_class = context_dataset_class(base, self.context_slices)


def enhanced_dataset_class(base: type, trainer: MedNeXtDemoTrainer) -> type:
    """A subclass of the engine's dataset class whose cases are passed through
    :func:`simulate_contrast_enhancement` (with the trainer's plans, labels and probability)."""
    props = trainer.plans_manager.foreground_intensity_properties_per_channel["0"]
    window = (float(props["percentile_00_5"]), float(props["percentile_99_5"]))
    mean, std = float(props["mean"]), float(props["std"])
    labels = dict(trainer.dataset_json["labels"])
    probability = float(trainer.enhancement_probability)

    def load_case(self: object, identifier: str) -> tuple:
        data, seg, seg_prev, properties = base.load_case(self, identifier)
        image = torch.from_numpy(np.asarray(data, dtype=np.float32))[None]
        target = torch.from_numpy(np.asarray(seg).astype(np.int16))[None]
        image = simulate_contrast_enhancement(image, target, labels, mean, std, window, probability=probability)
        return image[0].numpy(), seg, seg_prev, properties

    return type(f"{base.__name__}_enhanced", (base,), {"load_case": load_case})


def padded_dataset_class(base: type, trainer: MedNeXtDemoTrainer) -> type:
    """A subclass of the engine's dataset class that pads each loaded case in-plane (the last two axes)
    with air (the CT window's lower end, normalised) and background, by random amounts from 0 to
    ``trainer.fov_padding`` voxels per side, and shifts the foreground locations the engine samples
    patches around: the network sees the body at other positions and with air around it."""
    props = trainer.plans_manager.foreground_intensity_properties_per_channel["0"]
    air = (float(props["percentile_00_5"]) - float(props["mean"])) / float(props["std"])
    top = int(trainer.fov_padding)

    def load_case(self: object, identifier: str) -> tuple:
        data, seg, seg_prev, properties = base.load_case(self, identifier)
        rng = np.random.default_rng()
        (y0, y1), (x0, x1) = rng.integers(0, top + 1, size=(2, 2))
        pad = [(0, 0)] * (np.ndim(data) - 2) + [(int(y0), int(y1)), (int(x0), int(x1))]
        data = np.pad(np.asarray(data, dtype=np.float32), pad, constant_values=air)
        seg = np.pad(np.asarray(seg), pad, constant_values=0)
        properties = dict(properties)
        locations = {}
        for key, where in properties.get("class_locations", {}).items():
            where = np.array(where, copy=True)
            if len(where):
                where[:, -2] += int(y0)
                where[:, -1] += int(x0)
            locations[key] = where
        properties["class_locations"] = locations
        return data, seg, seg_prev, properties

    return type(f"{base.__name__}_padded", (base,), {"load_case": load_case})


class NnUNetBudgetTrainer(TimeBudgetMixin, nnUNetTrainer):
    """The engine's default trainer and recipe, time-budgeted (``--compare nnunet``)."""


def demo_trainer_class(
    preset: str, kernel: int, budget_s: float, show_progress: bool = True, context_slices: int = 0
) -> type:
    """A :class:`MedNeXtDemoTrainer` subclass for ``preset``/``kernel`` with ``budget_s`` seconds.

    Its name, ``MedNeXtTrainer_<P>k<K>_demo``, keeps the pipeline's naming, so ``mednext predict``
    finds the results folder by ``--model``/``--kernel``."""
    base = trainer_class_name(preset.upper(), int(kernel))
    attrs = {
        "preset": preset.upper(),
        "kernel_size": int(kernel),
        "budget_s": float(budget_s),
        "show_progress": show_progress,
        "context_slices": int(context_slices),
        "__module__": __name__,
    }
    return type(f"{base}_demo", (MedNeXtDemoTrainer,), attrs)


def nnunet_budget_trainer_class(budget_s: float, show_progress: bool = True) -> type:
    attrs = {"budget_s": float(budget_s), "show_progress": show_progress, "__module__": __name__}
    return type("nnUNetTrainer_demoBudget", (NnUNetBudgetTrainer,), attrs)
