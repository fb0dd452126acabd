"""Prediction with a trained MedNeXt: our network rebuilt from a results folder, run by nnU-Net v2's predictor.

A results folder is nnU-Net v2's standard one,
``$nnUNet_results/Dataset{ID}_{Name}/{trainer}__{plans}__{configuration}/``, holding ``plans.json``,
``dataset.json`` and ``fold_{f}/checkpoint_{final,best,latest}.pth``. The plans name the network
(``mednext.nn.MedNeXt``) and its arguments, so the folder alone rebuilds the model. The engine
(``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor``) does preprocessing, sliding-window
inference with Gaussian weighting, mirroring test-time augmentation, fold ensembling and export
back to each input's geometry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mednext.memory import keeps_freed_memory, reuse_freed_memory
from mednext.pipeline.body import check_ct_for_body_crop, compose_with_engine_crop, crop_to_body
from mednext.pipeline.context import context_slices_of, stack_neighbour_slices
from mednext.pipeline.io import InputCase, collect_input_cases, image_ending
from mednext.pipeline.workdir import use_workdir

if TYPE_CHECKING:  # pragma: no cover
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from mednext.nn import MedNeXt

NETWORK_CLASS_NAMES = ("mednext.nn.MedNeXt", "mednext.nn.mednext.MedNeXt")
CHECKPOINTS = {
    "final": "checkpoint_final.pth",
    "best": "checkpoint_best.pth",
    "latest": "checkpoint_latest.pth",
}
_TRAINER = re.compile(r"^MedNeXtTrainer_(?P<model>[SBML])k(?P<kernel>\d+)")


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
        return match["model"] if match else None

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


# ----------------------------------------------------------------------------- finding a model


def dataset_name(dataset: str | int) -> str:
    """``Dataset901_Lesions`` for ``901``, ``'901'`` or the name itself (needs :func:`use_workdir` first)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

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
    """Every MedNeXt results folder of ``dataset`` that matches the given filters."""
    from nnunetv2.paths import nnUNet_results

    name = dataset_name(dataset)
    root = Path(results_folder if results_folder is not None else str(nnUNet_results)) / name
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
    from nnunetv2.paths import nnUNet_results

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
            f"no trained MedNeXt model of {name} in {Path(str(nnUNet_results)) / name}"
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


def _numpy_safe_globals() -> list[Any]:
    """The numpy types nnU-Net's training log may store in checkpoints (np.float64 Dice values, arrays).

    ``scalar`` and ``_reconstruct`` rebuild numpy scalars and arrays from a dtype and raw bytes; with
    only numeric and bool dtypes allowed (no object dtype) they cannot build arbitrary objects, so
    loading stays free of code execution.
    """
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    numeric = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
    numeric += [np.float16, np.float32, np.float64]
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *(type(np.dtype(t)) for t in numeric)]


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load an nnU-Net v2 style checkpoint with ``weights_only=True`` (numpy scalars allowlisted)."""
    path = Path(path)
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{path} cannot be loaded safely (weights_only=True): {str(err).splitlines()[-1][:300]}. "
                "Only checkpoints holding tensors, numbers, strings and containers are accepted."
            ) from err
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ValueError(f"{path} is not an nnU-Net v2 checkpoint: it has no 'network_weights' entry")
    return checkpoint


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


# ----------------------------------------------------------------------------- the network


def build_network(plans: dict, configuration: str, dataset_json: dict) -> MedNeXt:
    """Our network as the plans describe it, with deep supervision off, in eval mode."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from mednext.nn import MedNeXt

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
    from mednext.nn import MedNeXt

    has_heads = any(k.startswith("out_1.") for k in state_dict)
    if has_heads != hasattr(network, "out_1"):
        config = dict(network.config, deep_supervision=has_heads)
        network = MedNeXt(**config)
        network.set_deep_supervision(False)
        network.eval()
    return network


# ----------------------------------------------------------------------------- predictor


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA, then MPS, then CPU; an unavailable device is a ValueError."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was given but MPS is not available on this machine; use --device cpu")
    return device


def load_predictor(
    trained: TrainedModel | str | os.PathLike,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
    device: str | torch.device | None = None,
    tta: bool = True,
    step_size: float = 0.5,
    show_progress: bool = False,
) -> nnUNetPredictor:
    """An nnU-Net v2 predictor holding our network and the weights of ``folds`` (default: all present).

    ``trained`` is a :class:`TrainedModel` or a results folder path
    (``.../{trainer}__{plans}__{configuration}``).
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = trained.folder if isinstance(trained, TrainedModel) else Path(trained)
    if not 0 < step_size <= 1:
        raise ValueError(f"--step {step_size} must be in (0, 1] (fraction of the patch between windows)")
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ValueError(f"{folder} is not a results folder named <trainer>__<plans>__<configuration>")
    trainer_name, _, configuration = parts
    for required in ("plans.json", "dataset.json"):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder / required} is missing; the results folder is incomplete")
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    checkpoints = select_checkpoints(folder, folds, checkpoint)

    network = build_network(plans, configuration, dataset_json)
    parameters: list[dict[str, torch.Tensor]] = []
    mirror_axes: tuple[int, ...] | None = None
    for i, (_, path) in enumerate(checkpoints):
        ckpt = load_checkpoint(path)
        weights = ckpt["network_weights"]
        if i == 0:
            network = _match_heads(network, weights)
            patch_dims = len(PlansManager(plans).get_configuration(configuration).patch_size)
            # A checkpoint without the entry predates it: allow every axis, as nnU-Net's trainer does by default.
            mirror_axes = ckpt.get("inference_allowed_mirroring_axes", tuple(range(patch_dims)))
        try:
            network.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(
                f"{path} does not fit the network that {folder / 'plans.json'} describes: "
                f"{str(err).splitlines()[0]} ... (retrain, or restore the plans.json it was trained with)"
            ) from err
        parameters.append(weights)

    torch_device = resolve_device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # the engine prints a note about CPU devices
        predictor = nnUNetPredictor(
            tile_step_size=step_size,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=torch_device.type == "cuda",
            device=torch_device,
            verbose=False,
            allow_tqdm=show_progress,
        )
    plans_manager = PlansManager(plans)
    predictor.manual_initialization(
        network,
        plans_manager,
        plans_manager.get_configuration(configuration),
        parameters,
        dataset_json,
        trainer_name,
        tuple(mirror_axes) if mirror_axes is not None else None,
    )
    return predictor


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


def _read_case(predictor: nnUNetPredictor, case: InputCase) -> tuple[np.ndarray, dict]:
    reader = predictor.plans_manager.image_reader_writer_class()
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
    return data, properties


# ----------------------------------------------------------------------------- sliding window on the CPU


def _mirror_combinations(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """The engine's test-time mirroring: no flip, then every non-empty combination of ``axes``."""
    import itertools

    axes = list(axes or [])
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


@torch.inference_mode()
def sliding_window_logits(
    network: torch.nn.Module,
    data: torch.Tensor,
    patch_size: Sequence[int],
    num_classes: int,
    step_size: float = 0.5,
    mirror_axes: Sequence[int] | None = None,
    tile_batch: int = 2,
    accumulate: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The engine's Gaussian-weighted sliding window, on the CPU, ``tile_batch`` tiles per forward.

    Same tiles (``compute_steps_for_sliding_window`` after zero-padding to the patch), same order,
    same Gaussian (``compute_gaussian``: sigma 1/8 of the patch, peak 10, float16 values), same
    mirroring (mean of the plain and every mirrored prediction) and the same arithmetic as
    ``nnUNetPredictor``: by default the weighted logits and the weights are summed in float16, as
    the engine does, so that the result equals the engine's up to the network's own rounding
    (``accumulate=torch.float32`` sums in float32, which is more accurate: the engine's float16
    sums lose up to about 0.5 in a logit where only tile corners overlap, see docs/benchmarks.md).
    ``data`` is ``(channels, *spatial)``; a 2D patch on 3D data slides over every slice, as in the
    engine. Returns logits ``(num_classes, *spatial)`` in ``accumulate``'s dtype.
    """
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    patch = tuple(int(p) for p in patch_size)
    data, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    spatial = data.shape[1:]
    slicers: list[tuple] = []
    if len(patch) < len(spatial):  # 2D network on a 3D volume: every slice, as the engine does
        steps = compute_steps_for_sliding_window(spatial[1:], patch, step_size)
        for d in range(spatial[0]):
            for sx in steps[0]:
                for sy in steps[1]:
                    slicers.append((slice(None), d, slice(sx, sx + patch[0]), slice(sy, sy + patch[1])))
    else:
        steps = compute_steps_for_sliding_window(spatial, patch, step_size)
        for start in np.stack(np.meshgrid(*steps, indexing="ij"), -1).reshape(-1, len(patch)):
            slicers.append((slice(None), *(slice(int(s), int(s) + p) for s, p in zip(start, patch))))
    # float16 values, as the engine weights with them; summed in ``accumulate``
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    flips = _mirror_combinations([a + 2 for a in mirror_axes] if mirror_axes else None)
    logits = torch.zeros((num_classes, *spatial), dtype=accumulate)
    weights = torch.zeros(spatial, dtype=accumulate)
    batch = max(1, int(tile_batch))
    for first in range(0, len(slicers), batch):
        group = slicers[first : first + batch]
        x = torch.stack([data[sl] for sl in group])
        prediction = network(x)
        for axes in flips[1:]:
            prediction += torch.flip(network(torch.flip(x, axes)), axes)
        if len(flips) > 1:
            prediction /= len(flips)
        prediction *= gaussian
        for sl, tile in zip(group, prediction):  # tile by tile, in the engine's order and rounding
            logits[sl] += tile
            weights[sl[1:]] += gaussian
    torch.div(logits, weights, out=logits)
    if torch.isinf(logits).any():
        raise RuntimeError(
            "the summed logits overflowed float16 (inf); predict with accumulate=torch.float32 "
            "(the engine stops with the same error here)"
        )
    return logits[(slice(None), *revert[1:])]


@torch.inference_mode()
def predict_logits(predictor: nnUNetPredictor, data: torch.Tensor, tile_batch: int = 2) -> torch.Tensor:
    """Logits of one preprocessed case ``(channels, *spatial)``: the fold ensemble's mean.

    On the CPU, :func:`sliding_window_logits` with ``tile_batch`` tiles per forward inside
    :func:`mednext.memory.reuse_freed_memory`; on other devices the engine's own
    ``predict_logits_from_preprocessed_data`` (float16 autocast on CUDA).
    """
    if predictor.device.type != "cpu":
        return predictor.predict_logits_from_preprocessed_data(data).cpu()
    network = predictor.network.eval()
    mirror_axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
    num_classes = predictor.label_manager.num_segmentation_heads
    total = None
    with reuse_freed_memory(keeps_freed_memory(predictor.device)):
        for params in predictor.list_of_parameters:
            network.load_state_dict(params)
            logits = sliding_window_logits(
                network, data, predictor.configuration_manager.patch_size, num_classes,
                predictor.tile_step_size, mirror_axes, tile_batch,
            )  # fmt: skip
            total = logits if total is None else total.add_(logits)
    assert total is not None
    if len(predictor.list_of_parameters) > 1:
        total /= len(predictor.list_of_parameters)
    return total


def predict_case(
    predictor: nnUNetPredictor,
    case: InputCase,
    output_truncated: str | os.PathLike,
    save_probabilities: bool = False,
    tile_batch: int = 2,
    crop_body: bool = False,
) -> list[Path]:
    """Preprocess, predict and export one case; returns the written files (``<output_truncated><ending>``, ...).

    ``tile_batch``: sliding-window tiles per network forward on the CPU (see :func:`predict_logits`).
    ``crop_body``: predict only inside the box around the patient's body (CT; :mod:`mednext.pipeline.body`);
    the output keeps the input's full grid, background outside the box.
    """
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    data, properties = _read_case(predictor, case)
    body_box = None
    if crop_body:
        full_shape = data.shape[1:]
        data, body_box = crop_to_body(data, properties)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case_npy(
        data,
        None,
        properties,
        predictor.plans_manager,
        predictor.configuration_manager,
        predictor.dataset_json,
    )
    if body_box is not None:
        compose_with_engine_crop(properties, body_box, full_shape, predictor.plans_manager.transpose_forward)
    # a 2.5D network sees every slice with its neighbours as channels (mednext.pipeline.context)
    data = stack_neighbour_slices(data, context_slices_of(predictor.configuration_manager.configuration))
    logits = predict_logits(predictor, torch.from_numpy(data), tile_batch)
    export_prediction_from_logits(
        logits,
        properties,
        predictor.configuration_manager,
        predictor.plans_manager,
        predictor.dataset_json,
        str(output_truncated),
        save_probabilities,
        num_threads_torch=max(1, torch.get_num_threads()),
    )
    ending = predictor.dataset_json["file_ending"]
    written = [Path(f"{output_truncated}{ending}")]
    if save_probabilities:
        written += [Path(f"{output_truncated}.npz"), Path(f"{output_truncated}.pkl")]
    return written


def _write_json_atomic(path: Path, content: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(tmp, path)


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
) -> list[Path]:
    """Segment every case in ``input_path`` with a trained MedNeXt and return the written segmentations.

    ``crop_body`` (CT only): predict inside the box around the patient's body, background outside it
    (:mod:`mednext.pipeline.body`), for scans whose field of view is wider than the training scans'.

    ``output`` is a folder (created if needed) that receives ``<case><ending>`` per case, or, for a
    single case, a file path ending in the dataset's file ending. Every file is written to a temporary
    name in the same folder and moved into place, so a failed run leaves no partial output.
    """
    if tile_batch < 1:
        raise ValueError(f"--tile-batch {tile_batch} must be at least 1 (tiles per network forward)")
    use_workdir(workdir)
    trained = resolve_trained_model(dataset, configuration, model, kernel, plans)
    dataset_json = json.loads((trained.folder / "dataset.json").read_text())
    if crop_body:
        check_ct_for_body_crop(json.loads((trained.folder / "plans.json").read_text()), trained.configuration)
    ending = dataset_json["file_ending"]
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    output = Path(output)
    single_file = image_ending(output) is not None
    out_dir = output.parent if single_file else output
    if single_file and image_ending(output) != ending.lower():
        raise ValueError(
            f"output {output} has ending '{image_ending(output)}' but the model writes '{ending}' files "
            f"(dataset.json 'file_ending'); name the output file *{ending} or give a folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(dir=out_dir, prefix=".mednext-predict-"))
    try:
        cases = collect_input_cases(input_path, ending, num_channels, workspace)
        if single_file and len(cases) != 1:
            raise ValueError(f"{input_path} holds {len(cases)} cases; give a folder as output, not the file {output}")
        inputs = {f.resolve() for case in cases for f in case.files}
        for case in cases:
            target = output if single_file else out_dir / f"{case.case_id}{ending}"
            if target.resolve() in inputs:
                raise ValueError(
                    f"the prediction of case '{case.case_id}' would overwrite its input {target}; "
                    "give another output folder (-o)"
                )
        folds = [f for f, _ in select_checkpoints(trained.folder, folds, checkpoint)]
        predictor = load_predictor(trained, folds, checkpoint, device, tta, step_size)
        log(
            f"{trained.folder.name}: folds {', '.join(map(str, folds))}, "
            f"checkpoint_{checkpoint}, device {predictor.device}, TTA {'on' if tta else 'off'}, step {step_size}; "
            f"{len(cases)} case(s)"
        )
        written = []
        for case in cases:
            start = time.perf_counter()
            files = predict_case(predictor, case, workspace / case.case_id, save_probabilities, tile_batch, crop_body)
            for f in files:
                target = output if single_file and f.name.endswith(ending) else out_dir / f.name
                os.replace(f, target)
                if target.name.endswith(ending):
                    written.append(target)
            log(f"  {case.case_id}: {written[-1]} ({time.perf_counter() - start:.1f} s)")
        if not single_file:
            # Beside the predictions, as nnU-Net does: `mednext evaluate` and nnU-Net's tools read them.
            _write_json_atomic(out_dir / "dataset.json", dataset_json)
            _write_json_atomic(out_dir / "plans.json", predictor.plans_manager.plans)
            _write_json_atomic(
                out_dir / "mednext_predict.json",
                {
                    "results_folder": str(trained.folder),
                    "folds": folds,
                    "checkpoint": CHECKPOINTS[checkpoint],
                    "device": str(predictor.device),
                    "tta": tta,
                    "mirror_axes": list(predictor.allowed_mirroring_axes or []),
                    "step_size": step_size,
                    "crop_body": crop_body,
                    "cases": {c.case_id: c.source for c in cases},
                },
            )
        return written
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
