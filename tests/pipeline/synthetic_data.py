"""Tiny synthetic nnU-Net v2 raw datasets for tests (no downloads).

Each case holds a noisy background with two foreground objects: a bright ball (label 1) and a
dark box (label 2), at random positions and sizes, so a network can learn them in a few hundred
iterations. 3D cases are written as ``.nii.gz`` (SimpleITK) with an anisotropic spacing; 2D cases
as ``.png`` (uint8 greyscale images, uint8 label maps).

Usage::

    from synthetic_data import make_dataset  # tests/pipeline is on sys.path under pytest
    folder = make_dataset(tmp_path, 901, "Synth", spatial_dims=3, num_cases=5, shape=(24, 32, 32))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "ball": 1, "box": 2}
# BraTS-style nested regions: label values 1 (outer shell), 2 (middle shell), 3 (core); each region
# is the union of the values it lists, and regions_class_order paints them in this order
REGION_LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
REGIONS_CLASS_ORDER = [1, 2, 3]
SPACING_3D = (2.0, 1.0, 1.0)  # (z, y, x) in mm, numpy axis order


def make_case(shape: Sequence[int], rng: np.random.Generator, num_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: images of shape ``(num_channels, *shape)`` float32 and a uint8 label map
    of ``shape`` with values 0, 1, 2 (both foreground classes always present)."""
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)

    # ball: label 1, centred in the first half along the last axis
    radius = rng.uniform(0.15, 0.25) * min(shape)
    centre = [rng.uniform(radius + 1, s - radius - 1) for s in shape[:-1]]
    centre.append(rng.uniform(radius + 1, max(radius + 2, shape[-1] / 2)))
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    label[dist2 <= radius**2] = 1

    # box: label 2, in the second half along the last axis (never overlaps the ball's centre)
    half = [max(2, int(rng.uniform(0.1, 0.2) * s)) for s in shape]
    lo = [int(rng.integers(1, max(2, s - 2 * h - 1))) for s, h in zip(shape[:-1], half[:-1], strict=True)]
    lo.append(int(rng.integers(shape[-1] // 2 + 1, max(shape[-1] // 2 + 2, shape[-1] - 2 * half[-1] - 1))))
    box = tuple(slice(a, a + 2 * h) for a, h in zip(lo, half, strict=True))
    label[box] = 2

    images = []
    for c in range(num_channels):
        img = rng.normal(100.0, 10.0, shape).astype(np.float32)
        img[label == 1] += 80.0 + 10.0 * c
        img[label == 2] -= 60.0 - 5.0 * c
        images.append(img)
    return np.stack(images).astype(np.float32), label


def make_region_case(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One case of nested balls: values 1, 2, 3 from the outside in, each brighter than the one around it.
    Returns a ``(1, *shape)`` float32 image and a uint8 label map of ``shape`` (3D: spacing
    :data:`SPACING_3D`, the balls round in mm)."""
    shape = tuple(int(s) for s in shape)
    spacing = SPACING_3D if len(shape) == 3 else (1.0, 1.0)
    extent = [n * d for n, d in zip(shape, spacing, strict=True)]  # mm
    outer = rng.uniform(0.3, 0.35) * min(extent)
    centre = [rng.uniform(outer, e - outer) for e in extent]
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * d for n, d in zip(shape, spacing, strict=True)], indexing="ij")
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))) / outer
    label = np.zeros(shape, np.uint8)
    label[dist <= 1.0] = 1
    label[dist <= 0.7] = 2
    label[dist <= 0.4] = 3
    image = rng.normal(100.0, 10.0, shape).astype(np.float32) + 60.0 * label
    return image[None].astype(np.float32), label


def make_dataset(
    root: str | Path,
    dataset_id: int = 901,
    name: str = "Synth",
    spatial_dims: int = 3,
    num_cases: int = 5,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    num_channels: int = 1,
    num_test_cases: int = 0,
    regions: bool = False,
) -> Path:
    """Write ``root/Dataset{id:03d}_{name}`` (imagesTr, labelsTr, optional imagesTs, dataset.json) and
    return its path. ``shape`` defaults to (20, 32, 32) in 3D and (64, 64) in 2D. Case ids are
    ``case_000``, ``case_001``, ...; test cases are ``test_000``, ... (images only).

    ``regions``: BraTS-style cases (:func:`make_region_case`, one channel) with the overlapping
    regions of :data:`REGION_LABELS` and ``regions_class_order`` in dataset.json."""
    if spatial_dims not in (2, 3):
        raise ValueError("spatial_dims must be 2 or 3")
    if regions and num_channels != 1:
        raise ValueError("region cases have one channel")
    if shape is None:
        shape = (20, 32, 32) if spatial_dims == 3 else (64, 64)
    if len(shape) != spatial_dims:
        raise ValueError(f"shape {tuple(shape)} does not have {spatial_dims} axes")
    rng = np.random.default_rng(seed)
    folder = Path(root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if num_test_cases else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ending = ".nii.gz" if spatial_dims == 3 else ".png"

    def write_case(case_id: str, images_dir: str, with_label: bool) -> None:
        images, label = make_region_case(shape, rng) if regions else make_case(shape, rng, num_channels)
        for c, img in enumerate(images):
            write_image(folder / images_dir / f"{case_id}_{c:04d}{ending}", img, spatial_dims)
        if with_label:
            write_image(folder / "labelsTr" / f"{case_id}{ending}", label, spatial_dims)

    for i in range(num_cases):
        write_case(f"case_{i:03d}", "imagesTr", True)
    for i in range(num_test_cases):
        write_case(f"test_{i:03d}", "imagesTs", False)

    meta = {
        "channel_names": {str(c): ("CT" if num_channels == 1 else f"mod{c}") for c in range(num_channels)},
        "labels": dict(REGION_LABELS if regions else LABELS),
        "numTraining": num_cases,
        "file_ending": ending,
        "name": name,
        "description": "synthetic test data (mednext tests)",
    }
    if regions:
        meta["regions_class_order"] = list(REGIONS_CLASS_ORDER)
    # a single-channel CT-like image gets CT normalisation in the engine; with several channels we
    # use names that map to z-score normalisation
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def write_image(path: Path, array: np.ndarray, spatial_dims: int, spacing: Sequence[float] | None = None) -> None:
    """Write one image/label array (numpy axis order) as the dataset's file type."""
    if spatial_dims == 3:
        import SimpleITK as sitk

        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(tuple(float(s) for s in reversed(spacing or SPACING_3D)))
        sitk.WriteImage(itk, str(path))
    else:
        from PIL import Image

        arr = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path)
