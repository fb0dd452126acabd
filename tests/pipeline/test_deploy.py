"""``mednext export`` with deployment info, and docs/deploy.md's onnxruntime script against ``mednext predict``."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_predict
import torch
from test_predict import ARCH, PATCH, SPACING, _config, blob_image, make_results_folder, results_root, run_cli

from mednext.cli import main
from mednext.pipeline.io import InputCase
from mednext.pipeline.predictor import MedNeXtPredictor

pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

workdir = test_predict.workdir  # the prediction tests' working-folder fixture
DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
ROTATION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def deploy_script(tmp_path: Path) -> Path:
    """The script of docs/deploy.md, as a user would save it."""
    (code,) = re.findall(r"```python\n(.+?)\n```", DOC.read_text(encoding="utf-8"), flags=re.S)
    path = tmp_path / "segment_onnx.py"
    path.write_text(code + "\n", encoding="utf-8")
    return path


def test_the_deploy_script_needs_onnxruntime_numpy_and_simpleitk_only(tmp_path):
    tree = ast.parse(deploy_script(tmp_path).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"numpy", "onnxruntime", "SimpleITK"}


def _ct_config():
    conf = _config(PATCH, SPACING, 1, ARCH)
    return {**conf, "normalization_schemes": ["CTNormalization"]}


def _export(checkpoint: Path, out: Path, *extra: str) -> dict:
    assert main(["export", str(checkpoint), "--format", "onnx", "-o", str(out), *extra]) == 0
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    embedded = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(embedded["mednext_deployment"]) == sidecar
    return sidecar


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["ZScoreNormalization", "CTNormalization"])
def test_onnx_script_matches_mednext_predict(workdir, tmp_path, normalization):
    conf = _ct_config() if normalization == "CTNormalization" else _config(PATCH, SPACING, 1, ARCH)
    folder = make_results_folder(
        results_root(workdir), "Dataset974_Deploy", configurations={"3d_fullres": conf}, folds={0: {"final": 7}}
    )
    info = _export(folder / "fold_0" / "checkpoint_final.pth", tmp_path / "model.onnx")
    assert info["labels"] == {"background": 0, "a": 1, "b": 2} and info["class_values"] == [0, 1, 2]
    assert info["normalization"][0]["scheme"] == normalization
    assert info["normalization"][0]["intensity_properties"]["percentile_99_5"] == 2.5
    assert info["spacing"] == list(SPACING) and info["patch_size"] == list(PATCH)
    assert info["mirror_axes"] == [0, 1, 2] and info["context_slices"] == 0

    # An image at the model's spacing, several tiles per axis, a zero rim (nnU-Net crops it away).
    array = blob_image((13, 37, 29), seed=8)
    array = (array - 10.0) * (1.0 if normalization == "ZScoreNormalization" else 2.0)
    array[:, :3] = 0.0
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(SPACING[::-1])
    image.SetOrigin((4.0, -3.0, 11.5))
    image.SetDirection(ROTATION)
    path = tmp_path / "scan_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    out = tmp_path / "pred"
    args = ["-i", path, "-o", out, "--workdir", workdir, "--dataset", 974, "--device", "cpu", "--save-probabilities"]
    assert run_cli(*args) == 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan.nii.gz")))
    expected_probs = np.load(out / "scan.npz")["probabilities"].astype(np.float32)
    assert len(np.unique(expected)) > 1

    script = deploy_script(tmp_path)
    namespace: dict = {"__name__": "segment_onnx"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)  # the script's own functions
    result, probabilities = namespace["segment"](str(tmp_path / "model.onnx"), [str(path)])
    labels = sitk.GetArrayFromImage(result)
    assert probabilities.shape == expected_probs.shape
    assert (labels == 0)[:, :3].all()  # background in the cropped rim
    # mednext predict sums the Gaussian-weighted tiles in float16, as the engine does, which is coarse
    # where the weights are tiny (the image's rim); the script sums in float32. Against the same
    # pipeline summing in float32, probabilities agree everywhere to float rounding, labels where
    # two classes do not tie:
    exact = MedNeXtPredictor(device="cpu", accumulate_dtype=torch.float32)
    exact.initialize_from_trained_model_folder(folder, [0])
    written = exact.predict_case(InputCase("scan", [path]), tmp_path / "f32", save_probabilities=True)
    reference = np.load(written[1])["probabilities"]
    np.testing.assert_allclose(probabilities, reference, atol=5e-3)  # the Gaussian is float16 there
    top2 = np.sort(reference, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-2
    assert clear.mean() > 0.95 and np.array_equal(labels[clear], reference.argmax(0)[clear])
    # and against mednext predict itself: the same labels but for a few rim voxels.
    assert (labels == expected).mean() > 0.99
    inner = (slice(None), slice(2, -2), slice(5, -2), slice(2, -2))
    np.testing.assert_allclose(probabilities[inner], expected_probs[inner], atol=2e-2)

    # As a command: the written file has the input's geometry.
    seg_path = tmp_path / "script_seg.nii.gz"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "model.onnx"), str(path), str(seg_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = sitk.ReadImage(str(seg_path))
    assert np.array_equal(sitk.GetArrayFromImage(written), labels)
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection())
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing())


@pytest.mark.slow
def test_onnx_script_resamples_an_image_at_another_spacing(workdir, tmp_path):
    folder = make_results_folder(results_root(workdir), "Dataset975_Spacing", folds={0: {"final": 9}})
    _export(folder / "fold_0" / "checkpoint_final.pth", tmp_path / "model.onnx")
    image = sitk.GetImageFromArray(blob_image((9, 30, 26), seed=2))
    image.SetSpacing((1.5, 1.5, 3.0))  # (x, y, z): coarser than the model's (1, 1, 2)
    path = tmp_path / "coarse.nii.gz"
    sitk.WriteImage(image, str(path))
    assert run_cli("-i", path, "-o", tmp_path / "pred", "--workdir", workdir, "--dataset", 975, "--device", "cpu") == 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / "coarse.nii.gz")))
    namespace: dict = {"__name__": "segment_onnx"}
    exec(compile(deploy_script(tmp_path).read_text(), "segment_onnx.py", "exec"), namespace)
    result, probabilities = namespace["segment"](str(tmp_path / "model.onnx"), [str(path)])
    labels = sitk.GetArrayFromImage(result)
    assert labels.shape == expected.shape == (9, 30, 26) and probabilities.shape == (3, 9, 30, 26)
    assert result.GetSpacing() == image.GetSpacing()
    # SimpleITK's interpolation is not nnU-Net's: most voxels agree, not all.
    assert (labels == expected).mean() > 0.8


def test_export_info_errors_and_network_only(workdir, tmp_path, capsys):
    folder = make_results_folder(results_root(workdir), "Dataset976_Mismatch", n_channels=2)
    other = make_results_folder(results_root(workdir), "Dataset977_One")
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    code = main(["export", str(checkpoint), "--format", "onnx", "-o", str(tmp_path / "m.onnx"),
                 "--results-folder", str(other), "--no-verify"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "takes 2 channel(s)" in err and "--results-folder" in err
    assert not (tmp_path / "m.onnx").exists()
    # --no-deployment-info: the network alone, no sidecar, no metadata entry
    out = tmp_path / "bare.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "-o", str(out), "--no-deployment-info"]) == 0
    assert not out.with_name("bare.onnx.json").exists()
    assert "mednext_deployment" not in {p.key for p in onnx.load(str(out)).metadata_props}
    # an existing sidecar is not overwritten silently
    info = _export(checkpoint, tmp_path / "full.onnx", "--no-verify")
    assert info["channel_names"] == {"0": "ch0", "1": "ch1"}
    (tmp_path / "again.onnx.json").write_text("{}")
    assert main(["export", str(checkpoint), "--format", "onnx", "-o", str(tmp_path / "again.onnx")]) == 2
    assert "again.onnx.json' exists" in capsys.readouterr().err
