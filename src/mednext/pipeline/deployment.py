"""What a deployed model needs besides its weights, from a results folder: :func:`deployment_info`.

``mednext export`` writes it beside the exported file (``<file>.json``) and into the file itself
(ONNX metadata property / TorchScript extra file ``mednext_deployment``), so that the exported
network can be run on a raw image without mednext or nnU-Net: axis order, target spacing, the
normalisation of each channel with its intensity statistics, patch size, sliding-window step and
Gaussian, test-time mirroring axes, 2.5D context slices and the label names.
``docs/deploy.md`` shows a script that does this with onnxruntime, numpy and SimpleITK.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from mednext.errors import CheckpointError
from mednext.pipeline.context import context_slices_of
from mednext.pipeline.predictor import load_nnunet_checkpoint

__all__ = ["DEPLOYMENT_FORMAT", "DEPLOYMENT_KEY", "deployment_info", "results_folder_of_checkpoint"]

DEPLOYMENT_KEY = "mednext_deployment"
DEPLOYMENT_FORMAT = 1
# The engine's sliding window: tiles overlap by half a patch, weighted by a Gaussian with sigma 1/8 of
# the patch (mednext predict's defaults).
TILE_STEP_SIZE = 0.5
GAUSSIAN_SIGMA_SCALE = 1.0 / 8


def results_folder_of_checkpoint(checkpoint: str | os.PathLike) -> Path | None:
    """The results folder (``<trainer>__<plans>__<configuration>``) holding ``checkpoint`` in one of its
    ``fold_*`` folders, or None when the checkpoint does not sit in one."""
    folder = Path(checkpoint).resolve().parent.parent
    if Path(checkpoint).resolve().parent.name.startswith("fold_") and (folder / "plans.json").is_file():
        return folder
    return None


def deployment_info(results_folder: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The preprocessing, sliding-window and label facts of a trained model, as plain JSON data.

    ``results_folder`` is named ``<trainer>__<plans>__<configuration>`` and holds ``plans.json`` and
    ``dataset.json``; ``checkpoint`` (one of its ``fold_*/checkpoint_*.pth``) gives the test-time
    mirroring axes the training allowed (every axis when None or when it does not say).
    """
    folder = Path(results_folder)
    parts = folder.name.split("__")
    missing = [name for name in ("plans.json", "dataset.json") if not (folder / name).is_file()]
    if len(parts) != 3 or missing:
        raise CheckpointError(
            f"{folder} is not a results folder named <trainer>__<plans>__<configuration> with plans.json and "
            "dataset.json; pass --results-folder with the folder the checkpoint was trained in"
        )
    trainer, plans_name, configuration = parts
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    if configuration not in plans.get("configurations", {}):
        raise CheckpointError(f"{folder / 'plans.json'} has no configuration {configuration!r} (the folder's name)")
    manager = PlansManager(plans)
    conf = manager.get_configuration(configuration).configuration
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    intensities = plans.get("foreground_intensity_properties_per_channel", {})
    normalization = []
    for c, scheme in enumerate(conf["normalization_schemes"]):
        entry = {"scheme": scheme, "use_mask": bool(conf["use_mask_for_norm"][c])}
        if str(c) in intensities:
            entry["intensity_properties"] = {k: float(v) for k, v in intensities[str(c)].items()}
        normalization.append(entry)
    labels = dataset_json["labels"]
    if any(not isinstance(v, int) for v in labels.values()):
        raise CheckpointError(
            f"{folder / 'dataset.json'} 'labels' use regions (lists of values); deployment info covers one "
            "value per label only, use mednext predict for region-based models"
        )
    class_values = sorted(v for k, v in labels.items() if k != "ignore")
    patch = [int(p) for p in conf["patch_size"]]
    mirror_axes = list(range(len(patch)))
    if checkpoint is not None:
        saved = load_nnunet_checkpoint(checkpoint).get("inference_allowed_mirroring_axes")
        if saved is not None:
            mirror_axes = [int(a) for a in saved]
    return {
        "format": DEPLOYMENT_FORMAT,
        "dataset": plans.get("dataset_name", folder.parent.name),
        "trainer": trainer,
        "plans": plans_name,
        "configuration": configuration,
        "channel_names": {str(k): v for k, v in channels.items()},
        "labels": labels,
        "class_values": class_values,
        "file_ending": dataset_json["file_ending"],
        "axis_order": "SimpleITK array order (z, y, x) after transpose_forward",
        "transpose_forward": [int(a) for a in plans["transpose_forward"]],
        "transpose_backward": [int(a) for a in plans["transpose_backward"]],
        "spacing": [float(s) for s in conf["spacing"]],
        "patch_size": patch,
        "normalization": normalization,
        "crop_to_nonzero": True,
        "context_slices": context_slices_of(conf),
        "tile_step_size": TILE_STEP_SIZE,
        "gaussian_sigma_scale": GAUSSIAN_SIGMA_SCALE,
        "mirror_axes": mirror_axes,
        "resampling": {
            "data": {"fn": conf.get("resampling_fn_data"), "kwargs": conf.get("resampling_fn_data_kwargs")},
            "probabilities": {
                "fn": conf.get("resampling_fn_probabilities"),
                "kwargs": conf.get("resampling_fn_probabilities_kwargs"),
            },
        },
    }
