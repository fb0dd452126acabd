"""`mednext evaluate`: Dice and normalised surface Dice against hand-computed values."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")

from mednext.cli import main  # noqa: E402
from mednext.pipeline.evaluate import (  # noqa: E402
    LabelSet,
    Tolerances,
    dice,
    evaluate_folders,
    normalized_surface_dice,
    parse_tolerances,
    surface_voxels,
)


def cube(shape=(10, 10, 12), start=(3, 3, 3), size=4, label=1) -> np.ndarray:
    """A label map (z, y, x) holding a size^3 cube whose lowest corner is ``start``."""
    array = np.zeros(shape, np.uint8)
    array[tuple(slice(s, s + size) for s in start)] = label
    return array


def save(path: Path, array: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


# Two 4x4x4 cubes, the prediction shifted by one voxel along x. Each cube has 56 surface voxels
# (64 minus the 2x2x2 interior). Surface voxels shared by both (distance 0): for each of the three
# overlapping x-planes, the 12 voxels on the border of the 4x4 (y, z) square -> 36 per cube.
#  - isotropic 1 mm, tolerance < 1 mm: only the shared ones count: (36 + 36) / 112 = 9/14.
#  - isotropic 1 mm, tolerance 1 mm: every other surface voxel is 1 mm from the other surface: 1.
#  - x spacing 2 mm, tolerance 1 mm: the 4 inner voxels of the face inside the other cube are 1 mm
#    (along y or z) from its side faces; the 16 of the outer face are 2 mm away: (40 + 40) / 112 = 5/7.
#  - x spacing 2 mm, tolerance 2 mm: 1.
# Dice: 48 shared voxels of 64 each: 0.75.
SHIFTED_CUBES = [
    ((1.0, 1.0, 1.0), 0.0, 9 / 14),
    ((1.0, 1.0, 1.0), 0.5, 9 / 14),
    ((1.0, 1.0, 1.0), 1.0, 1.0),
    ((2.0, 1.0, 1.0), 1.0, 5 / 7),
    ((2.0, 1.0, 1.0), 1.99, 5 / 7),
    ((2.0, 1.0, 1.0), 2.0, 1.0),
    ((1.0, 1.0, 2.0), 1.0, 1.0),  # the z spacing does not matter for a shift along x
]


def test_surface_voxels_of_a_cube():
    surface = surface_voxels(cube().astype(bool))
    assert surface.sum() == 56
    assert not surface[4:6, 4:6, 4:6].any()


@pytest.mark.parametrize(("spacing_xyz", "tolerance", "expected"), SHIFTED_CUBES)
def test_nsd_of_shifted_cubes(spacing_xyz, tolerance, expected):
    ref = cube().astype(bool)
    pred = cube(start=(3, 3, 4)).astype(bool)
    spacing_zyx = spacing_xyz[::-1]
    assert normalized_surface_dice(pred, ref, spacing_zyx, tolerance) == pytest.approx(expected)
    assert dice(pred, ref) == pytest.approx(0.75)


def test_nsd_of_single_voxels_and_empty_masks():
    a = np.zeros((9, 9, 9), bool)
    b = a.copy()
    a[4, 4, 1] = True
    b[4, 4, 4] = True  # 3 voxels apart along x
    assert normalized_surface_dice(a, b, (1, 1, 1), 2.0) == 0.0
    assert normalized_surface_dice(a, b, (1, 1, 1), 3.0) == 1.0
    assert normalized_surface_dice(a, b, (1, 1, 0.5), 2.0) == 1.0  # 1.5 mm
    assert dice(a, b) == 0.0
    empty = np.zeros_like(a)
    assert math.isnan(normalized_surface_dice(empty, empty, (1, 1, 1)))
    assert math.isnan(dice(empty, empty))
    assert normalized_surface_dice(empty, b, (1, 1, 1)) == 0.0
    assert dice(empty, b) == 0.0


def test_nsd_in_2d_and_single_slice_volumes():
    # 4x4 squares shifted by one pixel: 12 border pixels each, 6 shared -> (6 + 6) / 24 at < 1 mm.
    ref = np.zeros((10, 10), bool)
    ref[3:7, 3:7] = True
    pred = np.roll(ref, 1, axis=1)
    assert normalized_surface_dice(pred, ref, (1, 1), 0.5) == pytest.approx(0.5)
    # the same as a one-slice volume (nnU-Net reads 2D images as (1, y, x) with a huge z spacing)
    assert normalized_surface_dice(pred[None], ref[None], (999, 1, 1), 0.5) == pytest.approx(0.5)


def test_folder_evaluation_cli_json_csv_and_table(tmp_path, capsys):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    spacing = (2.0, 1.0, 1.0)  # (x, y, z)
    # case1: label 1 shifted by one voxel along x; label 2 identical.
    ref1 = cube() + cube(start=(3, 3, 8), size=2, label=2)
    pred1 = cube(start=(3, 3, 4)) + cube(start=(0, 0, 0), size=2, label=2)
    pred1[pred1 == 2] = 0
    pred1[3:5, 3:5, 8:10] = 2
    save(pred_dir / "case1.nii.gz", pred1, spacing, (5.0, -3.0, 1.5))
    save(ref_dir / "case1.nii.gz", ref1, spacing, (5.0, -3.0, 1.5))
    # case2: label 1 perfect, label 2 absent from both (no score), so the mean of label 2 is case1's.
    save(pred_dir / "case2.nii.gz", cube(), spacing)
    save(ref_dir / "case2.nii.gz", cube(), spacing)
    save(ref_dir / "case3.nii.gz", cube(), spacing)  # no prediction
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}))
    out = tmp_path / "res" / "metrics.json"
    code = main(["evaluate", str(pred_dir), str(ref_dir), "--labels", str(labels), "--tolerance", "1", "-o", str(out),
                 "--chill"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "liver" in printed and "case3" in printed and "1 mm" in printed

    result = json.loads(out.read_text())
    assert result["tolerance_mm"] == 1.0
    assert result["missing_predictions"] == ["case3"]
    case1, case2 = result["cases"]
    assert case1["case"] == "case1" and case2["case"] == "case2"
    assert case1["metrics"]["liver"]["dice"] == pytest.approx(0.75)
    assert case1["metrics"]["liver"]["nsd"] == pytest.approx(5 / 7)
    assert case1["metrics"]["spleen"] == {"dice": 1.0, "nsd": 1.0, "voxels_prediction": 8, "voxels_reference": 8}
    assert case2["metrics"]["spleen"]["dice"] is None and case2["metrics"]["spleen"]["nsd"] is None
    assert result["mean"]["liver"]["dice"] == pytest.approx((0.75 + 1) / 2)
    assert result["mean"]["liver"]["nsd"] == pytest.approx((5 / 7 + 1) / 2)
    assert result["mean"]["spleen"] == {"dice": 1.0, "nsd": 1.0, "n": 1}
    assert result["foreground_mean"]["dice"] == pytest.approx(((0.75 + 1) / 2 + 1) / 2)

    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    by_key = {(r["case"], r["class"]): r for r in rows}
    assert float(by_key[("case1", "liver")]["nsd"]) == pytest.approx(5 / 7, abs=1e-6)
    assert by_key[("case2", "spleen")]["dice"] == ""
    assert float(by_key[("mean", "liver")]["dice"]) == pytest.approx(0.875, abs=1e-6)

    # nnU-Net's summary.json beside it, from the engine's own evaluation
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.875)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(1.0)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.9375)
    assert [c["prediction_file"].rsplit("/", 1)[1] for c in summary["metric_per_case"]] == [
        "case1.nii.gz",
        "case2.nii.gz",
    ]

    # nnU-Net's order (--gt, --pred) gives the same; a missing prediction is an error unless --chill
    again = tmp_path / "again" / "metrics.json"
    assert main(["evaluate", "--gt", str(ref_dir), "--pred", str(pred_dir), "-djfile", str(labels), "--tolerance", "1",
                 "-o", str(again), "--chill"]) == 0  # fmt: skip
    assert json.loads(again.read_text())["mean"] == result["mean"]
    capsys.readouterr()
    assert main(["evaluate", str(pred_dir), str(ref_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "case3" in err and "--chill" in err
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--gt", str(ref_dir)]) == 2  # a folder given twice


def test_default_labels_from_values_and_prediction_folder(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    save(pred_dir / "a.nii.gz", cube(label=3))
    save(ref_dir / "a.nii.gz", cube(label=3))
    save(pred_dir / "b.nii.gz", cube(label=1))
    save(ref_dir / "b.nii.gz", np.zeros((10, 10, 12), np.uint8))
    result = evaluate_folders(pred_dir, ref_dir)
    assert list(result.labels.classes) == ["label_1", "label_3"]
    a, b = result.cases
    assert a.metrics["label_3"]["dice"] == 1.0 and math.isnan(a.metrics["label_1"]["dice"])
    assert b.metrics["label_1"]["dice"] == 0.0 and b.metrics["label_1"]["nsd"] == 0.0
    # a dataset.json in the prediction folder (as mednext predict writes) names the classes
    (pred_dir / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "tumour": 3}, "file_ending": ".nii.gz"})
    )
    result = evaluate_folders(pred_dir, ref_dir)
    assert list(result.labels.classes) == ["tumour"]
    assert result.mean()["tumour"]["dice"] == 1.0  # absent from both in case b: not averaged


def test_regions_and_ignore_label(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    ref = cube() + cube(start=(3, 3, 3), size=2, label=1)  # label 2 inside label 1
    ref[ref == 2] = 2
    pred = ref.copy()
    pred[0, 0, 0] = 1  # a false positive under the ignore label
    ref[0, 0, 0] = 9
    save(pred_dir / "c.nii.gz", pred)
    save(ref_dir / "c.nii.gz", ref)
    labels = LabelSet({"whole": (1, 2), "core": (2,)}, ignore=9)
    result = evaluate_folders(pred_dir, ref_dir, labels)
    assert result.cases[0].metrics["whole"]["dice"] == 1.0
    assert result.cases[0].metrics["whole"]["nsd"] == 1.0
    without_ignore = evaluate_folders(pred_dir, ref_dir, LabelSet({"whole": (1, 2)}))
    assert without_ignore.cases[0].metrics["whole"]["dice"] < 1.0


def test_png_evaluation(tmp_path):
    from PIL import Image

    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    ref = np.zeros((10, 10), np.uint8)
    ref[3:7, 3:7] = 1
    Image.fromarray(ref).save(ref_dir / "s.png")
    Image.fromarray(np.roll(ref, 1, axis=1)).save(pred_dir / "s.png")
    result = evaluate_folders(pred_dir, ref_dir, tolerance_mm=0.5)
    assert result.cases[0].metrics["label_1"]["nsd"] == pytest.approx(0.5)
    assert result.cases[0].metrics["label_1"]["dice"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"origin": (1.0, 0.0, 0.0)}, "origin"),
        ({"spacing": (1.0, 1.0, 1.5)}, "spacing"),
        ({"shape": (10, 10, 13)}, "size"),
    ],
)
def test_geometry_mismatch_is_an_error(tmp_path, capsys, change, word):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    save(ref_dir / "g.nii.gz", cube())
    save(
        pred_dir / "g.nii.gz",
        cube(shape=change.get("shape", (10, 10, 12))),
        change.get("spacing", (1.0, 1.0, 1.0)),
        change.get("origin", (0.0, 0.0, 0.0)),
    )
    assert main(["evaluate", str(pred_dir), str(ref_dir)]) == 2
    err = capsys.readouterr().err
    assert word in err and "g.nii.gz" in err and "resample" in err


def test_prediction_without_reference_and_empty_folder(tmp_path, capsys):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    assert main(["evaluate", str(pred_dir), str(ref_dir)]) == 2
    assert "no label maps" in capsys.readouterr().err
    save(pred_dir / "x.nii.gz", cube())
    assert main(["evaluate", str(pred_dir), str(ref_dir)]) == 2
    err = capsys.readouterr().err
    assert "x" in err and "no reference" in err


def test_nsd_agrees_with_monai_compute_surface_dice():
    monai_metrics = pytest.importorskip("monai.metrics")
    import torch
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for trial in range(8):
        shape = (20, 24, 28) if trial % 2 else (30, 34)
        pred, ref = (ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.1 for _ in range(2))
        spacing = tuple(float(s) for s in rng.uniform(0.5, 2.5, len(shape)))
        tolerance = float(rng.uniform(0.5, 4.0))

        def one_hot(mask: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.stack([~mask, mask]))[None].float()

        theirs = monai_metrics.compute_surface_dice(
            one_hot(pred), one_hot(ref), [tolerance], include_background=False, spacing=list(spacing)
        ).item()
        assert normalized_surface_dice(pred, ref, spacing, tolerance) == pytest.approx(theirs, abs=1e-6), trial


# ----------------------------------------------------------------------------- per-class NSD tolerances


def test_parse_tolerances():
    assert parse_tolerances(None) == Tolerances(2.0, {})
    assert parse_tolerances(["1.5"]) == Tolerances(1.5, {})
    parsed = parse_tolerances(["liver=2", "tumour=1", "3"])
    assert parsed.default_mm == 3.0 and parsed.per_class_mm == {"liver": 2.0, "tumour": 1.0}
    assert parsed.for_class("tumour") == 1.0 and parsed.for_class("spleen") == 3.0
    assert parse_tolerances(["whole tumour=0.5"]).per_class_mm == {"whole tumour": 0.5}  # a quoted name
    assert parse_tolerances(["liver=1"]).default_mm == 2.0  # the others keep the default
    assert parsed.describe() == "3 mm (liver 2 mm, tumour 1 mm)"


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["2", "3"], "two tolerances for all classes (2 and 3)"),
        (["liver=1", "liver=2"], "names class 'liver' twice"),
        (["liver=x"], "'liver=x': 'x' is not a number of mm"),
        (["=1"], "give the class name before '='"),
        (["liver=-1"], "must be a finite number of mm >= 0"),
        (["nan"], "must be a finite number of mm >= 0"),
        (["preds/"], "Give the folders before --tolerance"),
    ],
)
def test_parse_tolerances_errors(tokens, message):
    with pytest.raises(ValueError) as err:
        parse_tolerances(tokens)
    assert message in str(err.value)


def _two_shifted_cubes(tmp_path):
    """liver (1) and spleen (2): two 4x4x4 cubes, each predicted one voxel further along x, 2 mm there.
    NSD per class: 5/7 at 1 mm and 1 at 2 mm (SHIFTED_CUBES); Dice 0.75 at any tolerance."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    shape = (10, 10, 24)
    ref = cube(shape, (3, 3, 3)) + cube(shape, (3, 3, 14), label=2)
    pred = cube(shape, (3, 3, 4)) + cube(shape, (3, 3, 15), label=2)
    save(ref_dir / "s.nii.gz", ref, (2.0, 1.0, 1.0))
    save(pred_dir / "s.nii.gz", pred, (2.0, 1.0, 1.0))
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}))
    return pred_dir, ref_dir, labels


def test_a_class_tolerance_changes_that_class_only(tmp_path, capsys):
    pred_dir, ref_dir, labels = _two_shifted_cubes(tmp_path)
    out = tmp_path / "liver1.json"
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--labels", str(labels), "--tolerance", "liver=1", "2",
                 "-o", str(out)]) == 0  # fmt: skip
    assert "NSD tolerance 2 mm (liver 1 mm)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    metrics = result["cases"][0]["metrics"]
    assert metrics["liver"]["nsd"] == pytest.approx(5 / 7) and metrics["spleen"]["nsd"] == pytest.approx(1.0)
    assert metrics["liver"]["dice"] == pytest.approx(0.75) and metrics["spleen"]["dice"] == pytest.approx(0.75)
    assert result["tolerance_mm"] == 2.0 and result["nsd_tolerance_mm"] == {"liver": 1.0, "spleen": 2.0}
    assert (
        "Nikolov" in result["metric_definitions"]["nsd"] and "nsd_tolerance_mm" in result["metric_definitions"]["nsd"]
    )
    rows = {(r["case"], r["class"]): r for r in csv.DictReader(out.with_suffix(".csv").open())}
    assert rows[("s", "liver")]["nsd_tolerance_mm"] == "1" and rows[("mean", "spleen")]["nsd_tolerance_mm"] == "2"

    # the other way round, and the Python API with a mapping (others at 2 mm) and with one number
    out = tmp_path / "spleen1.json"
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--labels", str(labels), "--tolerance", "spleen=1",
                 "-o", str(out)]) == 0  # fmt: skip
    metrics = json.loads(out.read_text())["cases"][0]["metrics"]
    assert metrics["liver"]["nsd"] == pytest.approx(1.0) and metrics["spleen"]["nsd"] == pytest.approx(5 / 7)
    mapped = evaluate_folders(pred_dir, ref_dir, labels, {"spleen": 1.0}, strict=True)
    assert mapped.mean()["spleen"]["nsd"] == pytest.approx(5 / 7) and mapped.mean()["liver"]["nsd"] == 1.0
    assert mapped.tolerance_for("spleen") == 1.0 and mapped.tolerance_for("liver") == 2.0
    single = evaluate_folders(pred_dir, ref_dir, labels, 1.0, strict=True)
    assert single.tolerance_mm == 1.0 and single.tolerances is None
    assert [single.mean()[c]["nsd"] for c in ("liver", "spleen")] == pytest.approx([5 / 7, 5 / 7])
    assert single.to_dict()["nsd_tolerance_mm"] == {"liver": 1.0, "spleen": 1.0}


def test_unknown_class_in_tolerance_is_named(tmp_path, capsys):
    pred_dir, ref_dir, labels = _two_shifted_cubes(tmp_path)
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--labels", str(labels), "--tolerance", "livr=1"]) == 2
    err = capsys.readouterr().err
    assert "'livr'" in err and str(labels) in err and "liver, spleen" in err
    assert not (pred_dir / "evaluation.json").exists()
    # without a dataset.json the classes are label_<value>: other names are refused before reading files,
    # and a value found in no label map after
    with pytest.raises(ValueError, match="label_<value>"):
        evaluate_folders(pred_dir, ref_dir, None, {"liver": 1.0})
    with pytest.raises(ValueError, match="'label_7', not a class of the label maps .* label_1, label_2"):
        evaluate_folders(pred_dir, ref_dir, None, {"label_7": 1.0})
    assert evaluate_folders(pred_dir, ref_dir, None, {"label_2": 1.0}).mean()["label_2"]["nsd"] == pytest.approx(5 / 7)
    # a folder taken for a tolerance: the error says where the folders go
    assert main(["evaluate", "--tolerance", "2", str(pred_dir), str(ref_dir)]) == 2
    assert "Give the folders before --tolerance" in capsys.readouterr().err
    assert main(["evaluate", "--tolerance=1", str(pred_dir), str(ref_dir), "--labels", str(labels)]) == 0
