"""``mednext.Segmenter``: a trained model loaded once, segmenting images in memory as ``mednext predict`` does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import test_predict
import torch

pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")

from test_predict import (  # noqa: E402  (the fabricated results folders of the prediction tests)
    ARCH,
    _config,
    blob_image,
    make_results_folder,
    results_root,
    run_cli,
    write_image,
)

import mednext  # noqa: E402
from mednext.pipeline import predictor as predictor_module  # noqa: E402
from mednext.pipeline.segmenter import Segmenter, SegmenterInputError  # noqa: E402

workdir = test_predict.workdir  # the prediction tests' working-folder fixture
ROTATION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _predict_file(workdir, tmp_path, path, dataset, *extra):
    out = tmp_path / "cli"
    assert run_cli("-i", path, "-o", out, "--workdir", workdir, "--dataset", dataset, "--device", "cpu",
                   "--save-probabilities", *extra) == 0  # fmt: skip
    case = path.name.split(".")[0].removesuffix("_0000")
    seg = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    return seg, np.load(out / f"{case}.npz")["probabilities"]


def test_segmenter_agrees_with_mednext_predict(workdir, tmp_path, monkeypatch):
    folder = make_results_folder(results_root(workdir), "Dataset971_Seg", folds={0: {"final": 1}, 1: {"final": 2}})
    path = tmp_path / "scan_0000.nii.gz"
    source = write_image(path, blob_image((10, 20, 24), seed=4), (1.0, 1.1, 2.0), (-12.5, 40.0, 7.25), ROTATION)
    cli_seg, cli_probs = _predict_file(workdir, tmp_path, path, 971)
    expected = sitk.GetArrayFromImage(cli_seg)
    assert len(np.unique(expected)) > 1  # a segmentation with something in it, not a constant

    loads = []
    original = predictor_module.load_nnunet_checkpoint
    monkeypatch.setattr(predictor_module, "load_nnunet_checkpoint", lambda p: loads.append(p) or original(p))
    segmenter = mednext.Segmenter.from_results(971, workdir=workdir, device="cpu")
    assert segmenter.folder == folder and segmenter.folds == [0, 1] and len(loads) == 2
    assert list(segmenter.labels) == ["background", "a", "b"]

    # SimpleITK in, SimpleITK out, on the input's grid; probabilities equal the command's.
    image = sitk.ReadImage(str(path))
    seg, probs = segmenter(image, probabilities=True)
    assert isinstance(seg, sitk.Image)
    assert np.array_equal(sitk.GetArrayFromImage(seg), expected)
    assert seg.GetSize() == source.GetSize()
    np.testing.assert_allclose(seg.GetOrigin(), source.GetOrigin())
    np.testing.assert_allclose(seg.GetDirection(), source.GetDirection())
    np.testing.assert_allclose(seg.GetSpacing(), source.GetSpacing())
    assert probs.dtype == np.float32 and probs.shape == (3, 10, 20, 24)
    np.testing.assert_array_equal(probs, cli_probs.astype(np.float32))

    # numpy (z, y, x) with its spacing in the same order: the same labels (nnU-Net predicts in voxel space).
    array = sitk.GetArrayFromImage(image)
    labels = segmenter(array, spacing=(2.0, 1.1, 1.0))
    assert isinstance(labels, np.ndarray) and np.array_equal(labels, expected)

    # nibabel in, nibabel out with the input's affine; its arrays are (x, y, z).
    nibabel = pytest.importorskip("nibabel")
    nii = nibabel.load(str(path))
    out, nii_probs = segmenter(nii, probabilities=True)
    assert isinstance(out, type(nii))
    np.testing.assert_allclose(out.affine, nii.affine)
    assert np.array_equal(np.asarray(out.dataobj), expected.transpose(2, 1, 0))
    np.testing.assert_array_equal(nii_probs, cli_probs.transpose(0, 3, 2, 1).astype(np.float32))

    assert len(loads) == 2  # loaded once, predicted four times
    # The results folder itself works as well, and folds= picks a subset (a different answer).
    single = Segmenter.from_results(folder, folds=[0], device="cpu")
    assert single.folds == [0]
    assert not np.array_equal(single(image, probabilities=True)[1], probs)


def test_segmenter_2d_numpy_agrees_with_predict(workdir, tmp_path):
    arch = {**ARCH, "spatial_dims": 2, "strides": [2, 2]}
    make_results_folder(
        results_root(workdir), "Dataset972_Flat", configurations={"2d": _config((16, 16), (1.0, 1.0), 1, arch)}
    )
    array = blob_image((20, 24), seed=6)
    path = tmp_path / "slice_0000.nii.gz"
    write_image(path, array, (0.7, 0.9))
    cli_seg, cli_probs = _predict_file(workdir, tmp_path, path, 972)
    segmenter = Segmenter.from_results("Dataset972_Flat", configuration="2d", workdir=workdir, device="cpu")
    labels, probs = segmenter(array, spacing=(0.9, 0.7), probabilities=True)
    assert labels.shape == (20, 24) and np.array_equal(labels, sitk.GetArrayFromImage(cli_seg))
    assert probs.shape == (3, 20, 24)
    np.testing.assert_array_equal(probs, cli_probs.reshape(probs.shape).astype(np.float32))


def test_segmenter_errors_name_the_fix(workdir, tmp_path):
    make_results_folder(results_root(workdir), "Dataset973_Two", n_channels=2)
    segmenter = Segmenter.from_results(973, workdir=workdir, device="cpu", tta=False)
    volume = blob_image((8, 16, 16))
    with pytest.raises(SegmenterInputError, match=r"2 channels .*c first"):
        segmenter(volume, spacing=(2.0, 1.0, 1.0))
    with pytest.raises(SegmenterInputError, match=r"needs spacing="):
        segmenter(np.stack([volume, volume]))
    with pytest.raises(SegmenterInputError, match=r"got 1 SimpleITK images .* 2 channel"):
        segmenter(sitk.GetImageFromArray(volume))
    with pytest.raises(SegmenterInputError, match=r"spacing= is only for numpy"):
        segmenter([sitk.GetImageFromArray(volume)] * 2, spacing=(1, 1, 1))
    with pytest.raises(SegmenterInputError, match=r"cannot segment a builtins.str"):
        segmenter("scan.nii.gz")
    with pytest.raises(ValueError, match=r"crop"):
        segmenter(np.stack([volume, volume]), spacing=(2.0, 1.0, 1.0), crop_body=True)  # channels ch0/ch1: not CT
    labels = segmenter(torch.from_numpy(np.stack([volume, volume + 1])), spacing=(2.0, 1.0, 1.0))
    assert labels.shape == (8, 16, 16)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}


def test_import_mednext_leaves_the_engine_unloaded():
    code = (
        "import sys, mednext\n"
        "assert 'nnunetv2' not in sys.modules, 'import mednext loaded nnunetv2'\n"
        "assert 'Segmenter' in dir(mednext)\n"
        "mednext.Segmenter\n"
        "assert 'nnunetv2' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
