"""Crop a CT to the patient's body before prediction (``mednext predict --crop-body``).

A network trained on scans whose field of view hugs the body learns where the body sits in the
image. A scan with a wider field of view (arms beside the trunk, the table, a margin of air) then
shows the organs at other positions and scales than the network ever saw, and it misses them.
:func:`body_bbox` finds the body as the largest connected region above :data:`BODY_HU` after a
small in-plane opening (which cuts the thin contacts between trunk, arms and table), and
:func:`crop_to_body` cuts the image to that box plus a margin; the prediction is put back on the
full grid, background elsewhere. docs/demo.md shows the effect on the demo's held-out patient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BODY_HU = -500.0  # above: soft tissue, fat, bone; below: air and lung
OPENING_MM = 4.0  # in-plane radius of the opening that separates arms and table from the trunk
MARGIN_MM = 10.0  # kept around the body on every side


def _disk(radius_y: int, radius_x: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius_y : radius_y + 1, -radius_x : radius_x + 1]
    return (yy / max(radius_y, 1)) ** 2 + (xx / max(radius_x, 1)) ** 2 <= 1.0


def body_bbox(
    image: np.ndarray,
    spacing: Sequence[float],
    threshold: float = BODY_HU,
    opening_mm: float = OPENING_MM,
    margin_mm: float = MARGIN_MM,
) -> list[list[int]]:
    """The box ``[[start, stop], ...]`` (one pair per axis of ``image``) around the body in a CT volume.

    ``image`` is ``(z, y, x)`` in Hounsfield units with ``spacing`` (mm) in the same order; the
    opening acts in the (y, x) plane of every slice. The body is the largest 3D connected component of
    the opened mask. Without any voxel above ``threshold`` the whole image is returned."""
    from scipy import ndimage

    if image.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"body_bbox needs a 3D image and 3 spacings, got shape {image.shape} and {spacing}")
    mask = image > threshold
    ry, rx = (max(0, int(round(opening_mm / float(s)))) for s in spacing[1:])
    if ry or rx:
        mask = ndimage.binary_opening(mask, structure=_disk(ry, rx)[None])
    labels, count = ndimage.label(mask)
    if count == 0:
        return [[0, n] for n in image.shape]
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    box = []
    for axis, (n, s) in enumerate(zip(image.shape, spacing, strict=True)):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.nonzero(body.any(axis=other))[0]
        pad = int(np.ceil(margin_mm / float(s)))
        box.append([max(0, int(hits[0]) - pad), min(n, int(hits[-1]) + 1 + pad)])
    return box


def crop_to_body(data: np.ndarray, properties: dict) -> tuple[np.ndarray, list[list[int]]]:
    """Crop ``data`` ``(channels, z, y, x)`` (the engine reader's arrays and properties; channel 0 is the
    CT in HU) to :func:`body_bbox` of its first channel. Returns the cropped array and the box."""
    box = body_bbox(data[0], [float(s) for s in properties["spacing"]])
    cropped = data[(slice(None), *(slice(a, b) for a, b in box))]
    return np.ascontiguousarray(cropped), box


def compose_with_engine_crop(properties: dict, body_box: list[list[int]], full_shape: Sequence[int],
                             transpose_forward: Sequence[int]) -> None:  # fmt: skip
    """After the engine's preprocessing of a body-cropped image: make its crop bookkeeping refer to the
    full image, so that the engine's export puts the prediction back on the full grid (background
    outside the body box). ``full_shape`` is the image's spatial shape before the body crop, in the
    reader's axis order; the engine's values are in the plans' transposed order."""
    shifts = [body_box[i][0] for i in transpose_forward]
    properties["shape_before_cropping"] = tuple(int(full_shape[i]) for i in transpose_forward)
    properties["bbox_used_for_cropping"] = [
        [int(a) + s, int(b) + s] for (a, b), s in zip(properties["bbox_used_for_cropping"], shifts, strict=True)
    ]


def check_ct_for_body_crop(plans: dict, configuration: str) -> None:
    """``--crop-body`` finds the body by Hounsfield units: refuse models whose first channel is not CT."""
    schemes = plans["configurations"][configuration].get("normalization_schemes", [])
    if not schemes or schemes[0] != "CTNormalization":
        raise ValueError(
            f"--crop-body finds the body by Hounsfield units and needs a CT model; this model's first channel "
            f"is normalised with {schemes[0] if schemes else 'nothing'} (plans 'normalization_schemes'). "
            "Predict without --crop-body."
        )
