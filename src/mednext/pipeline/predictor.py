"""Prediction with a trained MedNeXt: :class:`MedNeXtPredictor`, nnU-Net v2's predictor with our network.

A results folder is nnU-Net v2's standard one,
``<results>/Dataset{ID}_{Name}/{trainer}__{plans}__{configuration}/``, holding ``plans.json``,
``dataset.json`` and ``fold_{f}/checkpoint_{final,best,latest}.pth``. The plans name the network
(``mednext.nn.MedNeXt``) and its arguments, so the folder alone rebuilds the model. The engine
(``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor``) does preprocessing, fold ensembling
and export back to each input's geometry; :class:`MedNeXtPredictor` overrides its public methods to
rebuild our network from the plans, to stack neighbouring slices for 2.5D models and, on the CPU,
to run the Gaussian-weighted sliding window with mirroring several tiles per network forward.

Beside the class: finding trained models in the results folder (:func:`find_trained_models`,
:func:`resolve_trained_model`), choosing checkpoints (:func:`select_checkpoints`), and
:func:`predict`, what ``mednext predict`` runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch._dynamo import OptimizedModule

from mednext.errors import CheckpointError, UnsafePathError
from mednext.files import atomic_write_json, folder_lock, inside, remove_stale_temporaries, resolve_device
from mednext.memory import keeps_freed_memory, reuse_freed_memory
from mednext.nn import MedNeXt, safe_torch_load
from mednext.pipeline.body import check_ct_for_body_crop, compose_with_engine_crop, crop_to_body
from mednext.pipeline.cohort import Progress, check_parts, finished_cases, record_name, run_cases, select_part
from mednext.pipeline.context import context_slices_of, stack_neighbour_slices
from mednext.pipeline.datasets import DATASET_NAME
from mednext.pipeline.integrity import check_complete, check_file_finite
from mednext.pipeline.io import InputCase, collect_input_cases, image_ending
from mednext.pipeline.workdir import results_folder as engine_results_folder
from mednext.pipeline.workdir import use_workdir

NETWORK_CLASS_NAMES = ("mednext.nn.MedNeXt", "mednext.nn.mednext.MedNeXt")
CHECKPOINTS = {
    "final": "checkpoint_final.pth",
    "best": "checkpoint_best.pth",
    "latest": "checkpoint_latest.pth",
}
_TRAINER = re.compile(r"^MedNeXtTrainer_(?P<model>[SBML]|V2Base|V2Wide)k(?P<kernel>\d+)")
_MODEL_NAMES = {"V2Base": "V2-BASE", "V2Wide": "V2-WIDE"}  # class-name token -> preset


@dataclass(frozen=True)
class TrainedModel:
    """One trained model's results folder and the parts of its name."""

    folder: Path
    dataset_name: str
    trainer: str
    plans: str
    configuration: str

    @property
    def model(self) -> str | None:
        match = _TRAINER.match(self.trainer)
        return _MODEL_NAMES.get(match["model"], match["model"]) if match else None

    @property
    def kernel(self) -> int | None:
        match = _TRAINER.match(self.trainer)
        return int(match["kernel"]) if match else None

    def folds(self, checkpoint: str = "final") -> list[int | str]:
        """Folds whose folder holds ``checkpoint``; numbered folds first, 'all' only if none is numbered."""
        name = CHECKPOINTS[checkpoint]
        numbered = sorted(
            int(p.name[5:]) for p in self.folder.glob("fold_*") if p.name[5:].isdigit() and (p / name).is_file()
        )
        if numbered:
            return list(numbered)
        return ["all"] if (self.folder / "fold_all" / name).is_file() else []


NON_FINITE_IN_PREDICTION = (
    "the network cannot segment them (a prediction would be wrong without a word); replace them, e.g. with "
    "numpy.nan_to_num and a value that means 'no signal' in this modality, and predict again"
)

# ----------------------------------------------------------------------------- finding a model


def dataset_name(dataset: str | int) -> str:
    """``Dataset901_Lesions`` for ``901``, ``'901'`` or the name itself (needs :func:`use_workdir` first).

    A name is a name, never a path: the model is loaded from the working folder's results only."""
    text = str(dataset).strip()
    if not (text.isdigit() or DATASET_NAME.match(text)):
        raise UnsafePathError(
            f"--dataset {text!r}: give the dataset's name (Dataset901_Name) or id (901), not a path; the "
            "trained model is read from the working folder's results (--workdir)"
        )
    try:
        return str(maybe_convert_to_dataset_name(dataset))
    except (RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise ValueError(
            f"dataset {dataset!r}: {first} Give the dataset's name (Dataset901_Name) or id, "
            "and the --workdir it was trained in."
        ) from err


def find_trained_models(
    dataset: str | int,
    configuration: str | None = None,
    model: str | None = None,
    kernel: int | None = None,
    plans: str | None = None,
    results_folder: str | os.PathLike | None = None,
) -> list[TrainedModel]:
    """Every MedNeXt results folder of ``dataset`` that matches the given filters (in ``results_folder``,
    default: the engine's results folder in use)."""
    name = dataset_name(dataset)
    root = Path(results_folder if results_folder is not None else engine_results_folder()) / name
    found = []
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            parts = folder.name.split("__")
            if len(parts) != 3 or not parts[0].startswith("MedNeXtTrainer"):
                continue
            trained = TrainedModel(folder, name, *parts)
            if configuration is not None and trained.configuration != configuration:
                continue
            if model is not None and trained.model != model.upper():
                continue
            if kernel is not None and trained.kernel != int(kernel):
                continue
            if plans is not None and trained.plans != plans:
                continue
            found.append(trained)
    return found


def resolve_trained_model(
    dataset: str | int,
    configuration: str | None = None,
    model: str | None = None,
    kernel: int | None = None,
    plans: str | None = None,
) -> TrainedModel:
    """The one trained model that matches; a ValueError listing candidates and the flags otherwise."""
    matches = find_trained_models(dataset, configuration, model, kernel, plans)
    if len(matches) == 1:
        return matches[0]
    name = dataset_name(dataset)
    wanted = ", ".join(
        f"{flag} {value}"
        for flag, value in (
            ("--config", configuration),
            ("--model", model),
            ("--kernel", kernel),
            ("--plans", plans),
        )
        if value is not None
    )
    if not matches:
        every = find_trained_models(dataset)
        listing = "".join(f"\n  {m.folder}" for m in every) or " none"
        raise ValueError(
            f"no trained MedNeXt model of {name} in {engine_results_folder() / name}"
            + (f" matches {wanted}" if wanted else "")
            + f". Trained models there:{listing}\nTrain one with `mednext train`, or pick one of these."
        )
    listing = "".join(
        f"\n  --config {m.configuration} --model {m.model} --kernel {m.kernel} --plans {m.plans}   ({m.folder.name})"
        for m in matches
    )
    raise ValueError(
        f"{len(matches)} trained MedNeXt models of {name} match"
        + (f" {wanted}" if wanted else "")
        + f"; choose one with --config/--model/--kernel/--plans:{listing}"
    )


# ----------------------------------------------------------------------------- checkpoints


def select_checkpoints(
    folder: str | os.PathLike, folds: Sequence[int | str] | None = None, checkpoint: str = "final"
) -> list[tuple[int | str, Path]]:
    """``(fold, checkpoint file)`` for each requested fold (default: every fold that has ``checkpoint``).

    A FileNotFoundError names the missing fold or file and what the folder does hold.
    """
    folder = Path(folder)
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"--checkpoint {checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    name = CHECKPOINTS[checkpoint]
    if not folds:
        parts = folder.name.split("__")
        folds = TrainedModel(folder, folder.parent.name, *parts).folds(checkpoint) if len(parts) == 3 else []
        if not folds:
            present = ", ".join(str(p.relative_to(folder)) for p in sorted(folder.glob("fold_*/*.pth"))) or "none"
            raise FileNotFoundError(
                f"{folder} has no fold with {name} (checkpoints present: {present}); "
                "finish training, or choose another --checkpoint (final, best, latest)"
            )
    selected = []
    for f in folds:
        f = "all" if str(f) == "all" else int(f)
        path = folder / f"fold_{f}" / name
        if not path.is_file():
            if not path.parent.is_dir():
                have = ", ".join(sorted(p.name for p in folder.glob("fold_*") if p.is_dir())) or "none"
                raise FileNotFoundError(
                    f"{path.parent} does not exist: fold {f} was not trained (folds present: {have}); "
                    "train it or drop it from --fold"
                )
            have = ", ".join(sorted(p.name for p in path.parent.glob("checkpoint_*.pth"))) or "none"
            raise FileNotFoundError(
                f"{path} is missing (fold {f} holds: {have}); choose another --checkpoint "
                "(final, best, latest) or train the fold to the end"
            )
        selected.append((f, path))
    return selected


def load_nnunet_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """An nnU-Net v2 checkpoint (``network_weights``, training log, ...), loaded without running pickled code."""
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointError(f"{path} is not an nnU-Net v2 checkpoint: it has no 'network_weights' entry")
    return checkpoint


# ----------------------------------------------------------------------------- the network


def build_network(plans: dict, configuration: str, dataset_json: dict) -> MedNeXt:
    """Our network as the plans describe it, with deep supervision off, in eval mode."""
    plans_manager = PlansManager(plans)
    if configuration not in plans.get("configurations", {}):
        raise ValueError(
            f"plans.json has no configuration {configuration!r}; it has {', '.join(plans.get('configurations', {}))}"
        )
    configuration_manager = plans_manager.get_configuration(configuration)
    arch = plans["configurations"][configuration].get("architecture")
    if arch is None:
        # inherited configurations keep the architecture in the parent; the manager resolved it
        arch = configuration_manager.configuration.get("architecture", {})
    if arch.get("network_class_name") not in NETWORK_CLASS_NAMES:
        raise ValueError(
            f"plans.json configuration {configuration!r} names network {arch.get('network_class_name')!r}, "
            f"not {NETWORK_CLASS_NAMES[0]}; this folder was not trained by mednext (use nnUNetv2_predict for it)"
        )
    kwargs = dict(arch.get("arch_kwargs", {}))
    in_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    in_channels *= 2 * context_slices_of(configuration_manager.configuration) + 1  # 2.5D: neighbours as channels
    num_classes = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = MedNeXt(in_channels=in_channels, num_classes=num_classes, **kwargs)
    network.set_deep_supervision(False)
    return network.eval()


def _match_heads(network: MedNeXt, state_dict: dict[str, torch.Tensor]) -> MedNeXt:
    """Rebuild with or without the deep-supervision heads so that ``state_dict`` fits (they do not change out_0)."""
    has_heads = any(k.startswith("out_1.") for k in state_dict)
    if has_heads != hasattr(network, "out_1"):
        config = dict(network.config, deep_supervision=has_heads)
        network = MedNeXt(**config)
        network.set_deep_supervision(False)
        network.eval()
    return network


def network_from_results_folder(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> MedNeXt:
    """The network that ``folder``'s plans describe (``<trainer>__<plans>__<configuration>``), holding
    ``state_dict``, in eval mode. The plans, not the weights, fix what weights cannot show (strides)."""
    folder = Path(folder)
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ValueError(f"{folder} is not a results folder named <trainer>__<plans>__<configuration>")
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    network = _match_heads(build_network(plans, parts[2], dataset_json), state_dict)
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights do not fit the network that {folder / 'plans.json'} describes: "
            f"{str(err).splitlines()[0]} ... (give the --results-folder they were trained in)"
        ) from err
    return network.eval()


# ----------------------------------------------------------------------------- the predictor


def _check_tile_batch(tile_batch: int) -> None:
    if tile_batch < 1:
        raise ValueError(f"--tile-batch {tile_batch} must be at least 1 (tiles per network forward)")


def _mirror_combinations(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """The engine's test-time mirroring: no flip, then every non-empty combination of ``axes``."""
    import itertools

    axes = list(axes or [])
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


class MedNeXtPredictor(nnUNetPredictor):
    """nnU-Net v2's predictor for MedNeXt results folders, with a batched sliding window on the CPU.

    Overrides the engine's public methods:

    * :meth:`initialize_from_trained_model_folder` rebuilds :class:`mednext.nn.MedNeXt` from the
      folder's plans (the engine would look for the trainer class) and loads the folds' checkpoints
      without running pickled code;
    * :meth:`predict_logits_from_preprocessed_data` stacks neighbouring slices as channels for 2.5D
      models and averages the folds (on the CPU inside :func:`mednext.memory.reuse_freed_memory`);
    * :meth:`predict_sliding_window_return_logits` runs the engine's tiles, Gaussian, mirroring and
      float16 sums, ``tile_batch`` tiles per network forward, on the CPU and on CUDA (float16
      autocast there, as the engine). On the CPU with ``tile_batch=1`` the logits equal the
      engine's bit for bit; more tiles per forward change the network's float32 rounding only.
      MPS uses the engine's own sliding window.

    :meth:`prepare_case`, :meth:`logits_of_prepared` and :meth:`export_case` are the three stages of
    one case, which :func:`mednext.pipeline.cohort.run_cases` overlaps across a cohort;
    :attr:`window_progress` is told how far the sliding window has come.

    ``device`` is resolved by :func:`mednext.files.resolve_device` (None: CUDA, then MPS, then CPU).
    ``accumulate_dtype`` is the dtype the weighted logits are summed in on the CPU: float16 as the
    engine does, or float32 for sums that do not lose precision where only tile rims overlap.
    """

    def __init__(
        self,
        tile_step_size: float = 0.5,
        use_gaussian: bool = True,
        use_mirroring: bool = True,
        perform_everything_on_device: bool | None = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
        verbose_preprocessing: bool = False,
        allow_tqdm: bool = False,
        *,
        tile_batch: int = 2,
        accumulate_dtype: torch.dtype = torch.float16,
    ) -> None:
        if not 0 < tile_step_size <= 1:
            raise ValueError(f"--step {tile_step_size} must be in (0, 1] (fraction of the patch between windows)")
        _check_tile_batch(tile_batch)
        torch_device = resolve_device(device)
        if perform_everything_on_device is None:
            perform_everything_on_device = torch_device.type == "cuda"
        with contextlib.redirect_stdout(io.StringIO()):  # the engine prints a note about non-CUDA devices
            super().__init__(
                tile_step_size, use_gaussian, use_mirroring, perform_everything_on_device, torch_device,
                verbose, verbose_preprocessing, allow_tqdm,
            )  # fmt: skip
        self.tile_batch = int(tile_batch)
        self.accumulate_dtype = accumulate_dtype
        # called with (forwards done, forwards in all, fold index, folds) during a sliding window
        self.window_progress: Callable[[int, int, int, int], Any] | None = None
        self._fold_index = 0

    @classmethod
    def from_predictor(
        cls, predictor: nnUNetPredictor, tile_batch: int = 2, accumulate_dtype: torch.dtype | None = None
    ) -> MedNeXtPredictor:
        """A MedNeXtPredictor with the settings, network and weights of an initialised engine predictor
        (e.g. one a trainer set up with ``manual_initialization``); ``accumulate_dtype`` None keeps the
        predictor's (float16 for the engine's own)."""
        if accumulate_dtype is None:
            accumulate_dtype = getattr(predictor, "accumulate_dtype", torch.float16)
        adopted = cls(
            predictor.tile_step_size, predictor.use_gaussian, predictor.use_mirroring,
            predictor.perform_everything_on_device, predictor.device, predictor.verbose,
            predictor.verbose_preprocessing, predictor.allow_tqdm, tile_batch=tile_batch,
            accumulate_dtype=accumulate_dtype,
        )  # fmt: skip
        adopted.manual_initialization(
            predictor.network, predictor.plans_manager, predictor.configuration_manager,
            predictor.list_of_parameters, predictor.dataset_json, predictor.trainer_name,
            predictor.allowed_mirroring_axes,
        )  # fmt: skip
        return adopted

    # ------------------------------------------------------------------ the engine's hooks

    def initialize_from_trained_model_folder(
        self,
        model_training_output_dir: str | os.PathLike,
        use_folds: Sequence[int | str] | int | str | None,
        checkpoint_name: str = "checkpoint_final.pth",
    ) -> None:
        """Rebuild our network from ``model_training_output_dir``'s plans and load ``use_folds``' checkpoints.

        ``use_folds`` None: every fold that holds ``checkpoint_name``. The configuration and trainer
        come from the folder's name ``<trainer>__<plans>__<configuration>``; the test-time mirroring
        axes from the first checkpoint (every axis when it does not say).
        """
        folder = Path(model_training_output_dir)
        parts = folder.name.split("__")
        if len(parts) != 3:
            raise ValueError(f"{folder} is not a results folder named <trainer>__<plans>__<configuration>")
        trainer_name, _, configuration = parts
        for required in ("plans.json", "dataset.json"):
            if not (folder / required).is_file():
                raise FileNotFoundError(f"{folder / required} is missing; the results folder is incomplete")
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
        dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        if isinstance(use_folds, (int, str)):
            use_folds = [use_folds]
        checkpoint = {name: key for key, name in CHECKPOINTS.items()}.get(checkpoint_name, checkpoint_name)
        checkpoints = select_checkpoints(folder, use_folds, checkpoint)

        plans_manager = PlansManager(plans)
        network = build_network(plans, configuration, dataset_json)
        parameters: list[dict[str, torch.Tensor]] = []
        mirror_axes: tuple[int, ...] | None = None
        for i, (_, path) in enumerate(checkpoints):
            loaded = load_nnunet_checkpoint(path)
            weights = loaded["network_weights"]
            if i == 0:
                network = _match_heads(network, weights)
                patch_dims = len(plans_manager.get_configuration(configuration).patch_size)
                # A checkpoint without the entry predates it: allow every axis, as nnU-Net's trainer does by default.
                mirror_axes = loaded.get("inference_allowed_mirroring_axes", tuple(range(patch_dims)))
            try:
                network.load_state_dict(weights)
            except RuntimeError as err:
                raise CheckpointError(
                    f"{path} does not fit the network that {folder / 'plans.json'} describes: "
                    f"{str(err).splitlines()[0]} ... (retrain, or restore the plans.json it was trained with)"
                ) from err
            parameters.append(weights)
        self.manual_initialization(
            network,
            plans_manager,
            plans_manager.get_configuration(configuration),
            parameters,
            dataset_json,
            trainer_name,
            tuple(mirror_axes) if mirror_axes is not None else None,
        )

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """Logits of one preprocessed case ``(channels, *spatial)`` on the CPU: the mean over the folds' weights.

        A 2.5D model's input gets each slice's neighbours as channels first
        (:mod:`mednext.pipeline.context`). On the CPU the folds run inside
        :func:`mednext.memory.reuse_freed_memory`.
        """
        data = stack_neighbour_slices(data, context_slices_of(self.configuration_manager.configuration))
        network = self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network
        total = None
        with reuse_freed_memory(keeps_freed_memory(self.device)):
            for i, params in enumerate(self.list_of_parameters):
                self._fold_index = i
                network.load_state_dict(params)
                # each fold's logits leave the device, so that the next fold has its memory
                logits = self.predict_sliding_window_return_logits(data).to("cpu")
                total = logits if total is None else total.add_(logits)
        assert total is not None
        if len(self.list_of_parameters) > 1:
            total /= len(self.list_of_parameters)
        return total

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """The Gaussian-weighted sliding window with mirroring over ``input_image`` ``(channels, *spatial)``.

        The engine's tiles (``compute_steps_for_sliding_window`` after zero-padding to the patch) in
        the engine's order, its Gaussian (sigma 1/8 of the patch, peak 10, float16 values), its
        mirroring (mean of the plain and every mirrored prediction) and its float16 sums, with
        :attr:`tile_batch` tiles per network forward. A 2D patch on 3D data slides over every
        slice, as in the engine. On CUDA the network runs under float16 autocast and the sums stay
        on the GPU (``perform_everything_on_device``), falling back to sums in CPU memory when the
        GPU's memory does not hold them, as the engine does. On MPS the engine's own sliding window
        runs. Returns logits ``(classes, *spatial)`` in :attr:`accumulate_dtype`.
        """
        if self.device.type == "mps":
            return super().predict_sliding_window_return_logits(input_image)
        if self.device.type == "cpu":
            with reuse_freed_memory(keeps_freed_memory(self.device)):
                return self._batched_sliding_window(input_image, self.device)
        self.network = self.network.to(self.device)
        if not self.perform_everything_on_device:
            return self._batched_sliding_window(input_image, torch.device("cpu"))
        try:
            return self._batched_sliding_window(input_image, self.device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return self._batched_sliding_window(input_image, torch.device("cpu"))

    # ------------------------------------------------------------------ our additions

    def _batched_sliding_window(self, input_image: torch.Tensor, results_device: torch.device) -> torch.Tensor:
        network = self.network.eval()
        patch = tuple(int(p) for p in self.configuration_manager.patch_size)
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        data, revert = pad_nd_image(input_image, patch, "constant", {"value": 0}, True, None)
        data = data.to(results_device)
        spatial = data.shape[1:]
        slicers: list[tuple] = []
        if len(patch) < len(spatial):  # 2D network on a 3D volume: every slice, as the engine does
            steps = compute_steps_for_sliding_window(spatial[1:], patch, self.tile_step_size)
            for d in range(spatial[0]):
                for sx in steps[0]:
                    for sy in steps[1]:
                        slicers.append((slice(None), d, slice(sx, sx + patch[0]), slice(sy, sy + patch[1])))
        else:
            steps = compute_steps_for_sliding_window(spatial, patch, self.tile_step_size)
            for start in np.stack(np.meshgrid(*steps, indexing="ij"), -1).reshape(-1, len(patch)):
                slicers.append((slice(None), *(slice(int(s), int(s) + p) for s, p in zip(start, patch))))
        if self.use_gaussian:  # float16 values, as the engine weights with them
            weight = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=results_device)
        else:
            weight = torch.ones(patch, dtype=torch.float16, device=results_device)
        flips = _mirror_combinations([a + 2 for a in mirror_axes] if mirror_axes else None)
        dtype = self.accumulate_dtype if results_device.type == "cpu" else torch.float16
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *spatial), dtype=dtype, device=results_device)
        weights = torch.zeros(spatial, dtype=dtype, device=results_device)
        autocast = (
            torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        forwards = -(-len(slicers) // self.tile_batch)
        for index, first in enumerate(range(0, len(slicers), self.tile_batch)):
            group = slicers[first : first + self.tile_batch]
            x = torch.stack([data[sl] for sl in group]).to(self.device, non_blocking=True)
            with autocast:
                prediction = network(x)
                for axes in flips[1:]:
                    prediction += torch.flip(network(torch.flip(x, axes)), axes)
            prediction = prediction.to(results_device)
            if len(flips) > 1:
                prediction /= len(flips)
            if self.use_gaussian:
                prediction *= weight
            for sl, tile in zip(group, prediction):  # tile by tile, in the engine's order and rounding
                logits[sl] += tile
                weights[sl[1:]] += weight
            if self.window_progress is not None:
                self.window_progress(index + 1, forwards, self._fold_index, len(self.list_of_parameters or [None]))
        torch.div(logits, weights, out=logits)
        if torch.isinf(logits).any():
            raise RuntimeError(
                "the summed logits overflowed float16 (inf); predict with accumulate_dtype=torch.float32 "
                "(the engine stops with the same error here)"
            )
        return logits[(slice(None), *revert[1:])]

    def read_case(self, case: InputCase) -> tuple[np.ndarray, dict]:
        """The case's channel files read by the plans' reader; a ValueError names the file and the fix."""
        for f in case.files:
            check_complete(f)
        reader = self.plans_manager.image_reader_writer_class()
        log = io.StringIO()  # the engine's readers print their complaints before raising
        try:
            with contextlib.redirect_stdout(log):
                data, properties = reader.read_images([str(f) for f in case.files])
        except Exception as err:
            try:
                counts = _channels_per_file(reader, case)
            except Exception:
                counts = [1] * len(case.files)
            if any(c != 1 for c in counts):
                raise _channel_error(case, counts) from err
            detail = " ".join(log.getvalue().split())[:300]
            raise ValueError(
                f"could not read case '{case.case_id}' ({', '.join(str(f) for f in case.files)}): "
                f"{err or type(err).__name__} {detail}".strip()
            ) from err
        if data.shape[0] != len(case.files):
            counts = _channels_per_file(reader, case) if len(case.files) > 1 else [data.shape[0]]
            raise _channel_error(case, counts)
        for f, channel in zip(case.files, data):
            check_file_finite(f, NON_FINITE_IN_PREDICTION, array=channel)
        return data, properties

    def prepare_case(self, case: InputCase, crop_body: bool = False) -> tuple[np.ndarray, dict]:
        """Read and preprocess one case: ``(data, properties)`` as the engine's preprocessor returns them.

        ``crop_body``: keep only the box around the patient's body (CT; :mod:`mednext.pipeline.body`);
        the properties then map the prediction back onto the input's full grid.
        """
        data, properties = self.read_case(case)
        body_box = None
        if crop_body:
            full_shape = data.shape[1:]
            data, body_box = crop_to_body(data, properties)
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(
            data, None, properties, self.plans_manager, self.configuration_manager, self.dataset_json
        )
        if body_box is not None:
            compose_with_engine_crop(properties, body_box, full_shape, self.plans_manager.transpose_forward)
        return data, properties

    def logits_of_prepared(self, data: np.ndarray) -> torch.Tensor:
        """The network's logits (CPU tensor) of a case that :meth:`prepare_case` returned."""
        return self.predict_logits_from_preprocessed_data(torch.from_numpy(data))

    def export_case(
        self, logits: torch.Tensor, properties: dict, output_truncated: str | os.PathLike, save_probabilities: bool
    ) -> list[Path]:
        """Resample ``logits`` back to the input's grid and write ``<output_truncated><ending>`` (and
        the ``.npz``/``.pkl`` probabilities when asked); returns the written files."""
        export_prediction_from_logits(
            logits,
            properties,
            self.configuration_manager,
            self.plans_manager,
            self.dataset_json,
            str(output_truncated),
            save_probabilities,
            num_threads_torch=max(1, torch.get_num_threads()),
        )
        ending = self.dataset_json["file_ending"]
        written = [Path(f"{output_truncated}{ending}")]
        if save_probabilities:
            written += [Path(f"{output_truncated}.npz"), Path(f"{output_truncated}.pkl")]
        return written

    def predict_case(
        self,
        case: InputCase,
        output_truncated: str | os.PathLike,
        save_probabilities: bool = False,
        crop_body: bool = False,
    ) -> list[Path]:
        """Read, preprocess, predict and export one case; returns the written files
        (``<output_truncated><ending>``, and ``.npz``/``.pkl`` probabilities when asked).

        ``crop_body``: predict only inside the box around the patient's body (CT; :mod:`mednext.pipeline.body`);
        the output keeps the input's full grid, background outside the box.
        """
        data, properties = self.prepare_case(case, crop_body)
        logits = self.logits_of_prepared(data)
        del data
        return self.export_case(logits, properties, output_truncated, save_probabilities)


# ----------------------------------------------------------------------------- predicting files


def _channels_per_file(reader: Any, case: InputCase) -> list[int]:
    counts = []
    for f in case.files:
        with contextlib.redirect_stdout(io.StringIO()):
            counts.append(reader.read_images([str(f)])[0].shape[0])
    return counts


def _channel_error(case: InputCase, counts: list[int]) -> ValueError:
    detail = ", ".join(f"{f.name}: {c}" for f, c in zip(case.files, counts) if c != 1)
    return ValueError(
        f"case '{case.case_id}' holds {sum(counts)} channel(s) ({detail}) but the model was trained on "
        f"{len(case.files)} (dataset.json 'channel_names'), one single-channel image per file; split "
        "multi-channel (4D or colour) images into one file per channel"
    )


def predict_case(
    predictor: nnUNetPredictor,
    case: InputCase,
    output_truncated: str | os.PathLike,
    save_probabilities: bool = False,
    tile_batch: int = 2,
    crop_body: bool = False,
) -> list[Path]:
    """:meth:`MedNeXtPredictor.predict_case` with ``tile_batch`` tiles per forward on the CPU, for any
    initialised engine predictor (one that is not a :class:`MedNeXtPredictor` is adopted with
    :meth:`MedNeXtPredictor.from_predictor`, network and weights shared)."""
    if not isinstance(predictor, MedNeXtPredictor) or predictor.tile_batch != tile_batch:
        predictor = MedNeXtPredictor.from_predictor(predictor, tile_batch)
    return predictor.predict_case(case, output_truncated, save_probabilities, crop_body)


def predict(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    dataset: str | int,
    configuration: str | None = None,
    folds: Sequence[int | str] | None = None,
    model: str | None = None,
    kernel: int | None = None,
    plans: str | None = None,
    checkpoint: str = "final",
    device: str | torch.device | None = None,
    tta: bool = True,
    step_size: float = 0.5,
    save_probabilities: bool = False,
    workdir: str | os.PathLike | None = None,
    log: Any = print,
    tile_batch: int = 2,
    crop_body: bool = False,
    allow_irregular_slices: bool = False,
    continue_prediction: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    progress_bar: bool | None = None,
    overlap: bool | None = None,
) -> list[Path]:
    """Segment every case in ``input_path`` with a trained MedNeXt and return the written segmentations.

    ``crop_body`` (CT only): predict inside the box around the patient's body, background outside it
    (:mod:`mednext.pipeline.body`), for scans whose field of view is wider than the training scans'.

    ``output`` is a folder (created if needed) that receives ``<case><ending>`` per case, or, for a
    single case, a file path ending in the dataset's file ending. Every file is written to a temporary
    name in the same folder and moved into place, so a failed run leaves no partial output.
    ``tile_batch``: sliding-window tiles per network forward (:class:`MedNeXtPredictor`).
    ``allow_irregular_slices``: resample a DICOM series with missing, duplicate or unevenly spaced
    slices onto a regular grid instead of refusing it (:func:`mednext.pipeline.io.cases_from_dicom`).

    A cohort (:mod:`mednext.pipeline.cohort`): ``continue_prediction`` skips the cases already
    segmented in ``output`` with the same model and settings; ``num_parts``/``part_id`` segment
    every ``num_parts``-th case only, so that several machines share a folder of cases;
    ``progress_bar`` shows bars on standard error (None: when it is a terminal and ``log`` is
    ``print``); ``overlap`` reads the next case and writes the previous one while the network runs
    (None: on a GPU, not on the CPU, where the network's threads already use every core and any
    other busy thread slows it down several times over; docs/benchmarks.md).
    """
    _check_tile_batch(tile_batch)
    check_parts(num_parts, part_id)
    dirs = use_workdir(workdir)
    if dirs.describe():
        log(dirs.describe())
    trained = resolve_trained_model(dataset, configuration, model, kernel, plans)
    dataset_json = json.loads((trained.folder / "dataset.json").read_text(encoding="utf-8"))
    if crop_body:
        check_ct_for_body_crop(
            json.loads((trained.folder / "plans.json").read_text(encoding="utf-8")), trained.configuration
        )
    ending = dataset_json["file_ending"]
    output = Path(output)
    single_file = image_ending(output) is not None
    out_dir = output.parent if single_file else output
    if single_file and image_ending(output) != ending.lower():
        raise ValueError(
            f"output {output} has ending '{image_ending(output)}' but the model writes '{ending}' files "
            f"(dataset.json 'file_ending'); name the output file *{ending} or give a folder"
        )
    if single_file and (continue_prediction or num_parts > 1):
        raise ValueError(
            f"--continue-prediction and --num-parts apply to a folder of cases; give a folder as output, not {output}"
        )
    if progress_bar is None:
        progress_bar = log is print and sys.stderr.isatty()
    request = _Request(
        trained, dataset_json, Path(input_path), output, out_dir, single_file, ending, folds, checkpoint, device,
        tta, step_size, save_probabilities, log, tile_batch, crop_body, allow_irregular_slices,
        continue_prediction, num_parts, part_id, bool(progress_bar), overlap,
    )  # fmt: skip
    if num_parts == 1:
        with folder_lock(out_dir, "mednext predict"):
            remove_stale_temporaries(out_dir, prefixes=(WORKSPACE_PREFIX,))
            return _predict_into(request)
    # Parts share the folder; each part is one run at a time and cleans up only after itself.
    what = f"mednext predict --part-id {part_id} --num-parts {num_parts}"
    with (
        folder_lock(out_dir, what, shared=True),
        folder_lock(out_dir, what, name=f".mednext-part-{part_id}-of-{num_parts}.lock"),
    ):
        return _predict_into(request)


WORKSPACE_PREFIX = ".mednext-predict-"


@dataclass
class _Request:
    """:func:`predict`'s arguments once the model and the output are known."""

    trained: TrainedModel
    dataset_json: dict
    input_path: Path
    output: Path
    out_dir: Path
    single_file: bool
    ending: str
    folds: Sequence[int | str] | None
    checkpoint: str
    device: str | torch.device | None
    tta: bool
    step_size: float
    save_probabilities: bool
    log: Any
    tile_batch: int
    crop_body: bool
    allow_irregular_slices: bool
    continue_prediction: bool
    num_parts: int
    part_id: int
    progress_bar: bool
    overlap: bool | None

    @property
    def workspace_prefix(self) -> str:
        if self.num_parts == 1:
            return WORKSPACE_PREFIX
        return f"{WORKSPACE_PREFIX}part-{self.part_id}-of-{self.num_parts}-"


def _predict_into(r: _Request) -> list[Path]:
    """:func:`predict` once the output folder is locked."""
    if r.num_parts > 1:  # what a killed run of this part left; other parts' workspaces are alive
        remove_stale_temporaries(r.out_dir, prefixes=(r.workspace_prefix,))
    workspace = Path(tempfile.mkdtemp(dir=r.out_dir, prefix=r.workspace_prefix))
    try:
        num_channels = len(r.dataset_json.get("channel_names", r.dataset_json.get("modality", {})))
        cases = collect_input_cases(r.input_path, r.ending, num_channels, workspace, r.allow_irregular_slices)
        if r.single_file and len(cases) != 1:
            raise ValueError(
                f"{r.input_path} holds {len(cases)} cases; give a folder as output, not the file {r.output}"
            )
        inputs = {f.resolve() for case in cases for f in case.files}
        for case in cases:
            target = r.output if r.single_file else r.out_dir / f"{case.case_id}{r.ending}"
            if target.resolve() in inputs:
                raise ValueError(
                    f"the prediction of case '{case.case_id}' would overwrite its input {target}; "
                    "give another output folder (-o)"
                )
        cases = select_part(cases, r.num_parts, r.part_id)
        folds = [f for f, _ in select_checkpoints(r.trained.folder, r.folds, r.checkpoint)]
        record = {
            "results_folder": str(r.trained.folder),
            "folds": folds,
            "checkpoint": CHECKPOINTS[r.checkpoint],
            "tta": r.tta,
            "step_size": r.step_size,
            "crop_body": r.crop_body,
            "save_probabilities": r.save_probabilities,
            "num_parts": r.num_parts,
            "part_id": r.part_id,
        }
        done = (
            finished_cases(r.out_dir, record, cases, r.ending, r.save_probabilities) if r.continue_prediction else set()
        )
        todo = [c for c in cases if c.case_id not in done]
        predictor = MedNeXtPredictor(r.step_size, use_mirroring=r.tta, device=r.device, tile_batch=r.tile_batch)
        predictor.initialize_from_trained_model_folder(r.trained.folder, folds, CHECKPOINTS[r.checkpoint])
        part = f" (part {r.part_id} of {r.num_parts})" if r.num_parts > 1 else ""
        skipped = f", {len(done)} already segmented" if done else ""
        r.log(
            f"{r.trained.folder.name}: folds {', '.join(map(str, folds))}, "
            f"checkpoint_{r.checkpoint}, device {predictor.device}, TTA {'on' if r.tta else 'off'}, "
            f"step {r.step_size}; {len(cases)} case(s){part}{skipped}"
        )
        record.update(device=str(predictor.device), mirror_axes=list(predictor.allowed_mirroring_axes or []))
        record["cases"] = {c.case_id: c.source for c in cases}
        record_path = r.out_dir / record_name(r.num_parts, r.part_id)
        recorded = []

        def place(case: InputCase, files: list[Path]) -> Path:
            if not r.single_file and not recorded:  # before the first segmentation: what made them
                recorded.append(atomic_write_json(record_path, {**record, "finished": False}))
            segmentation = None
            for f in files:
                target = r.output if r.single_file and f.name.endswith(r.ending) else inside(r.out_dir, f.name)
                os.replace(f, target)
                if target.name.endswith(r.ending):
                    segmentation = target
            assert segmentation is not None
            return segmentation

        progress = Progress(len(todo), r.log, r.progress_bar)
        overlap = r.overlap if r.overlap is not None else predictor.device.type != "cpu"
        written = run_cases(predictor, todo, workspace, place, progress, r.save_probabilities, r.crop_body, overlap)
        if not r.single_file:
            # Beside the predictions, as nnU-Net does: `mednext evaluate` and nnU-Net's tools read them.
            atomic_write_json(r.out_dir / "dataset.json", r.dataset_json)
            atomic_write_json(r.out_dir / "plans.json", predictor.plans_manager.plans)
            atomic_write_json(record_path, {**record, "finished": True})
        return written
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
