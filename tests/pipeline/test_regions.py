"""Region-based label sets (BraTS-style overlapping regions with ``regions_class_order``): plan, train
with sigmoid outputs and Dice + binary cross-entropy, predict label maps painted in
``regions_class_order``, evaluate per region. A tiny synthetic dataset of nested balls, CPU only."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_data import REGION_LABELS, REGIONS_CLASS_ORDER, make_dataset

from mednext.cli import main

SHAPE = (8, 16, 16)  # spacing (2, 1, 1) mm: the engine plans an (8, 16, 16) patch
FAST = ["--device", "cpu", "--num-workers", "0", "--quiet"]
DATASET = "Dataset971_Regions"
# the engine names a region by its label values in summary.json
ENGINE_REGION_KEYS = {"(1, 2, 3)", "(2, 3)", "3"}


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    from mednext.pipeline.workdir import COMPILE, DEFAULT_PROCESSES, engine_setting

    with engine_setting(DEFAULT_PROCESSES, 1), engine_setting(COMPILE, 0):
        yield


@pytest.fixture(autouse=True)
def _engine_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as engine_trainer

    monkeypatch.setattr(engine_trainer, "default_num_processes", 1)  # export pool of the final validation
    with _one_process():
        torch.set_num_threads(1)
        yield


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("regions")
    src = make_dataset(root / "src", 971, "Regions", spatial_dims=3, num_cases=5, shape=SHAPE, seed=5, regions=True)
    with _one_process():
        assert main(["plan", str(src), "--workdir", str(root / "work"), "--num-processes", "1", "--configs",
                     "3d_fullres"]) == 0  # fmt: skip
    return root


@pytest.mark.slow
def test_trainer_uses_sigmoid_regions_and_bce(planned: Path) -> None:
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss

    from mednext.pipeline.trainer import get_trainer_class
    from mednext.pipeline.workdir import use_workdir

    use_workdir(planned / "work")
    pre = planned / "work" / "nnUNet_preprocessed" / DATASET
    plans = json.loads((pre / "MedNeXtPlans.json").read_text(encoding="utf-8"))
    ds = json.loads((pre / "dataset.json").read_text(encoding="utf-8"))
    assert ds["regions_class_order"] == REGIONS_CLASS_ORDER
    trainer = get_trainer_class("S", 3)(plans, "3d_fullres", 1, ds, torch.device("cpu"))
    trainer.configure_run(epochs=1, iters_per_epoch=1, val_iters=0, show_progress=False)
    trainer.initialize()
    assert trainer.label_manager.has_regions
    assert isinstance(trainer.loss.loss, DC_and_BCE_loss)
    assert trainer.loss.loss.dc.do_bg is True and trainer.loss.loss.dc.batch_dice is True
    assert trainer.loss.weight_factors == pytest.approx(np.array([16, 8, 4, 2, 1]) / 31)  # the recipe's
    patch = trainer.configuration_manager.patch_size
    trainer.network.eval()
    with torch.no_grad():
        assert trainer.network(torch.zeros(1, 1, *patch)).shape == (1, 3, *patch)  # one head per region

    trainer.run_training()  # one iteration, no validation iterations: the log keeps one entry per region
    batch = next(trainer.dataloader_train)
    target = batch["target"][0]  # full resolution: the engine's one-hot region masks
    assert target.shape[1] == 3 and set(torch.unique(target).tolist()) <= {0, 1}
    whole, core, enhancing = target[:, 0].bool(), target[:, 1].bool(), target[:, 2].bool()
    assert enhancing.any() and core.any()
    assert not (core & ~whole).any() and not (enhancing & ~core).any()  # nested as the labels say
    loss = trainer.loss([torch.full((2, 3, *t.shape[2:]), 20.0) * (2 * t - 1) for t in batch["target"]],
                        batch["target"])  # fmt: skip
    assert float(loss) < -0.99  # confident, correct logits: Dice term -1, BCE ~0
    log = json.loads((Path(trainer.output_folder) / "training_log.json").read_text(encoding="utf-8"))
    assert len(log["epochs"][0]["pseudo_dice"]) == 3


@pytest.mark.slow
def test_train_predict_evaluate_regions(planned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import SimpleITK as sitk

    work = ["--workdir", str(planned / "work")]
    src = planned / "src" / DATASET
    # nested balls, each brighter than the one around it: 80 iterations learn them
    assert main(["train", "971", "3d_fullres", "0", *work, "--epochs", "8", "--iters-per-epoch", "10",
                 "--val-iters", "1", *FAST]) == 0  # fmt: skip
    fold = planned / "work" / "nnUNet_results" / DATASET / "MedNeXtTrainer_Sk3__MedNeXtPlans__3d_fullres" / "fold_0"
    log = json.loads((fold / "training_log.json").read_text(encoding="utf-8"))
    assert all(len(e["pseudo_dice"]) == 3 for e in log["epochs"])  # the engine's online Dice per region
    validation = json.loads((fold / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert set(validation["mean"]) == ENGINE_REGION_KEYS

    out = tmp_path / "pred"
    assert main(["predict", "-i", str(src / "imagesTr"), "-o", str(out), *work, "--dataset", "971", "--fold", "0",
                 "--device", "cpu", "--save-probabilities"]) == 0  # fmt: skip
    for case in [f"case_{i:03d}" for i in range(5)]:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
        probabilities = np.load(out / f"{case}.npz")["probabilities"]
        assert probabilities.shape == (3, *SHAPE)
        assert probabilities.min() >= 0 and probabilities.max() <= 1
        # each region's sigmoid on its own: in the core all three exceed 0.5 (a softmax could not)
        assert (probabilities > 0.5).all(axis=0).any()
        painted = np.zeros(SHAPE, np.uint8)
        for region, value in enumerate(REGIONS_CLASS_ORDER):
            painted[probabilities[region] > 0.5] = value
        assert np.array_equal(labels, painted)

    capsys.readouterr()
    assert main(["evaluate", str(out), str(src / "labelsTr")]) == 0
    assert "enhancing" in capsys.readouterr().out
    result = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert result["labels"] == {"whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}
    for region in ("whole", "core", "enhancing"):
        assert result["mean"][region]["dice"] > 0.7, (region, result["mean"])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["mean"]) == ENGINE_REGION_KEYS
    assert summary["mean"]["(1, 2, 3)"]["Dice"] == pytest.approx(result["mean"]["whole"]["dice"])


def _edit_labels(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"regions_class_order": None}, '"regions_class_order" is missing'),
        ({"regions_class_order": [1, 2]}, "has 2 value(s) for 3 region(s)"),
        ({"regions_class_order": [1, 2, 7]}, "value(s) [7] that no region"),
        ({"regions_class_order": "1,2,3"}, "must be a list of label values"),
    ],
)
def test_regions_need_a_valid_class_order(tmp_path: Path, changes: dict, message: str) -> None:
    from mednext.errors import DatasetError
    from mednext.pipeline.datasets import read_dataset_json

    folder = tmp_path / "Dataset972_Bad"
    folder.mkdir()
    meta = {"channel_names": {"0": "MR"}, "labels": REGION_LABELS, "numTraining": 1, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    _edit_labels(folder, **changes)
    with pytest.raises(DatasetError) as err:
        read_dataset_json(folder)
    assert message in str(err.value)
    assert '"regions_class_order": [1, 2, 3]' in str(err.value)  # the fix, worked out from the nesting
    assert '"whole", "core", "enhancing"' in str(err.value)
