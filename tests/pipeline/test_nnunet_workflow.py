"""nnU-Net's own workflow on MedNeXt results: five folds of two configurations trained with nnU-Net's
command order and --npz, then the engine's find_best_configuration, ensembling and predictor find
the MedNeXt trainers through nnUNet_extTrainer (set by mednext, printed by `mednext env`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_data import make_dataset

from mednext.cli import main

FAST = ["--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--device", "cpu", "--num-workers", "0",
        "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mednext.pipeline.workdir import COMPILE, DEFAULT_PROCESSES, engine_setting

    root = tmp_path_factory.mktemp("workflow")
    src = make_dataset(root / "src", 981, "Flow", spatial_dims=3, num_cases=5, shape=(8, 16, 16), seed=11)
    work = ["--workdir", str(root / "work")]
    torch.set_num_threads(1)
    with engine_setting(DEFAULT_PROCESSES, 1), engine_setting(COMPILE, 0):
        assert main(["plan", str(src), *work, "--num-processes", "1"]) == 0
        for configuration in ("3d_fullres", "2d"):
            assert main(["train", "981", configuration, "0", "1", "2", "3", "4", "--npz", *work, *FAST]) == 0
    return root


@pytest.mark.slow
def test_folds_in_nnunet_order_with_probabilities(trained: Path, capsys) -> None:
    results = trained / "work" / "nnUNet_results" / "Dataset981_Flow"
    for configuration in ("3d_fullres", "2d"):
        folder = results / f"MedNeXtTrainer_Sk3__MedNeXtPlans__{configuration}"
        for fold in range(5):
            validation = folder / f"fold_{fold}" / "validation"
            assert (folder / f"fold_{fold}" / "checkpoint_final.pth").is_file()
            assert json.loads((validation / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0
            assert len(list(validation.glob("*.npz"))) == 1  # one validation case per fold, with probabilities
    # --c skips finished folds; --val validates again without training
    capsys.readouterr()
    work = ["--workdir", str(trained / "work")]
    assert main(["train", "981", "2d", "0", "1", "--c", *work, *FAST]) == 0
    assert capsys.readouterr().out.count("already trained") == 2
    before = (results / "MedNeXtTrainer_Sk3__MedNeXtPlans__2d" / "fold_0" / "checkpoint_final.pth").read_bytes()
    summary = results / "MedNeXtTrainer_Sk3__MedNeXtPlans__2d" / "fold_0" / "validation" / "summary.json"
    summary.unlink()
    assert main(["train", "981", "2d", "0", "--val", "--npz", *work, *FAST]) == 0
    assert summary.is_file()
    assert (results / "MedNeXtTrainer_Sk3__MedNeXtPlans__2d" / "fold_0" / "checkpoint_final.pth").read_bytes() == before


@pytest.mark.slow
def test_engine_finds_best_configuration_and_ensembles_mednext(trained: Path, capsys) -> None:
    from nnunetv2.evaluation.find_best_configuration import find_best_configuration

    from mednext.pipeline.workdir import use_workdir

    use_workdir(trained / "work")  # sets the folders and nnUNet_extTrainer, as every mednext command does
    models = [
        {"plans": "MedNeXtPlans", "configuration": c, "trainer": "MedNeXtTrainer_Sk3"} for c in ("3d_fullres", "2d")
    ]
    best = find_best_configuration(981, models, allow_ensembling=True, num_processes=1, strict=True)
    assert set(best["all_results"]) == {
        "MedNeXtTrainer_Sk3__MedNeXtPlans__3d_fullres",
        "MedNeXtTrainer_Sk3__MedNeXtPlans__2d",
        "ensemble___MedNeXtTrainer_Sk3__MedNeXtPlans__3d_fullres___MedNeXtTrainer_Sk3__MedNeXtPlans__2d___0_1_2_3_4",
    }
    assert all(0 <= v <= 1 for v in best["all_results"].values())

    # the engine's cross-validation ensemble of the two configurations was written and scored
    ensemble = trained / "work" / "nnUNet_results" / "Dataset981_Flow" / "ensembles"
    assert len(list(ensemble.glob("*/case_*.nii.gz"))) == 5 and list(ensemble.glob("*/summary.json"))


def test_mednext_env_prints_what_nnunet_commands_need(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mednext", "env", "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)  # fmt: skip
    lines = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines())
    assert lines["nnUNet_results"] == str((tmp_path / "w" / "nnUNet_results").absolute())
    folder = lines["nnUNet_extTrainer"]
    # the engine searches each folder of nnUNet_extTrainer with this call (nnunetv2.utilities.find_objects)
    code = (
        "from nnunetv2.utilities.find_class_by_name import recursive_find_python_class\n"
        "import mednext.pipeline.trainer as t\n"
        f"folder = {folder!r}\n"
        "def find(name):\n"
        "    return recursive_find_python_class(folder, name, None, base_folder=folder, "
        "cleanup_imports_from_base_folder=True)\n"
        "assert find('MedNeXtTrainer_Lk5') is t.MedNeXtTrainer_Lk5\n"
        "assert find('MedNeXtTrainer_Mk7').kernel_size == 7\n"
        "assert find('nnUNetTrainer') is None\n"
        "print('found')"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace"
    )
    assert found.returncode == 0 and "found" in found.stdout, found.stderr[-2000:]


def _torchvision_loads() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _torchvision_loads(),
    reason="the engine's search imports all of its own trainers first (primus -> timm -> torchvision), and "
    "this environment's torchvision build does not load with its torch",
)
def test_engine_finds_mednext_trainers_by_name(tmp_path: Path) -> None:
    from mednext.pipeline.workdir import use_workdir

    use_workdir(tmp_path / "w")
    code = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "import mednext.pipeline.trainer as t\n"
        "assert find('MedNeXtTrainer_Lk5') is t.MedNeXtTrainer_Lk5\n"
        "print('found')"
    )
    found = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=dict(os.environ),
    )
    assert found.returncode == 0 and "found" in found.stdout, found.stderr[-2000:]


@pytest.mark.slow
def test_any_odd_kernel_trains_under_nnunets_name(trained: Path) -> None:
    work = ["--workdir", str(trained / "work")]
    assert main(["train", "981", "3d_fullres", "1", "-tr", "MedNeXtTrainer_Sk7", "--no-val", *work, *FAST]) == 0
    folder = trained / "work" / "nnUNet_results" / "Dataset981_Flow" / "MedNeXtTrainer_Sk7__MedNeXtPlans__3d_fullres"
    checkpoint = torch.load(folder / "fold_1" / "checkpoint_final.pth", weights_only=True)
    assert checkpoint["trainer_name"] == "MedNeXtTrainer_Sk7"
    assert checkpoint["network_weights"]["enc_block_0.0.conv1.weight"].shape[-3:] == (7, 7, 7)
    assert main(["train", "981", "3d_fullres", "1", "--kernel", "4", *work, *FAST]) == 2


@pytest.mark.slow
def test_mednext_find_best_then_its_commands(trained: Path, capsys) -> None:
    import pickle

    import SimpleITK as sitk
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder

    work = ["--workdir", str(trained / "work")]
    capsys.readouterr()
    assert main(["find-best", "981", "-tr", "MedNeXtTrainer_Sk3", *work]) == 0
    printed = capsys.readouterr().out
    assert "best:" in printed and "mednext predict" in printed and "mednext postprocess" in printed
    results = trained / "work" / "nnUNet_results" / "Dataset981_Flow"
    instructions = (results / "inference_instructions.txt").read_text()
    assert instructions.strip() in printed

    # the ensemble's commands, run as printed (both configurations, probabilities kept)
    raw = trained / "src" / "Dataset981_Flow" / "imagesTr"
    outs = []
    for configuration in ("3d_fullres", "2d"):
        out = trained / f"cli_{configuration}"
        assert main(["predict", "-i", str(raw), "-o", str(out), "--dataset", "981", "--config", configuration,
                     "--model", "S", "--kernel", "3", "--fold", "0", "1", "--save-probabilities", "--no-tta", "--device", "cpu", *work]) == 0  # fmt: skip
        outs.append(out)
    assert main(["ensemble", "-i", *map(str, outs), "-o", str(trained / "cli_ens")]) == 0
    case = "case_001"
    mean = sum(np.load(o / f"{case}.npz")["probabilities"] for o in outs) / 2
    merged = sitk.GetArrayFromImage(sitk.ReadImage(str(trained / "cli_ens" / f"{case}.nii.gz")))
    np.testing.assert_array_equal(merged, mean.argmax(0))

    # postprocessing from the JSON equals the engine's from its pickle (our own file, trusted in this test)
    source = Path(json.loads((results / "inference_information.json").read_text())["best_model_or_ensemble"]
                  ["postprocessing_file"])  # fmt: skip
    assert main(["postprocess", "-i", str(trained / "cli_ens"), "-o", str(trained / "cli_pp"), "--pp",
                 str(source.with_suffix(".json"))]) == 0  # fmt: skip
    with open(source, "rb") as handle:
        fns, kwargs = pickle.load(handle)
    apply_postprocessing_to_folder(str(trained / "cli_ens"), str(trained / "engine_pp"), fns, kwargs, num_processes=1)
    for f in sorted((trained / "engine_pp").glob("*.nii.gz")):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(trained / "cli_pp" / f.name))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(f))),
        )
    assert main(["ensemble", "-i", str(outs[0]), "-o", str(trained / "x")]) == 2


@pytest.mark.slow
def test_chosen_ensemble_on_a_cohort_continued_after_a_crash_then_evaluated(
    trained: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of nnU-Net's workflow: find-best's choice (model or ensemble, and its postprocessing)
    applied to a 20-case folder, the first prediction cut off by a crash and continued, then
    `mednext evaluate --gt --pred` writing the engine's summary.json."""
    from mednext.pipeline.predictor import MedNeXtPredictor

    work = ["--workdir", str(trained / "work")]
    cohort = make_dataset(trained / "cohort", 982, "Cohort", spatial_dims=3, num_cases=20, shape=(8, 16, 16), seed=5)
    assert main(["find-best", "981", "-tr", "MedNeXtTrainer_Sk3", *work]) == 0
    results = trained / "work" / "nnUNet_results" / "Dataset981_Flow"
    best = json.loads((results / "inference_information.json").read_text())["best_model_or_ensemble"]
    chosen = best["selected_model_or_models"]
    outs = []
    for i, model in enumerate(chosen):
        out = trained / f"cohort_{model['configuration']}"
        command = ["predict", "-i", str(cohort / "imagesTr"), "-o", str(out), "-d", "981",
                   "-c", model["configuration"], "-tr", model["trainer"], "-p", model["plans_identifier"],
                   "--save-probabilities", "--disable_tta", "-device", "cpu", *work]  # fmt: skip
        if i == 0:  # a crash after 7 cases, then the same command with --continue-prediction
            real, exported = MedNeXtPredictor.export_case, []

            def crash(self, *args, _real=real, _done=exported):
                if len(_done) == 7:
                    raise RuntimeError("node lost")
                _done.append(1)
                return _real(self, *args)

            monkeypatch.setattr(MedNeXtPredictor, "export_case", crash)
            with pytest.raises(RuntimeError, match="node lost"):
                main(command)
            monkeypatch.setattr(MedNeXtPredictor, "export_case", real)
            assert len(list(out.glob("case_*.nii.gz"))) == 7
            capsys.readouterr()
            assert main([*command, "--continue-prediction"]) == 0
            printed = capsys.readouterr().out
            assert "7 already segmented" in printed and "[13/13]" in printed
        else:
            assert main(command) == 0
        assert len(list(out.glob("case_*.nii.gz"))) == len(list(out.glob("case_*.npz"))) == 20
        outs.append(out)
    merged = outs[0]
    if len(outs) > 1:
        merged = trained / "cohort_ensemble"
        assert main(["ensemble", "-i", *map(str, outs), "-o", str(merged)]) == 0
    final = trained / "cohort_final"
    postprocessing = Path(best["postprocessing_file"]).with_suffix(".json")
    assert main(["postprocess", "-i", str(merged), "-o", str(final), "--pp", str(postprocessing)]) == 0
    assert main(["evaluate", "--gt", str(cohort / "labelsTr"), "--pred", str(final)]) == 0
    summary = json.loads((final / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 20
    assert 0 <= summary["foreground_mean"]["Dice"] <= 1


@pytest.mark.slow
def test_final_validation_is_what_mednext_predict_gives_and_shows_progress(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import SimpleITK as sitk
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as engine_module

    from mednext.pipeline import cohort

    monkeypatch.setattr(cohort, "WINDOW_LOG_INTERVAL_S", 0.0)
    work = ["--workdir", str(trained / "work")]
    fold = trained / "work" / "nnUNet_results" / "Dataset981_Flow" / "MedNeXtTrainer_Sk3__MedNeXtPlans__2d" / "fold_0"
    assert main(["train", "981", "2d", "0", "--val", "--npz", *work, *FAST]) == 0
    assert engine_module.nnUNetPredictor is predict_from_raw_data.nnUNetPredictor  # the engine's name restored
    log = max(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime).read_text()
    assert "window batch 2/4" in log  # 8 slices, 2 per forward
    (segmentation,) = (fold / "validation").glob("case_*.nii.gz")
    case = segmentation.name.removesuffix(".nii.gz")
    image = trained / "src" / "Dataset981_Flow" / "imagesTr" / f"{case}_0000.nii.gz"
    out = trained / "validation_again"
    assert main(["predict", "-i", str(image), "-o", str(out), "-d", "981", "-c", "2d", "-f", "0", "-device", "cpu",
                 "--save-probabilities", *work]) == 0  # fmt: skip
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / segmentation.name))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(segmentation))),
    )
    probabilities = np.load(out / f"{case}.npz")["probabilities"]
    assert probabilities.std() > 0
    np.testing.assert_array_equal(probabilities, np.load(fold / "validation" / f"{case}.npz")["probabilities"])
