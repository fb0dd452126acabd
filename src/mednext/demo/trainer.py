"""Trainers for ``mednext demo``: a wall-clock budget and a contrast-enhancement augmentation.

* :class:`TimeBudgetMixin` turns on the wall-clock budget of the pipeline's epoch loop
  (:class:`~mednext.pipeline.trainer.EpochLoop`: the epochs left and the poly schedule follow the
  measured epoch time, so the schedule ends when the budget ends) and prints a line per epoch.
* :func:`simulate_contrast_enhancement` raises the intensity of soft tissue, per training label,
  by random amounts in Hounsfield units, so a network trained on a non-contrast CT sees organs as
  bright as on a contrast-enhanced (portal-venous) CT. The demo trainer applies it to each training
  volume as it is loaded (:func:`enhanced_dataset_class`), before the engine's augmentation, on the
  training labels, clipped to the plans' CT window; :func:`padded_dataset_class` pads it with air.
* :class:`MedNeXtDemoTrainer` is the pipeline's :class:`~mednext.pipeline.trainer.MedNeXtTrainer`
  (the reference recipe) with both, in-plane rotation limited to +-15 degrees and no mirroring (the
  demo's scans share one orientation), and optionally neighbouring slices as input channels
  (``context_slices``, :mod:`mednext.pipeline.context`), written out per preset and kernel
  (``MedNeXtTrainer_Sk3_demo`` ...). ``--compare nnunet`` trains the engine's own trainer through
  ``mednext compare``'s machinery (:mod:`mednext.pipeline.compare`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from mednext.pipeline.datasets import TransformedDatasetClass
from mednext.pipeline.trainer import EpochLoop, EpochTiming, MedNeXtTrainer, trainer_class_name

# Enhancement ranges (HU added, drawn uniformly from [0, max]) per demo label name: they cover, with
# margin, how much brighter the held-out patient's organs are (docs/demo-data.md). "background" applies to
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


class TimeBudgetMixin(EpochLoop):
    """The pipeline's epoch loop with its wall-clock budget on (``budget_s``, see
    :class:`~mednext.pipeline.trainer.EpochLoop`), the engine's log kept out of the terminal and one
    line per epoch instead.

    Mixed in before the trainer: ``class T(TimeBudgetMixin, nnUNetTrainer)``. Set ``budget_s``,
    ``max_epochs`` and ``show_progress`` on the trainer before training."""

    budget_s: float | None = 600.0
    provisional_epochs: int = 1000

    def print_to_log_file(self, *args: object, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        # the engine's log file keeps everything; the terminal gets the demo's own progress lines
        super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)

    def after_epoch(self, timing: EpochTiming) -> None:
        super().after_epoch(timing)
        if self.show_progress:
            print(
                f"  epoch {self.current_epoch}: {timing.seconds:.1f} s "
                f"({timing.seconds / timing.iterations:.2f} s/iteration incl. validation), "
                f"loss {float(self.logger.get_value('train_losses', step=-1)):.4f}, "
                f"{timing.elapsed:.0f}/{self.budget_s:.0f} s used -> {self.num_epochs} epochs in all",
                flush=True,
            )


class MedNeXtDemoTrainer(TimeBudgetMixin, MedNeXtTrainer):
    """MedNeXt's reference recipe, time-budgeted, with the contrast-enhancement augmentation.

    Use a concrete subclass (``MedNeXtTrainer_Sk3_demo`` ...) or :func:`demo_trainer_class`; the
    attributes below are the demo's settings and may be changed on an instance before it is
    initialised."""

    enhancement_probability = 0.8
    foreground_share = 0.6  # the engine's 0.33: most of the training patient's slices hold no organ

    rotation_degrees = 15.0  # the engine: +-180 degrees in 2D when the patch is near square
    mirror_axes: tuple[int, ...] | None = None  # the engine: every axis
    optimizer_name = "adamw"  # the reference recipe; "sgd": the engine's SGD (lr 1e-2, Nesterov momentum 0.99)
    fov_padding = 40  # pad each volume in-plane with air, 0..40 voxels per side, at random
    batch_size_override: int | None = None  # None: the plans' batch size

    def configure_optimizers(self) -> tuple:
        if self.optimizer_name == "adamw":
            return super().configure_optimizers()
        if self.optimizer_name != "sgd":
            raise ValueError(f"optimizer_name {self.optimizer_name!r}: use 'adamw' or 'sgd'")
        self.initial_lr = 1e-2
        optimizer = torch.optim.SGD(
            self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self) -> tuple:  # noqa: N802 (the engine's name)
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
        if self.batch_size_override is not None:
            self.batch_size = int(self.batch_size_override)

    def training_dataset_class(self, engine_class: Any) -> Any:
        """The engine's dataset class with its cases enhanced and padded as they are loaded (the whole
        volume, so every slice of a sample gets the same shift per organ), before the context slices
        are stacked and before the engine's augmentation."""
        base = engine_class
        if self.enhancement_probability > 0:
            base = enhanced_dataset_class(base, self)
        if self.fov_padding > 0:
            base = padded_dataset_class(base, self)
        return super().training_dataset_class(base)


class ContrastEnhancement:
    """A case transform: :func:`simulate_contrast_enhancement` of the whole loaded volume."""

    def __init__(
        self, labels: Mapping[str, int], mean: float, std: float, window: tuple[float, float], probability: float
    ) -> None:
        self.labels, self.mean, self.std, self.window, self.probability = dict(labels), mean, std, window, probability

    def __call__(self, data: Any, seg: Any, seg_prev: Any, properties: dict) -> tuple:
        image = torch.from_numpy(np.asarray(data, dtype=np.float32))[None]
        target = torch.from_numpy(np.asarray(seg).astype(np.int16))[None]
        image = simulate_contrast_enhancement(
            image, target, self.labels, self.mean, self.std, self.window, probability=self.probability
        )
        return image[0].numpy(), seg, seg_prev, properties


class FieldOfViewPadding:
    """A case transform: pad the volume in-plane (the last two axes) with ``air`` and background, by
    random amounts from 0 to ``max_padding`` voxels per side, shifting the foreground locations the
    engine samples patches around."""

    def __init__(self, air: float, max_padding: int) -> None:
        self.air, self.max_padding = air, max_padding

    def __call__(self, data: Any, seg: Any, seg_prev: Any, properties: dict) -> tuple:
        rng = np.random.default_rng()
        (y0, y1), (x0, x1) = rng.integers(0, self.max_padding + 1, size=(2, 2))
        pad = [(0, 0)] * (np.ndim(data) - 2) + [(int(y0), int(y1)), (int(x0), int(x1))]
        data = np.pad(np.asarray(data, dtype=np.float32), pad, constant_values=self.air)
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


def enhanced_dataset_class(base: Any, trainer: Any) -> TransformedDatasetClass:
    """The engine's dataset class ``base`` with its cases passed through
    :func:`simulate_contrast_enhancement` (with the trainer's plans, labels and probability)."""
    props = trainer.plans_manager.foreground_intensity_properties_per_channel["0"]
    window = (float(props["percentile_00_5"]), float(props["percentile_99_5"]))
    mean, std = float(props["mean"]), float(props["std"])
    labels = dict(trainer.dataset_json["labels"])
    return TransformedDatasetClass(
        base, ContrastEnhancement(labels, mean, std, window, float(trainer.enhancement_probability))
    )


def padded_dataset_class(base: Any, trainer: Any) -> TransformedDatasetClass:
    """The engine's dataset class ``base`` with each case padded in-plane with air (the CT window's
    lower end, normalised) by 0 to ``trainer.fov_padding`` voxels per side (:class:`FieldOfViewPadding`):
    the network sees the body at other positions and with air around it."""
    props = trainer.plans_manager.foreground_intensity_properties_per_channel["0"]
    air = (float(props["percentile_00_5"]) - float(props["mean"])) / float(props["std"])
    return TransformedDatasetClass(base, FieldOfViewPadding(air, int(trainer.fov_padding)))


class MedNeXtTrainer_Sk3_demo(MedNeXtDemoTrainer):  # noqa: N801
    """The demo's MedNeXt S, kernel 3."""

    preset = "S"
    kernel_size = 3


class MedNeXtTrainer_Sk5_demo(MedNeXtDemoTrainer):  # noqa: N801
    """The demo's MedNeXt S, kernel 5."""

    preset = "S"
    kernel_size = 5


class MedNeXtTrainer_Bk3_demo(MedNeXtDemoTrainer):  # noqa: N801
    """The demo's MedNeXt B, kernel 3."""

    preset = "B"
    kernel_size = 3


class MedNeXtTrainer_Bk5_demo(MedNeXtDemoTrainer):  # noqa: N801
    """The demo's MedNeXt B, kernel 5."""

    preset = "B"
    kernel_size = 5


class MedNeXtTrainer_Mk3_demo(MedNeXtDemoTrainer):  # noqa: N801
    """The demo's MedNeXt M, kernel 3."""

    preset = "M"
    kernel_size = 3


class MedNeXtTrainer_Mk5_demo(MedNeXtDemoTrainer):  # noqa: N801
    """The demo's MedNeXt M, kernel 5."""

    preset = "M"
    kernel_size = 5


class MedNeXtTrainer_Lk3_demo(MedNeXtDemoTrainer):  # noqa: N801
    """The demo's MedNeXt L, kernel 3."""

    preset = "L"
    kernel_size = 3


class MedNeXtTrainer_Lk5_demo(MedNeXtDemoTrainer):  # noqa: N801
    """The demo's MedNeXt L, kernel 5."""

    preset = "L"
    kernel_size = 5


DEMO_TRAINERS: dict[str, type[MedNeXtDemoTrainer]] = {
    cls.__name__: cls
    for cls in (
        MedNeXtTrainer_Sk3_demo,
        MedNeXtTrainer_Sk5_demo,
        MedNeXtTrainer_Bk3_demo,
        MedNeXtTrainer_Bk5_demo,
        MedNeXtTrainer_Mk3_demo,
        MedNeXtTrainer_Mk5_demo,
        MedNeXtTrainer_Lk3_demo,
        MedNeXtTrainer_Lk5_demo,
    )
}


def demo_trainer_class(preset: str, kernel: int) -> type[MedNeXtDemoTrainer]:
    """The demo trainer of ``preset``/``kernel``. Its name, ``MedNeXtTrainer_<P>k<K>_demo``, keeps the
    pipeline's naming, so ``mednext predict`` finds the results folder by ``--model``/``--kernel``."""
    name = f"{trainer_class_name(preset, kernel)}_demo"
    if name not in DEMO_TRAINERS:
        raise ValueError(
            f"no demo trainer for model {preset!r} kernel {kernel!r}; use --model S|B|M|L and --kernel 3|5"
        )
    return DEMO_TRAINERS[name]
