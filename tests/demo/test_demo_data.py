"""The demo's data preparation: fetch-or-cache, conversion to an nnU-Net v2 raw dataset, label
grouping, geometry of the converted files and the held-out label's flipped y axis.

The real scans are downloaded once per session into the normal cache (``$MEDNEXT_CACHE`` or
``~/.cache/mednext``), so a second run needs no network. Tests that need them are marked slow.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from mednext import config  # noqa: E402
from mednext.demo import data as demo_data  # noqa: E402
from mednext.demo.data import (  # noqa: E402
    DEFAULT_LABEL_GROUPS,
    EXAMPLE_DIRNAME,
    ExampleFiles,
    ExampleScansUnavailable,
    convert_label,
    fetch_example_scans,
    group_label_array,
    intensity_stats,
    load_class_table,
    prepare_demo_dataset,
    read_dicom_series,
    resample_label_to_image,
    resolve_label_groups,
    same_geometry,
)
from mednext.errors import UserError  # noqa: E402

EXPECTED_LABELS = {"background": 0, "liver": 1, "spleen": 2, "stomach": 3, "aorta": 4, "kidney": 5}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def example_root() -> Path:
    """The unpacked example archive: downloaded on the first session, the cache afterwards."""
    return fetch_example_scans(quiet=True)


@pytest.fixture(scope="session")
def example_files(example_root: Path) -> ExampleFiles:
    return ExampleFiles(example_root)


@pytest.fixture(scope="session")
def class_table(example_files: ExampleFiles) -> dict[int, str]:
    return load_class_table(example_files.class_table)


@pytest.fixture(scope="session")
def demo_dataset(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> demo_data.DemoDataset:
    raw = tmp_path_factory.mktemp("nnUNet_raw")
    return prepare_demo_dataset(raw, cache_dir=example_root.parent, quiet=True)


@pytest.fixture(scope="session")
def heldout_image(example_files: ExampleFiles) -> sitk.Image:
    return read_dicom_series(example_files.heldout_dicom_dir)


@pytest.fixture
def unreachable_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point pip at an index nobody listens on, ignoring pip's config files and other sources."""
    for var in list(os.environ):
        if var.startswith("PIP_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    monkeypatch.setenv("PIP_NO_INPUT", "1")


def _tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def _image(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


# ---------------------------------------------------------------------------------------------
# Fetching and the cache


@pytest.mark.slow
def test_fetch_unpacks_only_the_reference_files_and_class_table(example_root: Path) -> None:
    assert example_root.name == EXAMPLE_DIRNAME
    assert ExampleFiles(example_root).missing() == []
    assert sorted(p.name for p in example_root.iterdir()) == ["tests", "totalsegmentator"]
    assert [p.name for p in (example_root / "tests").iterdir()] == ["reference_files"]
    assert [p.name for p in (example_root / "totalsegmentator").iterdir()] == ["map_to_binary.py"]
    dicom = ExampleFiles(example_root).heldout_dicom_dir
    assert len([p for p in dicom.iterdir() if p.is_file()]) == 20
    # No temporary folder is left next to the cache entry.
    assert not [p.name for p in example_root.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_second_call_uses_the_cache_without_network(
    example_root: Path, unreachable_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cached fetch must not run pip")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    before = sorted(p.relative_to(example_root) for p in example_root.rglob("*"))
    assert fetch_example_scans(example_root.parent, quiet=True) == example_root
    with config.override(cache_dir=example_root.parent):  # as MEDNEXT_CACHE would
        assert fetch_example_scans(quiet=True) == example_root
    assert sorted(p.relative_to(example_root) for p in example_root.rglob("*")) == before


def test_unreachable_registry_and_empty_cache_give_a_clear_error(tmp_path: Path, unreachable_registry: None) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ExampleScansUnavailable) as info:
        fetch_example_scans(cache, quiet=True)
    message = str(info.value)
    assert "could not download totalsegmentator==2.18.0" in message
    assert str(cache / EXAMPLE_DIRNAME) in message  # says where the cache would be
    assert "archive=" in message  # and how to supply the archive by hand
    assert "No matching distribution" in message or "ERROR" in message  # pip's own words are kept
    assert isinstance(info.value, UserError)  # the CLI prints it without a traceback
    assert list(cache.iterdir()) == []  # nothing half-written left behind


def test_env_var_chooses_the_cache_folder(tmp_path: Path, unreachable_registry: None) -> None:
    chosen = tmp_path / "from_env"
    assert config.from_environment({"MEDNEXT_CACHE": str(chosen)}).cache_dir == chosen
    with config.override(cache_dir=chosen):
        assert demo_data.default_cache_dir() == chosen
        with pytest.raises(ExampleScansUnavailable, match="from_env"):
            fetch_example_scans(quiet=True)


def test_incomplete_cache_is_not_trusted(tmp_path: Path, unreachable_registry: None) -> None:
    partial = tmp_path / EXAMPLE_DIRNAME / "totalsegmentator"
    partial.mkdir(parents=True)
    (partial / "map_to_binary.py").write_text("class_map = {}\n")
    with pytest.raises(ExampleScansUnavailable):
        fetch_example_scans(tmp_path, quiet=True)


def test_archive_with_wrong_checksum_is_rejected(tmp_path: Path) -> None:
    fake = _tar_gz(
        tmp_path / "totalsegmentator-2.18.0.tar.gz",
        {f"{EXAMPLE_DIRNAME}/tests/reference_files/example_ct.nii.gz": b"not a scan"},
    )
    cache = tmp_path / "cache"
    with pytest.raises(ExampleScansUnavailable, match="sha256"):
        fetch_example_scans(cache, archive=fake, quiet=True)
    assert list(cache.iterdir()) == []


def test_unpack_takes_only_the_wanted_members(tmp_path: Path) -> None:
    archive = _tar_gz(
        tmp_path / "a.tar.gz",
        {
            f"{EXAMPLE_DIRNAME}/tests/reference_files/example_ct.nii.gz": b"ct",
            f"{EXAMPLE_DIRNAME}/tests/reference_files/example_ct_dicom/slice1": b"dcm",
            f"{EXAMPLE_DIRNAME}/tests/test_end_to_end.py": b"skip",
            f"{EXAMPLE_DIRNAME}/totalsegmentator/map_to_binary.py": b"class_map = {}\n",
            f"{EXAMPLE_DIRNAME}/totalsegmentator/python_api.py": b"skip",
            f"{EXAMPLE_DIRNAME}/setup.py": b"skip",
        },
    )
    top = demo_data._unpack(archive, tmp_path / "out")
    got = sorted(str(p.relative_to(top)) for p in top.rglob("*") if p.is_file())
    assert got == [
        "tests/reference_files/example_ct.nii.gz",
        "tests/reference_files/example_ct_dicom/slice1",
        "totalsegmentator/map_to_binary.py",
    ]
    evil = _tar_gz(tmp_path / "evil.tar.gz", {f"{EXAMPLE_DIRNAME}/tests/reference_files/../../../x": b"x"})
    with pytest.raises(ExampleScansUnavailable, match="unsafe"):
        demo_data._unpack(evil, tmp_path / "out2")


# ---------------------------------------------------------------------------------------------
# Label table and grouping


def test_class_table_is_parsed_without_running_the_file(tmp_path: Path) -> None:
    source = tmp_path / "map_to_binary.py"
    source.write_text(
        "raise SystemExit('executed')\n"
        "class_map = {\n"
        "    'total_v1': {1: 'old'},\n"
        "    'total': {2: 'kidney_right', 1: 'spleen'},\n"
        "}\n"
    )
    assert load_class_table(source) == {1: "spleen", 2: "kidney_right"}
    assert load_class_table(source, task="total_v1") == {1: "old"}
    with pytest.raises(ValueError, match="no task 'body'"):
        load_class_table(source, task="body")


@pytest.mark.slow
def test_total_class_table(class_table: dict[int, str]) -> None:
    assert len(class_table) == 117
    assert sorted(class_table) == list(range(1, 118))
    assert {class_table[i] for i in (1, 2, 3, 5, 6, 52)} == {
        "spleen",
        "kidney_right",
        "kidney_left",
        "liver",
        "stomach",
        "aorta",
    }


def test_group_label_array_merges_and_drops_classes() -> None:
    table = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 7: "pancreas"}
    groups = resolve_label_groups(
        table, {"liver": ["liver"], "spleen": ["spleen"], "kidney": ["kidney_left", "kidney_right"]}
    )
    assert groups == {"liver": (5,), "spleen": (1,), "kidney": (3, 2)}
    source = np.array([[0, 1, 2, 3], [5, 7, 5, 0]], dtype=np.uint8)
    out = group_label_array(source, groups)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 2, 3, 3], [1, 0, 1, 0]])


def test_label_group_errors_name_the_problem() -> None:
    table = {1: "spleen", 5: "liver"}
    with pytest.raises(ValueError, match="unknown class 'livr'"):
        resolve_label_groups(table, {"liver": ["livr"]})
    with pytest.raises(ValueError, match="both groups"):
        resolve_label_groups(table, {"a": ["liver"], "b": ["liver"]})
    with pytest.raises(ValueError, match="reserved"):
        resolve_label_groups(table, {"background": ["liver"]})


# ---------------------------------------------------------------------------------------------
# Resampling by physical coordinates (synthetic)


def test_resample_undoes_a_flipped_header_axis() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(3, 5, 4)).astype(np.uint8)  # z, y, x
    spacing, origin = (0.8, 0.8, 2.0), (-10.0, -20.0, 5.0)
    image = _image(np.zeros_like(labels, dtype=np.int16), spacing, origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # The same physical voxels, listed with y running the other way: origin at the far y end.
    far_y = origin[1] + (labels.shape[1] - 1) * spacing[1]
    flipped = _image(labels[:, ::-1, :].copy(), spacing, (origin[0], far_y, origin[2]), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    out = resample_label_to_image(flipped, image)
    assert same_geometry(out, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), labels)
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), labels)  # index for index would be wrong


def test_resample_refuses_a_label_that_misses_the_image() -> None:
    image = _image(np.zeros((2, 3, 3), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    far = _image(np.ones((2, 3, 3), np.uint8), (1.0, 1.0, 1.0), (500.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="does not overlap"):
        resample_label_to_image(far, image)


# ---------------------------------------------------------------------------------------------
# The real scans


@pytest.mark.slow
def test_heldout_label_header_flips_y_on_the_same_physical_grid(
    example_files: ExampleFiles, heldout_image: sitk.Image
) -> None:
    label = sitk.ReadImage(str(example_files.heldout_label))
    assert heldout_image.GetSize() == label.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(heldout_image.GetSpacing(), label.GetSpacing())
    assert heldout_image.GetDirection()[4] == 1.0 and label.GetDirection()[4] == -1.0
    assert not same_geometry(heldout_image, label)
    # Same physical extent: the label's y origin is the image's last y row.
    last_y = heldout_image.GetOrigin()[1] + 511 * heldout_image.GetSpacing()[1]
    assert label.GetOrigin()[1] == pytest.approx(last_y, abs=1e-3)
    resampled = sitk.GetArrayFromImage(resample_label_to_image(label, heldout_image))
    source = sitk.GetArrayFromImage(label)
    # A pure permutation of the voxels (no voxel lost or duplicated): the y flip, nothing else.
    np.testing.assert_array_equal(resampled, source[:, ::-1, :])
    assert not np.array_equal(resampled, source)


@pytest.mark.slow
def test_physical_resampling_puts_the_liver_on_liver_tissue(
    example_files: ExampleFiles, heldout_image: sitk.Image, class_table: dict[int, str]
) -> None:
    groups = resolve_label_groups(class_table)
    label = sitk.ReadImage(str(example_files.heldout_label))
    physical = convert_label(label, heldout_image, groups)
    index_copy = sitk.GetImageFromArray(group_label_array(sitk.GetArrayFromImage(label), groups))
    index_copy.CopyInformation(heldout_image)  # the mistake this module exists to avoid
    assert not np.array_equal(sitk.GetArrayViewFromImage(physical), sitk.GetArrayViewFromImage(index_copy))

    hu = sitk.GetArrayFromImage(heldout_image).astype(np.float64)
    right = sitk.GetArrayViewFromImage(physical) == EXPECTED_LABELS["liver"]
    wrong = sitk.GetArrayViewFromImage(index_copy) == EXPECTED_LABELS["liver"]
    assert right.sum() == wrong.sum() > 100_000
    assert 40.0 <= hu[right].mean() <= 200.0  # soft tissue
    assert hu[wrong].mean() < hu[right].mean() - 50.0
    assert (hu[wrong] < -500).mean() > 10 * max((hu[right] < -500).mean(), 1e-4)  # the copy lands on air


@pytest.mark.slow
def test_training_label_header_already_matches_its_image(example_files: ExampleFiles, class_table) -> None:
    image = sitk.ReadImage(str(example_files.train_image))
    label = sitk.ReadImage(str(example_files.train_label))
    assert image.GetSize() == (122, 101, 112)
    np.testing.assert_allclose(image.GetSpacing(), (3.0, 3.0, 3.0))
    assert same_geometry(image, label)
    groups = resolve_label_groups(class_table)
    converted = convert_label(label, image, groups)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(converted), group_label_array(sitk.GetArrayFromImage(label), groups)
    )


# ---------------------------------------------------------------------------------------------
# The nnU-Net v2 raw dataset


@pytest.mark.slow
def test_dataset_layout_and_json(demo_dataset) -> None:
    root = demo_dataset.dataset_dir
    assert root.name == "Dataset990_MedNeXtDemo" == demo_dataset.dataset_name
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "dataset.json",
        "imagesTr/demo_train_0000.nii.gz",
        "imagesTs/demo_heldout_0000.nii.gz",
        "labelsTr/demo_train.nii.gz",
        "labelsTs/demo_heldout.nii.gz",
    ]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == EXPECTED_LABELS == demo_dataset.labels
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["numTraining"] == 1 and meta["file_ending"] == ".nii.gz"
    assert meta["label_sources"]["kidney"] == [3, 2, 23, 24]
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".tmp-")]
    assert json.loads(json.dumps(demo_dataset.to_dict()))["dataset_id"] == 990


@pytest.mark.slow
def test_dataset_passes_nnunet_integrity_check(demo_dataset) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(demo_dataset.dataset_dir), num_processes=1)


@pytest.mark.slow
def test_converted_files_share_their_image_grid(demo_dataset, example_files, heldout_image) -> None:
    root = demo_dataset.dataset_dir
    train_img = sitk.ReadImage(str(root / "imagesTr/demo_train_0000.nii.gz"))
    train_lab = sitk.ReadImage(str(root / "labelsTr/demo_train.nii.gz"))
    test_img = sitk.ReadImage(str(demo_dataset.heldout_image))
    test_lab = sitk.ReadImage(str(demo_dataset.heldout_label))
    for image, label in [(train_img, train_lab), (test_img, test_lab)]:
        assert label.GetSize() == image.GetSize()
        np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
        assert label.GetPixelID() == sitk.sitkUInt8
    # Both images are in the DICOM series' orientation (identity direction); the training scan is its
    # source with x and y flipped: every voxel at the same physical point with the same value.
    for image in (train_img, test_img):
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    source_train = sitk.ReadImage(str(example_files.train_image))
    assert source_train.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert train_img.GetSize() == source_train.GetSize() and train_img.GetSpacing() == source_train.GetSpacing()
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(train_img), sitk.GetArrayViewFromImage(source_train)[:, ::-1, ::-1]
    )
    corner = tuple(s - 1 for s in source_train.GetSize()[:2]) + (0,)
    np.testing.assert_allclose(
        train_img.TransformIndexToPhysicalPoint((0, 0, 0)), source_train.TransformIndexToPhysicalPoint(corner)
    )
    assert same_geometry(test_img, heldout_image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(test_img), sitk.GetArrayViewFromImage(heldout_image))
    assert demo_dataset.heldout_dicom_dir == example_files.heldout_dicom_dir


@pytest.mark.slow
def test_grouped_labels_count_the_source_voxels(demo_dataset, example_files, class_table) -> None:
    by_name = {name: idx for idx, name in class_table.items()}
    for case, path, source_path in [
        ("demo_train", "labelsTr/demo_train.nii.gz", example_files.train_label),
        ("demo_heldout", "labelsTs/demo_heldout.nii.gz", example_files.heldout_label),
    ]:
        out = np.bincount(sitk.GetArrayFromImage(sitk.ReadImage(str(demo_dataset.dataset_dir / path))).ravel())
        source = np.bincount(sitk.GetArrayFromImage(sitk.ReadImage(str(source_path))).ravel(), minlength=118)
        assert len(out) <= 6
        out = np.pad(out, (0, 6 - len(out)))
        for group, members in DEFAULT_LABEL_GROUPS.items():
            expected = sum(int(source[by_name[m]]) for m in members)
            assert out[EXPECTED_LABELS[group]] == expected == demo_dataset.voxel_counts[case][group]
    counts = demo_dataset.voxel_counts
    assert all(counts["demo_train"][g] > 1000 for g in DEFAULT_LABEL_GROUPS)  # every organ in training
    assert all(counts["demo_heldout"][g] > 10_000 for g in ("liver", "spleen", "stomach", "aorta"))
    assert counts["demo_heldout"]["kidney"] == 0  # the held-out slab shows no kidney


@pytest.mark.slow
def test_training_ct_is_plain_and_heldout_ct_is_contrast_enhanced(demo_dataset) -> None:
    root = demo_dataset.dataset_dir
    train = intensity_stats(
        sitk.ReadImage(str(root / "imagesTr/demo_train_0000.nii.gz")),
        sitk.ReadImage(str(root / "labelsTr/demo_train.nii.gz")),
        demo_dataset.labels,
    )
    test = intensity_stats(
        sitk.ReadImage(str(demo_dataset.heldout_image)),
        sitk.ReadImage(str(demo_dataset.heldout_label)),
        demo_dataset.labels,
    )
    assert 30 < train["liver"]["mean"] < 60 and 30 < train["aorta"]["mean"] < 60  # unenhanced blood ~ liver
    assert 75 < test["liver"]["mean"] < 110 and test["aorta"]["mean"] > 150  # portal-venous/arterial contrast
    assert test["liver"]["mean"] - train["liver"]["mean"] > 30
    assert test["kidney"] == {"voxels": 0}


@pytest.mark.slow
def test_rebuild_replaces_the_dataset_and_clashing_ids_are_refused(example_root, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    first = prepare_demo_dataset(raw, dataset_id=7, cache_dir=example_root.parent, quiet=True)
    (first.dataset_dir / "stale.txt").write_text("left from an earlier build")
    second = prepare_demo_dataset(raw, dataset_id=7, cache_dir=example_root.parent, quiet=True)
    assert second.dataset_dir == first.dataset_dir == raw / "Dataset007_MedNeXtDemo"
    assert not (second.dataset_dir / "stale.txt").exists()
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset007_MedNeXtDemo"]
    (raw / "Dataset008_Other").mkdir()
    with pytest.raises(ValueError, match="Dataset008_Other"):
        prepare_demo_dataset(raw, dataset_id=8, cache_dir=example_root.parent, quiet=True)
    with pytest.raises(ValueError, match="1 to 999"):
        prepare_demo_dataset(raw, dataset_id=1000, cache_dir=example_root.parent, quiet=True)
