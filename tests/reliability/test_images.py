"""Images are read completely or refused: cut-off files, NaN/Inf voxels, irregular DICOM series,
label values the engine cannot train on."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic_data import make_dataset
from test_predict import _write_dicom_series, blob_image, make_results_folder, write_image

from mednext.cli import main

SHAPE = (8, 16, 16)


def _plan(tmp_path: Path, src: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["plan", str(src), "--workdir", str(tmp_path / "work"), "--num-processes", "1",
                 "--configs", "3d_fullres"])  # fmt: skip
    return code, capsys.readouterr().err


def _dataset(tmp_path: Path, ending: str = ".nii.gz") -> Path:
    src = make_dataset(tmp_path / "src", 963, "Bad", spatial_dims=3, num_cases=4, shape=SHAPE, seed=6)
    if ending != ".nii.gz":
        for f in sorted(src.rglob("*.nii.gz")):
            sitk.WriteImage(sitk.ReadImage(str(f)), str(f).replace(".nii.gz", ending))
            f.unlink()
        meta = json.loads((src / "dataset.json").read_text())
        meta["file_ending"] = ending
        (src / "dataset.json").write_text(json.dumps(meta))
    return src


def _truncate(path: Path, fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _with_nan(path: Path, value: float = np.nan) -> None:
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[2:4, 3:7, 5:9] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


# ----------------------------------------------------------------------------- training data


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_cut_off_image_is_refused_at_plan(tmp_path: Path, capsys, ending: str) -> None:
    src = _dataset(tmp_path, ending)
    if ending == ".mha":  # SimpleITK writes MetaImage uncompressed by default: use its compressed form too
        f = src / "imagesTr" / "case_001_0000.mha"
        sitk.WriteImage(sitk.ReadImage(str(f)), str(f), True)
    victim = src / "imagesTr" / f"case_001_0000{ending}"
    _truncate(victim)
    code, err = _plan(tmp_path, src, capsys)
    assert code == 2
    assert str(victim) in err and "cut off" in err


def test_gzip_with_bad_checksum_is_refused(tmp_path: Path, capsys) -> None:
    src = _dataset(tmp_path)
    victim = src / "labelsTr" / "case_002.nii.gz"
    raw = bytearray(gzip.decompress(victim.read_bytes()))
    raw[-3] ^= 0x01  # one voxel of the label changed inside the stream, checksum left as it was
    good = victim.read_bytes()
    bad = bytearray(gzip.compress(bytes(raw)))
    bad[-8:-4] = good[-8:-4]  # the original CRC32
    victim.write_bytes(bytes(bad))
    code, err = _plan(tmp_path, src, capsys)
    assert code == 2 and str(victim) in err and "checksum" in err


@pytest.mark.parametrize(
    "ending,value", [(".nii.gz", np.nan), (".mha", np.nan), (".nrrd", np.nan), (".nii.gz", np.inf), (".nii", -np.inf)]
)
def test_non_finite_voxels_are_refused_at_plan(tmp_path: Path, capsys, ending: str, value: float) -> None:
    src = _dataset(tmp_path, ending)
    victim = src / "imagesTr" / f"case_003_0000{ending}"
    _with_nan(victim, value)
    code, err = _plan(tmp_path, src, capsys)
    assert code == 2
    assert str(victim) in err and "32 voxel(s)" in err and ("NaN" in err or "infinite" in err)


def test_labels_with_a_gap_are_refused_at_plan(tmp_path: Path, capsys) -> None:
    src = _dataset(tmp_path)
    meta = json.loads((src / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "ball": 1, "box": 3}
    (src / "dataset.json").write_text(json.dumps(meta))
    for f in (src / "labelsTr").iterdir():
        image = sitk.ReadImage(str(f))
        array = sitk.GetArrayFromImage(image)
        array[array == 2] = 3
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(f))
    code, err = _plan(tmp_path, src, capsys)
    assert code == 2
    assert "consecutive" in err and '"box": 2' in err and "dataset.json" in err


# ----------------------------------------------------------------------------- prediction inputs


@pytest.fixture()
def model(tmp_path: Path) -> list[str]:
    work = tmp_path / "work"
    make_results_folder(work / "nnUNet_results", "Dataset964_Pred")
    return ["--workdir", str(work), "--dataset", "964", "--device", "cpu", "--no-tta"]


def _predict(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["predict", *map(str, args)])
    return code, capsys.readouterr().err


def test_cut_off_input_is_refused_at_predict(tmp_path: Path, capsys, model) -> None:
    image = tmp_path / "scan.nii.gz"
    write_image(image, blob_image((10, 20, 24)), (1, 1, 2))
    _truncate(image)
    code, err = _predict(capsys, "-i", image, "-o", tmp_path / "out", *model)
    assert code == 2 and str(image) in err and "cut off" in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_nan_input_is_refused_at_predict(tmp_path: Path, capsys, ending: str) -> None:
    work = tmp_path / "work"
    make_results_folder(work / "nnUNet_results", "Dataset965_Nan", file_ending=ending)
    image = tmp_path / f"scan{ending}"
    write_image(image, blob_image((10, 20, 24)), (1, 1, 2))
    _with_nan(image)
    code, err = _predict(capsys, "-i", image, "-o", tmp_path / "out", "--workdir", work, "--dataset", 965)
    assert code == 2 and str(image) in err and "32 voxel(s)" in err and "NaN" in err
    assert not list((tmp_path / "out").glob(f"*{ending}"))


def _series(tmp_path: Path) -> sitk.Image:
    volume = sitk.GetImageFromArray((blob_image((16, 18, 20)) * 20).astype(np.int16))
    volume.SetSpacing((0.9, 0.8, 2.5))
    volume.SetOrigin((-100.0, 20.0, 35.5))
    _write_dicom_series(tmp_path / "series", volume)
    return volume


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path: Path, capsys, model) -> None:
    _series(tmp_path)
    slices = sorted((tmp_path / "series").iterdir(), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    slices[7].unlink()
    code, err = _predict(capsys, "-i", tmp_path / "series", "-o", tmp_path / "out", *model)
    assert code == 2
    assert "50.5" in err and "55.5" in err  # the slices either side of the gap, at z = 35.5 + 2.5 * i
    assert "--allow-irregular-slices" in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_dicom_series_with_a_duplicate_slice_is_refused(tmp_path: Path, capsys, model) -> None:
    _series(tmp_path)
    slices = sorted((tmp_path / "series").iterdir(), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    image = sitk.ReadImage(str(slices[4]))
    image.SetMetaData("0008|0018", image.GetMetaData("0008|0018") + ".99")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(slices[4]) + "b")
    writer.Execute(image)
    code, err = _predict(capsys, "-i", tmp_path / "series", "-o", tmp_path / "out", *model)
    assert code == 2 and "45.5" in err and "twice" in err


def test_irregular_series_allowed_is_resampled_onto_its_true_positions(tmp_path: Path, capsys, model) -> None:
    volume = _series(tmp_path)
    slices = sorted((tmp_path / "series").iterdir(), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    slices[7].unlink()
    out = tmp_path / "out"
    code, err = _predict(capsys, "-i", tmp_path / "series", "-o", out, *model, "--allow-irregular-slices")
    assert code == 0, err
    pred = sitk.ReadImage(str(out / "series.nii.gz"))
    # the full series' grid: 16 slices 2.5 mm apart from the first slice's position
    assert pred.GetSize() == volume.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), volume.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(pred.GetOrigin(), volume.GetOrigin(), atol=1e-4)


def test_regular_volume_keeps_read_slices_and_interpolates_the_gap(tmp_path: Path) -> None:
    from mednext.pipeline.io import irregularities, regular_volume, slice_positions

    volume = _series(tmp_path)
    slices = sorted((tmp_path / "series").iterdir(), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    slices[7].unlink()
    series = slice_positions([str(p) for p in slices if p.exists()])
    typical, problems = irregularities(series.positions)
    assert typical == pytest.approx(2.5) and len(problems) == 1 and "5.00 mm" in problems[0]
    resampled = sitk.GetArrayFromImage(regular_volume(series, typical)).astype(float)
    original = sitk.GetArrayFromImage(volume).astype(float)
    kept = [i for i in range(16) if i != 7]
    np.testing.assert_array_equal(resampled[kept], original[kept])
    np.testing.assert_allclose(resampled[7], np.rint((original[6] + original[8]) / 2), atol=0.5)


def test_cut_off_reference_is_refused_at_evaluate(tmp_path: Path, capsys) -> None:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    label = np.zeros((8, 16, 16), np.uint8)
    label[2:6, 4:12, 4:12] = 1
    for folder in (pred, ref):
        write_image(folder / "c1.nii.gz", label, (1, 1, 2))
    _truncate(ref / "c1.nii.gz", 0.7)
    capsys.readouterr()
    assert main(["evaluate", str(pred), str(ref), "-o", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert str(ref / "c1.nii.gz") in err and "cut off" in err
    assert not (tmp_path / "m.json").exists()


def test_reading_dicom_leaves_the_locale_as_it_was(tmp_path: Path, capsys, model) -> None:
    # GDCM sets the process's locale to "C"; Python then opens text files as ASCII by default
    import locale

    before = (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False))
    _series(tmp_path)
    locale.setlocale(locale.LC_ALL, before[0])  # writing the test series went through GDCM too
    code, err = _predict(capsys, "-i", tmp_path / "series", "-o", tmp_path / "out", *model)
    assert code == 0, err
    assert (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)) == before
