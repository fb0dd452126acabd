"""MedNeXt planners on top of nnU-Net v2's ExperimentPlanner (:func:`mednext.pipeline.runner.plan`
runs them on a dataset).

Two recipes:

* ``auto`` (plans ``MedNeXtPlans``): the engine's data-driven target spacing and patch shape, but
  the memory budget is divided by MedNeXt's traced activation memory relative to the engine's own
  U-Net (see :func:`memory_ratio`), so patch and batch fit MedNeXt, not the U-Net the engine's
  constants were calibrated for. The network keeps the paper's four stages; each stage's stride per
  axis is the engine's (so anisotropic data down-samples the coarse axis later), and every patch
  axis is divisible by the network's total stride.
* ``paper`` (plans ``MedNeXtPlans_paper``): the reference's 1 mm isotropic spacing, 128^3 patch
  (512^2 in 2D), batch 2, stride 2 on every axis at every stage.

Both plan ``2d`` and ``3d_fullres`` only (no low-resolution cascade) and mark batch Dice, as the
reference trains. The plans' ``architecture`` names :class:`mednext.nn.MedNeXt` with all its
constructor arguments except ``in_channels`` and ``num_classes``; the trainer replaces the default
network there (S, k3) by the preset it trains before copying the plans to the results folder.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from mednext.nn import create_mednext
from mednext.pipeline.workdir import AUGMENTATION_WORKERS, augmentation_workers, engine_setting

NUM_STAGES = 4  # the paper's presets have 2*4+1 per-position settings
NETWORK_CLASS = "mednext.nn.MedNeXt"
PLANS_AUTO = "MedNeXtPlans"
PLANS_PAPER = "MedNeXtPlans_paper"
RECIPES = {"auto": PLANS_AUTO, "paper": PLANS_PAPER}
SUPPORTED_CONFIGS = ("2d", "3d_fullres")
PAPER_PATCH = {3: [128, 128, 128], 2: [512, 512]}
PAPER_BATCH = 2
PAPER_SPACING_MM = 1.0
# Presets without gradient checkpointing store every block's activations; B stores the most of them,
# so sizing for B makes S fit too (M and L recompute blocks and store far less, see docs/pipeline.md).
SIZING_PRESET = "B"


def mednext_arch_kwargs(
    spatial_dims: int,
    strides: Sequence[Sequence[int]],
    preset: str = "S",
    kernel_size: int = 3,
) -> dict[str, Any]:
    """Constructor arguments of the trained network (deep supervision on), without in_channels and
    num_classes: ``MedNeXt(in_channels=c, num_classes=k, **kwargs)`` rebuilds it."""
    return _preset_config(preset, spatial_dims, strides, kernel_size)


def _preset_config(preset: str, spatial_dims: int, strides: Sequence[Sequence[int]], kernel_size: int) -> dict:
    # building the module is the only way to get its normalised config; it is cheap at width 32 (no forward)
    net = create_mednext(
        preset,
        1,
        2,
        kernel_size=kernel_size,
        spatial_dims=spatial_dims,
        deep_supervision=True,
        strides=[list(int(v) for v in s) for s in strides],
    )
    cfg = dict(net.config)
    cfg.pop("in_channels")
    cfg.pop("num_classes")
    return cfg


def architecture_entry(arch_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The plans' ``architecture`` value for a MedNeXt."""
    return {"network_class_name": NETWORK_CLASS, "arch_kwargs": arch_kwargs, "_kw_requires_import": []}


def total_stride(strides: Sequence[Sequence[int]]) -> list[int]:
    return [math.prod(int(s[a]) for s in strides) for a in range(len(strides[0]))]


def stage_strides_from_engine(pool_op_kernel_sizes: Sequence[Sequence[int]], spatial_dims: int) -> list[list[int]]:
    """MedNeXt's four stage strides from the engine's pooling plan: the engine's first four
    down-sampling steps (its entry 0 is the stem, stride 1), padded with stride 1 when it plans fewer."""
    steps = [list(int(v) for v in s) for s in pool_op_kernel_sizes[1:]][:NUM_STAGES]
    while len(steps) < NUM_STAGES:
        steps.append([1] * spatial_dims)
    return steps


def activation_bytes(net: Any, x: Any) -> int:
    """Bytes of the tensors a training forward pass keeps for the backward pass (each storage counted
    once, parameters excluded), plus the outputs: the part of training memory that grows with the
    patch. Works on the ``meta`` device, where nothing is computed or allocated."""
    import torch

    seen = [p.untyped_storage() for p in net.parameters()]
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if not any(storage is s for s in seen):
            seen.append(storage)
            total += storage.nbytes()
        return t

    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    return total + sum(o.numel() * o.element_size() for o in outs)


@functools.lru_cache(maxsize=8)
def memory_ratio(spatial_dims: int, preset: str = SIZING_PRESET) -> float:
    """MedNeXt's activation memory divided by that of the engine's default U-Net at the same patch
    (float32, both with four stride-2 stages), traced on the ``meta`` device at a probe patch.

    Activation memory of both networks is proportional to the number of voxels, so the ratio holds
    for any patch. The engine's memory constants are calibrated
    for its U-Net; dividing its memory target by this ratio makes its patch/batch search fit MedNeXt."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    probe = (64,) * 3 if spatial_dims == 3 else (256,) * 2
    conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if spatial_dims == 3 else torch.nn.InstanceNorm2d
    with torch.device("meta"):
        unet = PlainConvUNet(
            1, 5, [32, 64, 128, 256, 320 if spatial_dims == 3 else 512], conv, 3, [1, 2, 2, 2, 2], [2] * 5, 3,
            [2] * 4, True, norm, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
            {"inplace": True}, deep_supervision=True,
        )  # fmt: skip
        net = create_mednext(preset, 1, 3, spatial_dims=spatial_dims, deep_supervision=True)
        x = torch.zeros(1, 1, *probe)
        return activation_bytes(net, x) / activation_bytes(unet, x)


class MedNeXtPlanner(ExperimentPlanner):
    """Recipe ``auto``: the engine's spacing and patch shape, memory sized for MedNeXt."""

    recipe = "auto"

    def __init__(
        self,
        dataset_name_or_id: str | int,
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str = PLANS_AUTO,
        overwrite_target_spacing: Sequence[float] | None = None,
        suppress_transpose: bool = False,
    ) -> None:
        super().__init__(
            dataset_name_or_id,
            gpu_memory_target_in_gb,
            preprocessor_name,
            plans_name,
            overwrite_target_spacing,
            suppress_transpose,
        )
        self.memory_target_gb = float(gpu_memory_target_in_gb)
        self.lowres_creation_threshold = 0.0  # no 3d_lowres / cascade: MedNeXt trains 2d and 3d_fullres

    @staticmethod
    def static_estimate_VRAM_usage(*args: Any, **kwargs: Any) -> float:  # noqa: N802 (the engine's name)
        # the engine sets torch's thread count to its augmentation-worker count, which may be 0
        # (valid for training); at least one thread for the estimate
        workers = augmentation_workers()
        with engine_setting(AUGMENTATION_WORKERS, 1 if workers is not None and workers < 1 else None):
            return ExperimentPlanner.static_estimate_VRAM_usage(*args, **kwargs)

    def get_plans_for_configuration(
        self,
        spacing: np.ndarray | Sequence[float],
        median_shape: np.ndarray | Sequence[int],
        data_identifier: str,
        approximate_n_voxels_dataset: float,
        _cache: dict,
    ) -> dict:
        dims = len(spacing)
        ratio = memory_ratio(dims)
        # the engine sizes patch and batch for its U-Net; a budget divided by MedNeXt's traced
        # memory ratio makes the same search size them for MedNeXt
        self.UNet_vram_target_GB = self.memory_target_gb / ratio
        try:
            plan = super().get_plans_for_configuration(
                spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache
            )
        finally:
            self.UNet_vram_target_GB = self.memory_target_gb
        strides = stage_strides_from_engine(plan["architecture"]["arch_kwargs"]["strides"], dims)
        plan["architecture"] = architecture_entry(mednext_arch_kwargs(dims, strides))
        plan["mednext"] = {"recipe": self.recipe, "memory_target_gb": self.memory_target_gb, "memory_ratio": ratio}
        _check_divisible(plan["patch_size"], strides)
        return plan

    def plan_experiment(self) -> dict:
        plans = super().plan_experiment()
        for cfg in plans["configurations"].values():
            if "architecture" in cfg:
                cfg["batch_dice"] = True  # the reference's Dice is computed over the whole batch
        self.save_plans(plans)
        return plans


class MedNeXtPaperPlanner(MedNeXtPlanner):
    """Recipe ``paper``: 1 mm isotropic, 128^3 patch (512^2 in 2D), batch 2, as the reference."""

    recipe = "paper"

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8, **kwargs: Any) -> None:
        kwargs.setdefault("plans_name", PLANS_PAPER)
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, **kwargs)

    def determine_fullres_target_spacing(self) -> np.ndarray:
        target = np.asarray(super().determine_fullres_target_spacing(), dtype=float)
        shapes = np.vstack(self.dataset_fingerprint["shapes_after_crop"])
        # 2D datasets have one slice along axis 0 with a dummy spacing: keep that axis as it is
        flat = np.all(shapes == 1, axis=0)
        return np.where(flat, target, PAPER_SPACING_MM)

    def get_plans_for_configuration(
        self,
        spacing: np.ndarray | Sequence[float],
        median_shape: np.ndarray | Sequence[int],
        data_identifier: str,
        approximate_n_voxels_dataset: float,
        _cache: dict,
    ) -> dict:
        dims = len(spacing)
        plan = ExperimentPlanner.get_plans_for_configuration(
            self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache
        )
        strides = [[2] * dims for _ in range(NUM_STAGES)]
        plan["patch_size"] = list(PAPER_PATCH[dims])
        plan["batch_size"] = PAPER_BATCH
        plan["architecture"] = architecture_entry(mednext_arch_kwargs(dims, strides))
        plan["mednext"] = {"recipe": self.recipe}
        _check_divisible(plan["patch_size"], strides)
        return plan


PLANNERS = {"auto": MedNeXtPlanner, "paper": MedNeXtPaperPlanner}


def _check_divisible(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> None:
    div = total_stride(strides)
    if any(int(p) % d for p, d in zip(patch, div)):
        raise RuntimeError(f"planned patch {list(patch)} is not divisible by the network's total stride {div}")
