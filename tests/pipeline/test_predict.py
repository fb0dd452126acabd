"""`mednext predict` against fabricated results folders (nnU-Net v2 layout, fresh MedNeXt weights).

The results folders follow the trainer contract: plans.json naming ``mednext.nn.MedNeXt`` with its
arguments, dataset.json, and ``fold_{f}/checkpoint_{final,best,latest}.pth`` in nnU-Net v2's
checkpoint format (including numpy scalars in the training log, as nnU-Net's logger writes them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")

from mednext.cli import main  # noqa: E402
from mednext.nn import MedNeXt  # noqa: E402

TRAINER = "MedNeXtTrainer_Sk3"
PLANS = "MedNeXtPlans"
# nnU-Net axis order (z, y, x); SimpleITK spacing is (x, y, z).
SPACING = (2.0, 1.0, 1.0)
PATCH = (8, 16, 16)
ARCH = {
    "spatial_dims": 3,
    "width": 4,
    "strides": [[1, 2, 2], [2, 2, 2]],
    "expansion_ratios": 2,
    "block_counts": 1,
    "kernel_sizes": 3,
    "deep_supervision": True,
}


def _config(patch, spacing, n_channels, arch):
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": "MedNeXtPlans_test",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch),
        "median_image_size_in_voxels": [float(p) for p in patch],
        "spacing": list(spacing),
        "normalization_schemes": ["ZScoreNormalization"] * n_channels,
        "use_mask_for_norm": [False] * n_channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {"network_class_name": "mednext.nn.MedNeXt", "arch_kwargs": arch, "_kw_requires_import": []},
        "batch_dice": False,
    }


def make_results_folder(
    results: Path,
    dataset: str,
    *,
    n_channels: int = 1,
    labels: dict | None = None,
    file_ending: str = ".nii.gz",
    configurations: dict | None = None,
    trainer: str = TRAINER,
    plans_name: str = PLANS,
    folds: dict | None = None,
    reader: str = "SimpleITKIO",
) -> Path:
    """Write a results folder; ``folds`` maps fold -> {checkpoint name: seed}. Returns the folder."""
    labels = labels or {"background": 0, "a": 1, "b": 2}
    configurations = configurations or {"3d_fullres": _config(PATCH, SPACING, n_channels, ARCH)}
    folds = folds if folds is not None else {0: {"final": 0}}
    plans = {
        "dataset_name": dataset,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": list(next(iter(configurations.values()))["spacing"]),
        "original_median_shape_after_transp": [16, 16, 16],
        "image_reader_writer": reader,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": configurations,
        "experiment_planner_used": "MedNeXtPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 3.0, "mean": 0.0, "median": 0.0, "min": -3.0, "percentile_00_5": -2.5,
                     "percentile_99_5": 2.5, "std": 1.0}
            for c in range(n_channels)
        },
    }  # fmt: skip
    dataset_json = {
        "channel_names": {str(c): f"ch{c}" for c in range(n_channels)},
        "labels": labels,
        "numTraining": 5,
        "file_ending": file_ending,
    }
    written = []
    for configuration, conf in configurations.items():
        folder = results / dataset / f"{trainer}__{plans_name}__{configuration}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plans.json").write_text(json.dumps(plans, indent=1))
        (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
        (folder / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [conf["spacing"]]}))
        for fold, checkpoints in folds.items():
            (folder / f"fold_{fold}").mkdir(exist_ok=True)
            for name, seed in checkpoints.items():
                torch.manual_seed(seed)
                net = MedNeXt(n_channels, len(labels), **conf["architecture"]["arch_kwargs"])
                checkpoint = {
                    "network_weights": net.state_dict(),
                    "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                    "grad_scaler_state": None,
                    "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float32(0.4)],
                                "epoch_end_timestamps": [1.0], "dice_per_class_or_region": [np.array([0.5, 0.25])]},
                    "_best_ema": np.float64(0.4),
                    "current_epoch": 1,
                    "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                                  "dataset_json": dataset_json, "device": torch.device("cpu")},
                    "trainer_name": trainer,
                    "inference_allowed_mirroring_axes": tuple(range(len(conf["patch_size"]))),
                }  # fmt: skip
                torch.save(checkpoint, folder / f"fold_{fold}" / f"checkpoint_{name}.pth")
        written.append(folder)
    return written[0]


def write_image(path: Path, array: np.ndarray, spacing_xyz, origin=None, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_xyz])
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image


def blob_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.normal(0, 1, shape).astype(np.float32)
    array[tuple(slice(s // 4, 3 * s // 4) for s in shape)] += 3.0
    return array + 10.0  # no zeros: nnU-Net's crop-to-nonzero keeps the whole image


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(1)
    return tmp_path / "work"


def results_root(workdir: Path) -> Path:
    return workdir / "nnUNet_results"


def run_cli(*args) -> int:
    return main(["predict", *map(str, args)])


def test_predicts_folder_and_keeps_geometry(workdir, tmp_path):
    make_results_folder(results_root(workdir), "Dataset951_Geo")
    inp = tmp_path / "in"
    inp.mkdir()
    rotation = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degrees about z: not identity
    written = {
        "caseA": write_image(
            inp / "caseA_0000.nii.gz", blob_image((10, 20, 24)), (1, 1, 2), (-12.5, 40.0, 7.25), rotation
        ),
        "caseB": write_image(inp / "caseB.nii.gz", blob_image((9, 17, 19), seed=1), (1.2, 0.9, 2.5), (3.0, -2.0, 1.0)),
    }
    out = tmp_path / "out"
    assert run_cli("-i", inp, "-o", out, "--workdir", workdir, "--dataset", 951, "--device", "cpu", "--no-tta") == 0
    for case, source in written.items():
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == source.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), source.GetSpacing())
        np.testing.assert_allclose(pred.GetOrigin(), source.GetOrigin())
        np.testing.assert_allclose(pred.GetDirection(), source.GetDirection())
        values = set(np.unique(sitk.GetArrayFromImage(pred)).tolist())
        assert values <= {0, 1, 2}
    assert json.loads((out / "dataset.json").read_text())["file_ending"] == ".nii.gz"
    record = json.loads((out / "mednext_predict.json").read_text())
    assert record["folds"] == [0] and record["tta"] is False
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def _direct_probabilities(folder: Path, image: np.ndarray, folds, tta: bool) -> np.ndarray:
    """Softmax of the fold-averaged (and flip-averaged) logits of the saved networks on one patch."""
    x = (image - image.mean()) / image.std()  # nnU-Net's z-score normalisation, whole image
    x = torch.from_numpy(x.astype(np.float32))[None, None]
    axes = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [()]
    total = 0
    for fold in folds:
        net = MedNeXt(1, 3, **ARCH)
        net.load_state_dict(
            torch.load(folder / f"fold_{fold}" / "checkpoint_final.pth", weights_only=False)["network_weights"]
        )
        net.eval()
        with torch.no_grad():
            total = total + sum(torch.flip(net(torch.flip(x, a)), a) if a else net(x) for a in axes) / len(axes)
    return torch.softmax(total / len(folds), 1)[0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("tta", [True, False])
def test_probabilities_match_the_networks_fold_ensemble(workdir, tmp_path, tta):
    folder = make_results_folder(
        results_root(workdir), "Dataset952_Ens", folds={0: {"final": 1}, 1: {"final": 2}, 2: {"latest": 3}}
    )
    image = blob_image(PATCH, seed=3)  # one window, plan spacing: no resampling, no padding
    path = tmp_path / "one_0000.nii.gz"
    write_image(path, image, SPACING[::-1], (1.0, 2.0, 3.0))
    out = tmp_path / "out"
    args = ["-i", path, "-o", out, "--workdir", workdir, "--dataset", "Dataset952_Ens", "--save-probabilities",
            "--device", "cpu"]  # fmt: skip
    assert run_cli(*args, *([] if tta else ["--no-tta"])) == 0
    record = json.loads((out / "mednext_predict.json").read_text())
    assert record["folds"] == [0, 1]  # fold 2 has no checkpoint_final.pth
    assert record["mirror_axes"] == [0, 1, 2]
    probabilities = np.load(out / "one.npz")["probabilities"]
    expected = _direct_probabilities(folder, image, [0, 1], tta)
    assert probabilities.shape == expected.shape == (3, *PATCH)
    # The engine accumulates Gaussian-weighted logits in float16; where the Gaussian is tiny (the
    # patch's outermost voxels) that loses precision, so compare inside.
    inner = (slice(None), slice(1, -1), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(probabilities[inner], expected[inner], atol=2e-3)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "one.nii.gz")))
    assert np.array_equal(seg, probabilities.argmax(0))
    # one fold only gives a different answer: the folds were really averaged
    assert run_cli(*args, "--fold", "0", "-o", tmp_path / "f0", *([] if tta else ["--no-tta"])) == 0
    single = np.load(tmp_path / "f0" / "one.npz")["probabilities"]
    np.testing.assert_allclose(single[inner], _direct_probabilities(folder, image, [0], tta)[inner], atol=2e-3)
    assert np.abs(single - probabilities)[inner].max() > 0.01


def _write_dicom_series(folder: Path, volume: sitk.Image) -> None:
    folder.mkdir(parents=True)
    uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    d = volume.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    for i in range(volume.GetDepth()):
        plane = volume[:, :, i]
        tags = {
            "0008|0060": "CT",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0008|0018": f"{uid}.3.{i}",
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, i))),
            "0020|0013": str(i + 1),
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"CT.{uid}.{i}"))  # no file ending, as scanners often write them
        writer.Execute(plane)


def test_predicts_dicom_series_with_its_geometry(workdir, tmp_path):
    make_results_folder(results_root(workdir), "Dataset953_Dicom")
    volume = sitk.GetImageFromArray((blob_image((7, 18, 20)) * 20).astype(np.int16))
    volume.SetSpacing((0.9, 0.8, 2.5))
    volume.SetOrigin((-100.0, 20.0, 35.5))
    volume.SetDirection((1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0))
    _write_dicom_series(tmp_path / "scans" / "series1", volume)
    out = tmp_path / "out"
    args = ["-o", out, "--workdir", workdir, "--dataset", 953, "--no-tta", "--device", "cpu"]
    assert run_cli("-i", tmp_path / "scans" / "series1", *args) == 0
    pred = sitk.ReadImage(str(out / "series1.nii.gz"))
    assert pred.GetSize() == volume.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), volume.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(pred.GetOrigin(), volume.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(pred.GetDirection(), volume.GetDirection(), atol=1e-6)
    # a folder of series folders: one case per series
    moved = sitk.Image(volume)
    moved.SetOrigin((4.0, -7.5, 12.0))
    _write_dicom_series(tmp_path / "scans" / "series2", moved)
    assert run_cli("-i", tmp_path / "scans", *args[:1], tmp_path / "out2", *args[2:]) == 0
    assert sorted(p.name for p in (tmp_path / "out2").glob("*.nii.gz")) == ["series1.nii.gz", "series2.nii.gz"]
    pred2 = sitk.ReadImage(str(tmp_path / "out2" / "series2.nii.gz"))
    np.testing.assert_allclose(pred2.GetOrigin(), moved.GetOrigin(), atol=1e-4)
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out2" / "series1.nii.gz"))),
        sitk.GetArrayFromImage(pred),
    )


def test_single_file_to_output_file_and_multichannel_folder(workdir, tmp_path):
    make_results_folder(results_root(workdir), "Dataset954_Two", n_channels=2)
    inp = tmp_path / "in"
    inp.mkdir()
    for c in range(2):
        write_image(inp / f"pat_{c:04d}.nii.gz", blob_image((8, 16, 16), seed=c), (1, 1, 2))
    target = tmp_path / "seg" / "pat_seg.nii.gz"
    assert run_cli("-i", inp / "pat_0001.nii.gz", "-o", target, "--workdir", workdir, "--dataset", 954, "--no-tta") == 0
    assert sitk.ReadImage(str(target)).GetSize() == (16, 16, 8)
    assert sorted(p.name for p in target.parent.iterdir()) == ["pat_seg.nii.gz"]
    assert run_cli("-i", inp, "-o", tmp_path / "out", "--workdir", workdir, "--dataset", 954, "--no-tta") == 0
    assert (tmp_path / "out" / "pat.nii.gz").is_file()


def test_2d_png_model_on_unsuffixed_files(workdir, tmp_path, capsys):
    arch = {**ARCH, "spatial_dims": 2, "strides": [2, 2]}
    conf = _config((32, 32), (1.0, 1.0), 1, arch)
    make_results_folder(
        results_root(workdir), "Dataset955_Png", file_ending=".png", configurations={"2d": conf},
        reader="NaturalImage2DIO",
    )  # fmt: skip
    from PIL import Image

    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("slide1", (40, 48)), ("slide2", (33, 29))):
        Image.fromarray(rng.integers(1, 255, shape).astype(np.uint8)).save(inp / f"{name}.png")
    out = tmp_path / "out"
    assert run_cli("-i", inp, "-o", inp, "--workdir", workdir, "--dataset", 955) == 2
    assert "overwrite its input" in capsys.readouterr().err
    assert run_cli("-i", inp, "-o", out, "--workdir", workdir, "--dataset", 955, "--device", "cpu") == 0
    assert np.asarray(Image.open(out / "slide1.png")).shape == (40, 48)
    assert np.asarray(Image.open(out / "slide2.png")).shape == (33, 29)


def _error(capsys, *args) -> str:
    assert run_cli(*args) == 2
    return capsys.readouterr().err


def test_errors_name_the_problem_and_the_fix(workdir, tmp_path, capsys):
    make_results_folder(results_root(workdir), "Dataset956_Err", n_channels=2, folds={0: {"final": 0, "latest": 0}})
    inp = tmp_path / "in"
    inp.mkdir()
    write_image(inp / "x_0000.nii.gz", blob_image((8, 16, 16)), (1, 1, 2))
    base = ["--workdir", workdir, "--dataset", 956, "-o", tmp_path / "out"]

    err = _error(capsys, "-i", tmp_path / "nope", *base)
    assert "nope does not exist" in err
    err = _error(capsys, "-i", inp, *base)
    assert "x_0001.nii.gz" in err and "2 channel(s)" in err
    write_image(inp / "x_0001.nrrd", blob_image((8, 16, 16)), (1, 1, 2))
    err = _error(capsys, "-i", inp, *base)
    assert "x_0001.nrrd" in err and "'.nii.gz'" in err
    (inp / "x_0001.nrrd").unlink()
    write_image(inp / "x_0001.nii.gz", blob_image((8, 16, 16)), (1, 1, 2))
    err = _error(capsys, "-i", inp, *base, "--fold", "3")
    assert "fold 3 was not trained" in err and "fold_0" in err
    err = _error(capsys, "-i", inp, *base, "--checkpoint", "best")
    assert "checkpoint_best.pth" in err and "checkpoint_final.pth" in err and "--checkpoint" in err
    err = _error(capsys, "-i", inp, *base[:3], 957, *base[4:])
    assert "957" in err
    if not torch.cuda.is_available():
        err = _error(capsys, "-i", inp, *base, "--device", "cuda")
        assert "--device cpu" in err
    # a surplus channel inside one file (4D image with 3 volumes as channel 0)
    four_d = sitk.GetImageFromArray(np.stack([blob_image((8, 16, 16))] * 3), isVector=False)
    sitk.WriteImage(four_d, str(inp / "x_0000.nii.gz"))
    err = _error(capsys, "-i", inp, *base)
    assert "channel" in err and "x_0000.nii.gz" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_several_trained_models_need_a_choice(workdir, tmp_path, capsys):
    make_results_folder(results_root(workdir), "Dataset958_Many")
    make_results_folder(results_root(workdir), "Dataset958_Many", trainer="MedNeXtTrainer_Bk5")
    path = tmp_path / "c.nii.gz"
    write_image(path, blob_image((8, 16, 16)), (1, 1, 2))
    base = ["-i", path, "-o", tmp_path / "out", "--workdir", workdir, "--dataset", 958, "--no-tta"]
    err = _error(capsys, *base)
    assert "MedNeXtTrainer_Sk3__MedNeXtPlans__3d_fullres" in err and "MedNeXtTrainer_Bk5" in err
    assert "--model" in err
    err = _error(capsys, *base, "--model", "L")
    assert "no trained MedNeXt model" in err and "--model L" in err
    assert run_cli(*base, "--model", "b", "--kernel", "5") == 0
    assert "MedNeXtTrainer_Bk5" in json.loads((tmp_path / "out" / "mednext_predict.json").read_text())["results_folder"]


def test_checkpoint_with_unsafe_objects_is_refused(workdir, tmp_path, capsys):
    folder = make_results_folder(results_root(workdir), "Dataset959_Unsafe")
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    content = torch.load(checkpoint, weights_only=False)
    path = tmp_path / "c.nii.gz"
    write_image(path, blob_image((8, 16, 16)), (1, 1, 2))
    for unsafe in (argparse.Namespace(a=1), np.array([{"a": 1}], dtype=object)):
        content["init_args"]["extra"] = unsafe
        torch.save(content, checkpoint)
        err = _error(capsys, "-i", path, "-o", tmp_path / "out", "--workdir", workdir, "--dataset", 959)
        # refused by mednext.nn.safe_torch_load, naming the file, before any pickled code runs
        assert "checkpoint_final.pth" in err and ("refused to load" in err or "could not be unpickled" in err)


@pytest.mark.slow
def test_real_plans_predict_then_evaluate(workdir, tmp_path, capsys):
    """Plans from mednext's own planner (not hand-written), a fresh S k3 network, predict, evaluate."""
    from synthetic_data import make_dataset

    from mednext.pipeline.datasets import register_dataset
    from mednext.pipeline.planning import MedNeXtPlanner
    from mednext.pipeline.workdir import use_workdir

    folders = use_workdir(workdir)
    raw = make_dataset(tmp_path / "raw", 961, "Real", spatial_dims=3, num_cases=2, shape=(16, 32, 32))
    name = register_dataset(raw)
    # The fingerprint by hand (the engine's extractor spawns worker processes: slow on a small CI box).
    images = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted((raw / "imagesTr").iterdir())]
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted((raw / "labelsTr").iterdir())]
    foreground = np.concatenate([i[lab > 0] for i, lab in zip(images, labels)])
    stats = {"mean": float(foreground.mean()), "median": float(np.median(foreground)), "std": float(foreground.std()),
             "min": float(foreground.min()), "max": float(foreground.max()),
             "percentile_99_5": float(np.percentile(foreground, 99.5)),
             "percentile_00_5": float(np.percentile(foreground, 0.5))}  # fmt: skip
    fingerprint = {
        "foreground_intensity_properties_per_channel": {"0": stats},
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [list(i.shape) for i in images],
        "spacings": [[2.0, 1.0, 1.0] for _ in images],
    }
    (folders.preprocessed / name).mkdir(parents=True, exist_ok=True)
    (folders.preprocessed / name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    plans = MedNeXtPlanner(name, gpu_memory_target_in_gb=8.0).plan_experiment()
    model_folder = folders.results / name / "MedNeXtTrainer_Sk3__MedNeXtPlans__3d_fullres"
    (model_folder / "fold_0").mkdir(parents=True)
    (model_folder / "dataset.json").write_bytes((raw / "dataset.json").read_bytes())
    (model_folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    (model_folder / "plans.json").write_bytes((folders.preprocessed / name / "MedNeXtPlans.json").read_bytes())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "mednext.nn.MedNeXt"
    net = MedNeXt(1, 3, **arch["arch_kwargs"])
    torch.save(
        {"network_weights": net.state_dict(), "trainer_name": "MedNeXtTrainer_Sk3",
         "inference_allowed_mirroring_axes": (0, 1, 2), "init_args": {"configuration": "3d_fullres"}},
        model_folder / "fold_0" / "checkpoint_final.pth",
    )  # fmt: skip
    out = tmp_path / "pred"
    code = run_cli(
        "-i", raw / "imagesTr", "-o", out, "--workdir", workdir, "--dataset", 961, "--no-tta", "--device", "cpu"
    )
    assert code == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert main(["evaluate", str(out), str(raw / "labelsTr")]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert list(result["labels"]) == ["ball", "box"]  # from the dataset.json predict wrote
    assert [c["case"] for c in result["cases"]] == ["case_000", "case_001"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(workdir, tmp_path):
    make_results_folder(results_root(workdir), "Dataset962_Cuda", folds={0: {"final": 5}})
    path = tmp_path / "g_0000.nii.gz"
    write_image(path, blob_image((12, 40, 36), seed=5), (0.8, 1.1, 2.0))
    for device in ("cpu", "cuda"):
        args = ["-i", path, "-o", tmp_path / device, "--workdir", workdir, "--dataset", 962, "--device", device]
        assert run_cli(*args, "--save-probabilities") == 0
    cpu, cuda = (np.load(tmp_path / d / "g.npz")["probabilities"] for d in ("cpu", "cuda"))
    assert np.abs(cpu - cuda).max() < 2e-2  # CUDA runs under float16 autocast
    segs = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / "g.nii.gz"))) for d in ("cpu", "cuda")]
    assert (segs[0] == segs[1]).mean() > 0.99


def test_input_grouping_rules(tmp_path):
    from mednext.pipeline.io import collect_input_cases

    def touch(*names):
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for n in names:
            (folder / n).write_bytes(b"")
        return folder

    def ids(folder, channels=1):
        return {
            c.case_id: [f.name for f in c.files] for c in collect_input_cases(folder, ".nii.gz", channels, tmp_path)
        }

    folder = touch("a_0000.nii.gz", "b.nii.gz", "scan_0003.nii.gz", "notes.txt", ".hidden.nii.gz")
    assert ids(folder) == {"a": ["a_0000.nii.gz"], "b": ["b.nii.gz"], "scan_0003": ["scan_0003.nii.gz"]}
    folder = touch("p_0001.nii.gz", "p_0000.nii.gz", "q_0000.nii.gz", "q_0001.nii.gz")
    assert ids(folder, 2) == {"p": ["p_0000.nii.gz", "p_0001.nii.gz"], "q": ["q_0000.nii.gz", "q_0001.nii.gz"]}
    assert ids(folder / "q_0001.nii.gz", 2) == {"q": ["q_0000.nii.gz", "q_0001.nii.gz"]}
    with pytest.raises(ValueError, match="unexpected channel"):
        ids(touch("c_0000.nii.gz", "c_0001.nii.gz"))
    with pytest.raises(ValueError, match="all name case 'd'"):
        ids(touch("d_0000.nii.gz", "d.nii.gz"))
    with pytest.raises(ValueError, match=r"takes 2 channels.*rename"):
        ids(touch("e.nii.gz"), 2)
    with pytest.raises(ValueError, match="no '.nii.gz' images and no DICOM"):
        ids(touch("readme.txt"))


def test_fold_all_is_used_when_no_numbered_fold_exists(workdir, tmp_path):
    make_results_folder(results_root(workdir), "Dataset963_All", folds={"all": {"final": 0}, 1: {"latest": 0}})
    path = tmp_path / "c.nii.gz"
    write_image(path, blob_image((8, 16, 16)), (1, 1, 2))
    base = ["-i", path, "--workdir", workdir, "--dataset", 963, "--no-tta", "--device", "cpu"]
    assert run_cli(*base, "-o", tmp_path / "a") == 0
    assert json.loads((tmp_path / "a" / "mednext_predict.json").read_text())["folds"] == ["all"]
    assert run_cli(*base, "-o", tmp_path / "b", "--checkpoint", "latest") == 0
    assert json.loads((tmp_path / "b" / "mednext_predict.json").read_text())["folds"] == [1]


# ----------------------------------------------------------------------------- MedNeXtPredictor against the engine


def _predictors(folder: Path, configuration: str, tta: bool, tile_batch: int, **kwargs):
    """Ours from the results folder, and the engine's stock predictor with the same network and weights."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from mednext.pipeline.predictor import MedNeXtPredictor

    ours = MedNeXtPredictor(0.5, use_mirroring=tta, device="cpu", tile_batch=tile_batch, **kwargs)
    ours.initialize_from_trained_model_folder(folder, None)
    manager = PlansManager(json.loads((folder / "plans.json").read_text()))
    network = MedNeXt(**{**ours.network.config})  # a separate copy of the same network
    network.set_deep_supervision(False)
    engine = nnUNetPredictor(0.5, True, tta, False, torch.device("cpu"), False, False, False)
    engine.manual_initialization(
        network.eval(), manager, manager.get_configuration(configuration), ours.list_of_parameters,
        ours.dataset_json, ours.trainer_name, ours.allowed_mirroring_axes,
    )  # fmt: skip
    return ours, engine


@pytest.mark.parametrize("tta", [False, True])
def test_predictor_equals_the_engines_sliding_window(workdir, tta, one_thread):
    folder = make_results_folder(results_root(workdir), "Dataset964_Same", folds={0: {"final": 1}, 1: {"final": 2}})
    torch.manual_seed(0)
    data = torch.randn(1, 14, 30, 27)  # several tiles of 8 x 16 x 16 on every axis, padded nowhere
    ours, engine = _predictors(folder, "3d_fullres", tta, tile_batch=1)
    expected = engine.predict_logits_from_preprocessed_data(data)  # the mean of both folds
    # One tile per forward: the engine's tiles, Gaussian, mirroring and float16 sums, bit for bit.
    logits = ours.predict_logits_from_preprocessed_data(data)
    assert logits.dtype == expected.dtype == torch.float16
    assert torch.equal(logits, expected)
    # Several tiles per forward change the network's float32 rounding only: within float16 steps.
    batched, _ = _predictors(folder, "3d_fullres", tta, tile_batch=4)
    logits = batched.predict_logits_from_preprocessed_data(data)
    step = torch.finfo(torch.float16).eps * expected.float().abs().clamp_min(1)
    assert ((logits.float() - expected.float()).abs() <= 2 * step).all()
    top2 = expected.float().topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 4 * step.amax(0)
    assert torch.equal(logits.argmax(0)[clear], expected.argmax(0)[clear])
    # Float32 sums: same shape, more precise dtype.
    exact, _ = _predictors(folder, "3d_fullres", tta, tile_batch=3, accumulate_dtype=torch.float32)
    assert exact.predict_logits_from_preprocessed_data(data).dtype == torch.float32


def test_predictor_2d_network_on_a_volume_and_small_images(workdir, one_thread):
    arch = {**ARCH, "spatial_dims": 2, "strides": [2, 2]}
    folder = make_results_folder(
        results_root(workdir), "Dataset965_Flat", configurations={"2d": _config((16, 16), (1.0, 1.0), 1, arch)}
    )
    ours, engine = _predictors(folder, "2d", True, tile_batch=1)
    torch.manual_seed(1)
    for shape in ((1, 3, 21, 35), (1, 2, 9, 12)):  # slice by slice; the second smaller than the patch
        data = torch.randn(shape)
        assert torch.equal(
            ours.predict_logits_from_preprocessed_data(data), engine.predict_logits_from_preprocessed_data(data)
        )


def test_the_whole_ensemble_runs_inside_the_memory_policy(workdir, monkeypatch, one_thread):
    import contextlib

    from mednext import config
    from mednext.pipeline import predictor as predictor_module

    depth = [0]
    entered: list[bool] = []

    @contextlib.contextmanager
    def recording(enable: bool = True):
        if depth[0] == 0:
            entered.append(enable)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(predictor_module, "reuse_freed_memory", recording)
    folder = make_results_folder(results_root(workdir), "Dataset966_Mem", folds={0: {"final": 1}, 1: {"final": 2}})
    ours, _ = _predictors(folder, "3d_fullres", False, tile_batch=2)
    inside: list[bool] = []
    ours.network.register_forward_pre_hook(lambda *_: inside.append(depth[0] > 0))
    with config.override(keep_freed_memory=True):
        ours.predict_logits_from_preprocessed_data(torch.randn(1, 10, 20, 20))
    assert entered == [True]  # entered once around both folds, not per forward
    assert inside and all(inside)


def test_predict_case_adopts_a_stock_engine_predictor(workdir, tmp_path, one_thread):
    from mednext.pipeline.io import InputCase
    from mednext.pipeline.predictor import predict_case

    folder = make_results_folder(results_root(workdir), "Dataset967_Stock")
    path = tmp_path / "s_0000.nii.gz"
    write_image(path, blob_image((9, 20, 18), seed=2), (1, 1, 2))
    ours, engine = _predictors(folder, "3d_fullres", True, tile_batch=2)
    case = InputCase("s", [path])
    written = predict_case(engine, case, tmp_path / "stock", save_probabilities=True, tile_batch=2)
    assert [p.name for p in written] == ["stock.nii.gz", "stock.npz", "stock.pkl"]
    expected = ours.predict_case(case, tmp_path / "ours", save_probabilities=True)
    assert np.array_equal(np.load(written[1])["probabilities"], np.load(expected[1])["probabilities"])
