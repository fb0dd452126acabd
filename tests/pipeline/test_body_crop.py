"""The body crop of ``mednext predict --crop-body`` (mednext.pipeline.body): the box found on CT phantoms,
and predictions that equal predicting the cropped image, put back on the full grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mednext.pipeline.body import MARGIN_MM, body_bbox, check_ct_for_body_crop

AIR, FAT, TISSUE, BONE = -1000.0, -100.0, 50.0, 700.0


def phantom(shape=(6, 64, 80), arm_bridge: bool = False, seed: int = 0) -> tuple[np.ndarray, tuple]:
    """A CT slab (z, y, x) in HU: an elliptical trunk (fat rim, soft tissue, a bone), two arms beside it
    with an air gap, a table under it, noise; returns the image and the trunk's own box."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    image = np.full(shape, AIR, dtype=np.float32)
    cy, cx, ry, rx = 28, 40, 12, 16
    trunk = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    inner = ((yy - cy) / (ry - 2)) ** 2 + ((xx - cx) / (rx - 2)) ** 2 <= 1
    image[:, trunk] = FAT
    image[:, inner] = TISSUE
    image[:, (yy - 34) ** 2 + (xx - 40) ** 2 <= 4] = BONE
    for ax in (12, 68):  # arms: disks of radius 5, 6-7 voxels of air from the trunk
        image[:, (yy - cy) ** 2 + (xx - ax) ** 2 <= 25] = TISSUE
    if arm_bridge:  # skin contact: a 1-voxel-thin strand from the left arm to the trunk
        image[:, cy, 12:30] = TISSUE
    image[:, 46:48, 4:76] = BONE  # the table, 6 voxels below the trunk
    image += rng.normal(0, 5, shape).astype(np.float32)
    return image, ((0, z), (cy - ry, cy + ry + 1), (cx - rx, cx + rx + 1))


def expected_box(trunk_box, shape, spacing):
    box = []
    for (a, b), n, s in zip(trunk_box, shape, spacing, strict=True):
        pad = int(np.ceil(MARGIN_MM / s))
        box.append([max(0, a - pad), min(n, b + pad)])
    return box


@pytest.mark.parametrize("bridge", [False, True])
def test_box_holds_the_trunk_and_leaves_out_arms_and_table(bridge: bool) -> None:
    image, trunk = phantom(arm_bridge=bridge)
    spacing = (3.0, 1.0, 1.0)
    box = body_bbox(image, spacing)
    # the trunk's box plus the margin: with the arms (x 7-17, 63-73) or the table (rows 46-47) in the
    # body's component it would reach x 0 and 80 or row 58
    assert box == expected_box(trunk, image.shape, spacing)


def test_box_scales_with_spacing_and_covers_everything_without_a_body() -> None:
    image, trunk = phantom()
    coarse = (3.0, 2.5, 2.5)  # margin 10 mm = 4 voxels; opening radius 2 voxels
    assert body_bbox(image, coarse) == expected_box(trunk, image.shape, coarse)
    air = np.full((4, 20, 30), AIR, dtype=np.float32)
    assert body_bbox(air, (1.0, 1.0, 1.0)) == [[0, 4], [0, 20], [0, 30]]
    with pytest.raises(ValueError, match="3D image"):
        body_bbox(image[0], (1.0, 1.0))


def test_only_ct_models_accept_the_body_crop() -> None:
    plans = {"configurations": {"2d": {"normalization_schemes": ["ZScoreNormalization"]}}}
    with pytest.raises(ValueError, match="--crop-body .*CT model.*ZScoreNormalization"):
        check_ct_for_body_crop(plans, "2d")
    plans["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization"]
    check_ct_for_body_crop(plans, "2d")


@pytest.mark.slow
def test_predict_with_crop_equals_predicting_the_cropped_image(tmp_path: Path, one_thread: None) -> None:
    pytest.importorskip("nnunetv2")
    sitk = pytest.importorskip("SimpleITK")

    from test_predict import make_results_folder, results_root, run_cli, write_image

    workdir = tmp_path / "work"
    folder = make_results_folder(results_root(workdir), "Dataset958_Body")
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["CTNormalization"]
    plans["foreground_intensity_properties_per_channel"]["0"].update(
        {"percentile_00_5": -200.0, "percentile_99_5": 250.0, "mean": 40.0, "std": 60.0}
    )
    (folder / "plans.json").write_text(json.dumps(plans))

    image, _ = phantom(shape=(6, 64, 80), seed=3)
    spacing_xyz = (1.0, 1.0, 2.0)  # the model's spacing (z 2, y 1, x 1): no resampling
    origin = (-40.0, 12.0, 5.0)
    full = write_image(tmp_path / "full.nii.gz", image, spacing_xyz, origin)
    box = body_bbox(image, spacing_xyz[::-1])
    assert box[1] != [0, 64] and box[2] != [0, 80]  # the test needs a real crop
    cropped = full[box[2][0] : box[2][1], box[1][0] : box[1][1], box[0][0] : box[0][1]]  # SimpleITK: x, y, z
    sitk.WriteImage(cropped, str(tmp_path / "cropped.nii.gz"))

    common = ("--workdir", workdir, "--dataset", 958, "--device", "cpu", "--no-tta")
    assert run_cli("-i", tmp_path / "full.nii.gz", "-o", tmp_path / "with_crop.nii.gz", "--crop-body", *common) == 0
    assert run_cli("-i", tmp_path / "cropped.nii.gz", "-o", tmp_path / "of_crop.nii.gz", *common) == 0

    pred = sitk.ReadImage(str(tmp_path / "with_crop.nii.gz"))
    assert pred.GetSize() == full.GetSize()
    np.testing.assert_allclose(pred.GetOrigin(), full.GetOrigin())
    np.testing.assert_allclose(pred.GetSpacing(), full.GetSpacing())
    labels = sitk.GetArrayFromImage(pred)
    inside = tuple(slice(a, b) for a, b in box)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "of_crop.nii.gz")))
    np.testing.assert_array_equal(labels[inside], reference)
    outside = np.ones(labels.shape, bool)
    outside[inside] = False
    assert not labels[outside].any()  # background outside the body box
    assert labels[inside].any()  # the random network predicts some foreground inside
