"""A trained MedNeXt as a Python object for notebooks and services: load once, segment many images.

```python
import SimpleITK as sitk
from mednext import Segmenter

seg = Segmenter.from_results("Dataset901_Lesions", configuration="3d_fullres", folds=[0], device="cpu")
mask = seg(sitk.ReadImage("scan.nii.gz"))                 # a SimpleITK image on the scan's grid
mask, probabilities = seg(image, probabilities=True)      # plus (classes, *spatial) float32 numpy
labels = seg(volume, spacing=(2.5, 0.8, 0.8))             # numpy (z, y, x) with its spacing
```

Each call goes through what ``mednext predict`` runs on a file (:meth:`MedNeXtPredictor.predict_case`):
the image is written to a private temporary folder in the model's file format, read by the reader
the plans name, preprocessed, predicted and exported, and the result is read back. So a call's
answer equals ``mednext predict``'s on the same image, for every reader nnU-Net v2 has; the network
and the weights stay loaded between calls.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from mednext.errors import UserError
from mednext.pipeline.body import check_ct_for_body_crop
from mednext.pipeline.io import InputCase
from mednext.pipeline.predictor import (
    CHECKPOINTS,
    MedNeXtPredictor,
    resolve_trained_model,
    select_checkpoints,
)
from mednext.pipeline.workdir import use_workdir

__all__ = ["Segmenter", "SegmenterInputError"]

_NIFTI = (".nii.gz", ".nii")


class SegmenterInputError(UserError, ValueError):
    """An image that :class:`Segmenter` cannot take as it is; the message says what to pass instead."""


def _is_nibabel(image: Any) -> bool:
    return type(image).__module__.split(".")[0] == "nibabel" and hasattr(image, "affine")


class Segmenter:
    """A trained MedNeXt (one results folder, one or more folds) that segments images in memory.

    Build it with :meth:`from_results`. Calling it with an image returns the segmentation as the
    same kind of object, on the input's grid:

    - a ``SimpleITK.Image`` (or, for a model with several input channels, a list of them, one per
      channel in ``dataset.json`` order) gives a ``SimpleITK.Image`` with the input's size,
      spacing, origin and direction;
    - a ``nibabel`` image (``Nifti1Image``/``Nifti2Image``, NIfTI models only) gives an image of the
      same class with the input's affine and header;
    - a numpy array in SimpleITK's axis order, ``(z, y, x)`` or ``(y, x)`` (channels first,
      ``(c, z, y, x)``, for a model with several channels), with ``spacing`` in the same order,
      gives a numpy array of the spatial shape.

    ``probabilities=True`` returns ``(segmentation, probabilities)``, the probabilities a float32
    numpy array ``(classes, *spatial)`` with the spatial axes in the input's array order (for
    nibabel, the order of ``image.shape``); for a region-based model one sigmoid channel per region.

    Attributes:
        predictor: the initialised :class:`MedNeXtPredictor` (network, weights, plans).
        folder: the results folder the model came from.
        folds: the folds whose weights are averaged.
        labels: ``dataset.json`` ``labels`` (name to value).
        channel_names: ``dataset.json`` ``channel_names`` (index to name).
        file_ending: the model's image format (``dataset.json`` ``file_ending``).
    """

    def __init__(self, predictor: MedNeXtPredictor, folder: str | os.PathLike, folds: Sequence[int | str]) -> None:
        self.predictor = predictor
        self.folder = Path(folder)
        self.folds = list(folds)
        dataset_json = predictor.dataset_json
        self.labels: dict[str, Any] = dict(dataset_json["labels"])
        self.channel_names: dict[str, str] = dict(dataset_json.get("channel_names", dataset_json.get("modality", {})))
        self.file_ending: str = dataset_json["file_ending"]

    @classmethod
    def from_results(
        cls,
        dataset_or_folder: str | int | os.PathLike,
        configuration: str | None = None,
        folds: Sequence[int | str] | None = None,
        device: str | torch.device | None = None,
        *,
        model: str | None = None,
        kernel: int | None = None,
        plans: str | None = None,
        checkpoint: str = "final",
        tta: bool = True,
        step_size: float = 0.5,
        tile_batch: int = 2,
        workdir: str | os.PathLike | None = None,
    ) -> Segmenter:
        """Load a trained model once.

        Args:
            dataset_or_folder: a results folder (``<trainer>__<plans>__<configuration>`` holding
                ``plans.json``), or a dataset name or id trained in ``workdir``.
            configuration: ``"3d_fullres"`` or ``"2d"`` (None: the only one trained).
            folds: the folds to ensemble (None: every fold holding ``checkpoint``).
            device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or None (CUDA, then MPS, then CPU).
            model: the preset trained (``S``, ``B``, ``M``, ``L``; None: the only one).
            kernel: the kernel size trained (None: the only one).
            plans: the plans identifier trained with (None: the only one).
            checkpoint: ``"final"``, ``"best"`` or ``"latest"``.
            tta: mirroring test-time augmentation (``mednext predict --no-tta`` turns it off).
            step_size: sliding-window step as a fraction of the patch (``--step``).
            tile_batch: sliding-window tiles per network forward on the CPU (``--tile-batch``).
            workdir: the working folder of a dataset name or id (None: ``./mednext_work``; nnU-Net's
                variables win when set).
        """
        path = Path(dataset_or_folder) if not isinstance(dataset_or_folder, int) else None
        if path is not None and (path / "plans.json").is_file():
            folder = path
            if configuration is not None and not folder.name.endswith(f"__{configuration}"):
                raise SegmenterInputError(
                    f"{folder} holds configuration {folder.name.rpartition('__')[2]!r}, not {configuration!r}; "
                    "drop configuration= or give the folder of that configuration"
                )
        else:
            use_workdir(workdir)
            folder = resolve_trained_model(dataset_or_folder, configuration, model, kernel, plans).folder
        chosen = [f for f, _ in select_checkpoints(folder, folds, checkpoint)]
        predictor = MedNeXtPredictor(step_size, use_mirroring=tta, device=device, tile_batch=tile_batch)
        predictor.initialize_from_trained_model_folder(folder, chosen, CHECKPOINTS[checkpoint])
        return cls(predictor, folder, chosen)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def __repr__(self) -> str:
        return (
            f"Segmenter({self.folder.name}, folds={self.folds}, device={self.predictor.device}, "
            f"labels={list(self.labels)})"
        )

    def __call__(
        self,
        image: Any,
        spacing: Sequence[float] | None = None,
        *,
        probabilities: bool = False,
        crop_body: bool = False,
    ) -> Any:
        """Segment one image (see the class docstring for the kinds it takes and returns).

        ``spacing`` (numpy input only): voxel spacing in the array's axis order (mm).
        ``crop_body`` (CT only): predict inside the box around the patient's body, as ``mednext predict --crop-body``.
        """
        if crop_body:
            check_ct_for_body_crop(self.predictor.plans_manager.plans, self.folder.name.rpartition("__")[2])
        workspace = Path(tempfile.mkdtemp(prefix="mednext-segmenter-"))
        try:
            files, restore = self._write_input(image, spacing, workspace)
            written = self.predictor.predict_case(
                InputCase("case", files, source="memory"), workspace / "out", probabilities, crop_body
            )
            segmentation = restore(written[0])
            if not probabilities:
                return segmentation
            with np.load(written[1]) as archive:
                probs = archive["probabilities"].astype(np.float32, copy=False)
            expected = tuple(_spatial_shape(image, self.num_channels))
            if probs.ndim == len(expected) + 2 and probs.shape[1] == 1:
                probs = probs[:, 0]  # a 2D image is one slice of a volume to the engine
            if _is_nibabel(image):
                probs = np.ascontiguousarray(probs.transpose(0, *range(probs.ndim - 1, 0, -1)))
            if tuple(probs.shape[1:]) != expected:
                raise SegmenterInputError(
                    f"the probabilities came back with spatial shape {probs.shape[1:]}, not the input's {expected}: "
                    f"the plans' reader ({self.predictor.plans_manager.image_reader_writer_class.__name__}) "
                    "reorients images; read the probabilities with mednext predict --save-probabilities instead"
                )
            return segmentation, probs
        finally:
            shutil.rmtree(workspace, ignore_errors=True)

    # ------------------------------------------------------------------ input and output

    def _write_input(self, image: Any, spacing: Sequence[float] | None, workspace: Path) -> tuple[list[Path], Any]:
        ending = self.file_ending
        paths = [workspace / f"case_{c:04d}{ending}" for c in range(self.num_channels)]
        if isinstance(image, sitk.Image) or (
            isinstance(image, (list, tuple)) and image and all(isinstance(i, sitk.Image) for i in image)
        ):
            self._no_spacing(spacing, "a SimpleITK image carries its own spacing")
            channels = list(image) if isinstance(image, (list, tuple)) else [image]
            self._check_channel_count(len(channels), "SimpleITK images")
            for path, channel in zip(paths, channels):
                sitk.WriteImage(channel, str(path))
            reference = channels[0]

            def restore_sitk(path: Path) -> sitk.Image:
                result = sitk.ReadImage(str(path))
                result.CopyInformation(reference)
                return result

            return paths, restore_sitk
        if _is_nibabel(image):
            self._no_spacing(spacing, "a nibabel image carries its own affine")
            self._check_channel_count(1 if len(image.shape) <= 3 else image.shape[3], "channels in the nibabel image")
            if ending.lower() not in _NIFTI:
                raise SegmenterInputError(
                    f"this model reads '{ending}' files (dataset.json 'file_ending'), not NIfTI; pass a SimpleITK "
                    "image or a numpy array with its spacing instead of a nibabel image"
                )
            if len(image.shape) > 3:
                raise SegmenterInputError(
                    f"the nibabel image has shape {image.shape}; pass one 3D image per channel as a SimpleITK list, "
                    "or a numpy array (c, z, y, x) with its spacing"
                )
            import nibabel

            nibabel.save(image, str(paths[0]))

            def restore_nibabel(path: Path) -> Any:
                values = np.asarray(nibabel.load(str(path)).dataobj)
                header = image.header.copy()
                header.set_data_dtype(np.uint8 if values.max(initial=0) < 255 else np.uint16)
                result = type(image)(values.astype(header.get_data_dtype()), image.affine, header)
                return result

            return paths, restore_nibabel
        if isinstance(image, np.ndarray | torch.Tensor):
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            channels = [array] if self.num_channels == 1 else list(array)
            if self.num_channels > 1 and array.shape[0] != self.num_channels:
                raise SegmenterInputError(
                    f"the array has shape {array.shape}; this model takes {self.num_channels} channels "
                    f"({', '.join(self.channel_names.values())}): pass (c, z, y, x) or (c, y, x) with c first"
                )
            spatial = channels[0].shape
            if len(spatial) not in (2, 3):
                raise SegmenterInputError(
                    f"the array has shape {array.shape}: give (z, y, x) or (y, x) "
                    + ("with channels first " if self.num_channels > 1 else "")
                    + "in SimpleITK's axis order"
                )
            if spacing is None or len(spacing) != len(spatial) or any(float(s) <= 0 for s in spacing):
                raise SegmenterInputError(
                    f"a numpy image needs spacing=(one positive value per axis, in the array's order) for its "
                    f"{len(spatial)} axes; got {spacing!r}"
                )
            for path, channel in zip(paths, channels):
                item = sitk.GetImageFromArray(np.ascontiguousarray(channel))
                item.SetSpacing([float(s) for s in reversed(spacing)])
                sitk.WriteImage(item, str(path))

            def restore_numpy(path: Path) -> np.ndarray:
                return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

            return paths, restore_numpy
        raise SegmenterInputError(
            f"cannot segment a {type(image).__module__}.{type(image).__name__}: pass a SimpleITK image, a nibabel "
            "image, or a numpy array with spacing=..."
        )

    @staticmethod
    def _no_spacing(spacing: Sequence[float] | None, reason: str) -> None:
        if spacing is not None:
            raise SegmenterInputError(f"spacing= is only for numpy arrays: {reason}; drop spacing=")

    def _check_channel_count(self, count: int, what: str) -> None:
        if count != self.num_channels:
            raise SegmenterInputError(
                f"got {count} {what} but this model takes {self.num_channels} channel(s) "
                f"({', '.join(self.channel_names.values())}, dataset.json 'channel_names'); pass one per channel"
            )


def _spatial_shape(image: Any, num_channels: int) -> tuple[int, ...]:
    if isinstance(image, (list, tuple)):
        image = image[0]
    if isinstance(image, sitk.Image):
        return tuple(reversed(image.GetSize()))
    if _is_nibabel(image):
        return tuple(image.shape[:3])
    shape = tuple(image.shape)
    return shape[1:] if num_channels > 1 else shape
