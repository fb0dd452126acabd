"""2.5D input: neighbouring slices as channels (mednext.pipeline.context) in training and prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import (  # the fabricated results folders of the prediction tests
    ARCH,
    _config,
    make_results_folder,
    results_root,
    run_cli,
    write_image,
)

from mednext.pipeline.context import (
    CONTEXT_KEY,
    check_context_slices,
    context_dataset_class,
    context_slices_of,
    stack_neighbour_slices,
    synchronise_channels,
)


def test_stack_neighbour_slices_values_and_zero_border() -> None:
    # two channels, four slices; voxel value = 10 * channel + slice
    data = (10 * np.arange(2)[:, None, None, None] + np.arange(4)[None, :, None, None]).astype(np.float32)
    data = np.broadcast_to(data, (2, 4, 3, 5)).copy()
    out = stack_neighbour_slices(data, 1)
    assert out.shape == (6, 4, 3, 5) and out.dtype == np.float32
    # channel 0..2 = image channel 0 at offsets -1, 0, +1; channel 3..5 = image channel 1
    assert out[:, :, 0, 0].tolist() == [
        [0, 0, 1, 2],
        [0, 1, 2, 3],
        [1, 2, 3, 0],
        [0, 10, 11, 12],
        [10, 11, 12, 13],
        [11, 12, 13, 0],
    ]
    assert np.array_equal(out[[1, 4]], data)  # the centre channels are the slices themselves
    two = stack_neighbour_slices(data[:1], 2)
    assert two.shape == (5, 4, 3, 5)
    assert two[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 2] and two[:, 3, 0, 0].tolist() == [1, 2, 3, 0, 0]
    # torch gives the same values; k=0 returns the input itself
    assert torch.equal(stack_neighbour_slices(torch.from_numpy(data), 1), torch.from_numpy(out))
    assert stack_neighbour_slices(data, 0) is data


def test_stack_neighbour_slices_more_context_than_slices() -> None:
    out = stack_neighbour_slices(np.ones((1, 2, 2, 2), dtype=np.float32), 3)
    assert out.shape == (7, 2, 2, 2)
    assert out[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert out[:, 1, 0, 0].tolist() == [0, 0, 1, 1, 0, 0, 0]


def test_context_settings_are_checked() -> None:
    assert context_slices_of({}) == 0 and context_slices_of({CONTEXT_KEY: 2}) == 2
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=CONTEXT_KEY):
            context_slices_of({CONTEXT_KEY: bad})
    assert check_context_slices(2, [112, 128]) == 2
    assert check_context_slices(0, [8, 112, 128]) == 0
    with pytest.raises(ValueError, match="needs a 2D configuration"):
        check_context_slices(1, [8, 112, 128])
    with pytest.raises(ValueError, match="non-negative"):
        check_context_slices(-1, [112, 128])


def test_context_dataset_class_stacks_loaded_cases() -> None:
    class Base:
        def load_case(self, identifier: str) -> tuple:
            data = np.arange(3, dtype=np.float32)[None, :, None, None] * np.ones((1, 3, 2, 2), np.float32)
            return data, np.zeros((1, 3, 2, 2), np.int16), None, {"id": identifier}

    assert context_dataset_class(Base, 0) is Base
    cls = context_dataset_class(Base, 1)
    assert cls.base is Base and cls.transform.context_slices == 1
    data, seg, prev, props = cls().load_case("a")
    assert data.shape == (3, 3, 2, 2) and seg.shape == (1, 3, 2, 2) and prev is None and props == {"id": "a"}
    assert data[:, 1, 0, 0].tolist() == [0, 1, 2] and data[:, 0, 0, 0].tolist() == [0, 0, 1]


def test_synchronised_augmentation_keeps_identical_channels_identical() -> None:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(0)
    transforms = nnUNetTrainer.get_training_transforms(
        (32, 32), (-0.2, 0.2), None, (0, 1), False, foreground_labels=[1], regions=None, ignore_label=None
    )
    # Gaussian noise draws one sigma per sample but its own noise per channel (as real slices have): off
    # here, so that every other intensity transform must leave identical channels identical
    noise = [
        t for t in transforms.transforms if type(getattr(t, "transform", None)).__name__ == "GaussianNoiseTransform"
    ]
    assert len(noise) == 1
    noise[0].apply_probability = 0.0
    image = torch.rand(1, 40, 40).expand(5, 40, 40).contiguous()  # five identical "slices"
    seg = (image[:1] > 0.5).to(torch.int16)
    plain = [transforms(image=image.clone(), segmentation=seg.clone())["image"] for _ in range(20)]
    # the engine augments each channel on its own: some samples end up with different channels
    assert any((out - out[:1]).abs().max() > 1e-3 for out in plain)
    synchronise_channels(transforms)
    assert noise[0].transform.synchronize_channels
    for _ in range(20):
        out = transforms(image=image.clone(), segmentation=seg.clone())["image"]
        assert out.shape == (5, 32, 32)
        assert (out - out[:1]).abs().max() < 1e-5


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "work"


@pytest.mark.usefixtures("one_thread")
def test_predict_stacks_neighbours_like_training(workdir: Path, tmp_path: Path) -> None:
    """``mednext predict`` with a 2.5D results folder: each slice's labels are the network's argmax on
    that slice stacked with its neighbours (zeros beyond the volume), computed here by hand."""
    import SimpleITK as sitk

    from mednext.nn import MedNeXt

    arch = {**ARCH, "spatial_dims": 2, "strides": [[2, 2], [2, 2]]}
    conf = {**_config((16, 16), (2.0, 1.0, 1.0), 1, arch), CONTEXT_KEY: 1}
    folder = make_results_folder(results_root(workdir), "Dataset957_Ctx", configurations={"2d": conf})
    torch.manual_seed(0)
    net = MedNeXt(3, 3, **arch).eval()  # one CT channel, 2 x 1 neighbours: three input channels
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)  # written by this test's helper just above
    checkpoint["network_weights"] = net.state_dict()
    checkpoint["inference_allowed_mirroring_axes"] = None
    torch.save(checkpoint, path)

    rng = np.random.default_rng(1)
    image = rng.normal(0, 1, (5, 16, 16)).astype(np.float32) + 10.0
    image[:, 4:12, 4:12] += 3.0 * np.arange(1, 6)[:, None, None]  # every slice differs from its neighbours
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "case_0000.nii.gz", image, (1.0, 1.0, 2.0))
    out = tmp_path / "out"
    assert run_cli("-i", tmp_path / "in", "-o", out, "--workdir", workdir, "--dataset", 957, "--device", "cpu") == 0
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))

    normalised = (image - image.mean()) / image.std()  # the plans' z-score normalisation
    stacked = torch.from_numpy(stack_neighbour_slices(normalised[None], 1))  # (3, z, y, x)
    with torch.no_grad():
        expected = net(stacked.permute(1, 0, 2, 3)).argmax(1).numpy()  # one tile covers each slice
    assert predicted.shape == expected.shape == (5, 16, 16)
    assert np.array_equal(predicted, expected)
    assert len(np.unique(expected)) > 1  # the comparison is not between two constant maps
