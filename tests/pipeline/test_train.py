"""plan -> train -> interrupt -> resume on tiny synthetic nnU-Net v2 datasets, through the CLI;
bad raw datasets; DDP with two gloo processes. CPU only, no network."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_data import make_dataset, write_image  # noqa: E402

from mednext.cli import main

SHAPE_3D = (8, 16, 16)  # spacing (2, 1, 1) mm: the engine plans an (8, 16, 16) patch
SHAPE_2D = (48, 48)
FAST = ["--device", "cpu", "--num-workers", "0", "--quiet"]


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """The engine's process settings for a test: one preprocessing process, no torch.compile."""
    from mednext.pipeline.workdir import COMPILE, DEFAULT_PROCESSES, engine_setting

    with engine_setting(DEFAULT_PROCESSES, 1), engine_setting(COMPILE, 0):
        yield


@pytest.fixture(autouse=True)
def _engine_settings() -> Iterator[None]:
    # each test's working folder is its own: tests/conftest.py resets the engine's folders
    with _one_process():
        torch.set_num_threads(1)  # oversubscribed OpenMP threads slow CPU training on shared runners
        yield


def _plan(root: Path, dataset: Path | str, *extra: str) -> None:
    assert main(["plan", str(dataset), "--workdir", str(root / "work"), "--num-processes", "1", *extra]) == 0


def _results(root: Path, dataset: str, trainer: str, plans: str, config: str) -> Path:
    return root / "work" / "nnUNet_results" / dataset / f"{trainer}__{plans}__{config}"


@pytest.fixture(scope="module")
def planned_3d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("p3d")
    src = make_dataset(root / "src", 901, "Synth", spatial_dims=3, num_cases=5, shape=SHAPE_3D, seed=1)
    with _one_process():
        _plan(root, src, "--configs", "3d_fullres")
    yield root


# ----------------------------------------------------------------------------- planning


@pytest.mark.slow
def test_plan_3d_auto_describes_mednext(planned_3d: Path) -> None:
    pre = planned_3d / "work" / "nnUNet_preprocessed" / "Dataset901_Synth"
    plans = json.loads((pre / "MedNeXtPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    assert arch["network_class_name"] == "mednext.nn.MedNeXt"
    assert arch["_kw_requires_import"] == []
    strides = arch["arch_kwargs"]["strides"]
    assert len(strides) == 4
    total = [int(np.prod([s[a] for s in strides])) for a in range(3)]
    assert all(p % t == 0 for p, t in zip(cfg["patch_size"], total, strict=True))
    assert cfg["spacing"] == [2.0, 1.0, 1.0]  # the engine's data-driven spacing is kept
    assert cfg["batch_dice"] is True
    assert "3d_lowres" not in plans["configurations"]
    assert (pre / "MedNeXtPlans_3d_fullres").is_dir()
    assert (planned_3d / "work" / "nnUNet_raw" / "Dataset901_Synth" / "dataset.json").is_file()

    from mednext.nn import MedNeXt

    net = MedNeXt(in_channels=1, num_classes=3, **arch["arch_kwargs"]).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, *cfg["patch_size"])).shape == (1, 3, *cfg["patch_size"])


@pytest.mark.slow
def test_plan_paper_recipe(planned_3d: Path) -> None:
    from mednext.pipeline.planning import MedNeXtPaperPlanner
    from mednext.pipeline.workdir import use_workdir

    use_workdir(planned_3d / "work")
    plans = MedNeXtPaperPlanner(901).plan_experiment()  # the fingerprint from the fixture is reused
    assert plans["plans_name"] == "MedNeXtPlans_paper"
    c3, c2 = plans["configurations"]["3d_fullres"], plans["configurations"]["2d"]
    assert c3["spacing"] == [1.0, 1.0, 1.0] and c3["patch_size"] == [128, 128, 128] and c3["batch_size"] == 2
    assert c2["patch_size"] == [512, 512] and c2["batch_size"] == 2
    assert c3["architecture"]["arch_kwargs"]["strides"] == [[2, 2, 2]] * 4
    # leave the module's working folder with the auto plans only (other tests train from it)
    (planned_3d / "work/nnUNet_preprocessed/Dataset901_Synth/MedNeXtPlans_paper.json").unlink()


@pytest.mark.slow
def test_auto_recipe_sizes_patch_for_mednext_memory(planned_3d: Path) -> None:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from mednext.pipeline.planning import MedNeXtPlanner, memory_ratio, total_stride
    from mednext.pipeline.workdir import use_workdir

    use_workdir(planned_3d / "work")
    big = (np.array([1.0, 1.0, 1.0]), np.array([320, 320, 320]), "probe", 320.0**3 * 100)

    def volume(planner: ExperimentPlanner) -> tuple[float, dict]:
        plan = planner.get_plans_for_configuration(*big, {})
        return float(np.prod(plan["patch_size"]) * plan["batch_size"]), plan

    engine, _ = volume(ExperimentPlanner(901, gpu_memory_target_in_gb=8))
    ours, plan = volume(MedNeXtPlanner(901, gpu_memory_target_in_gb=8))
    # the engine's search at 1/ratio of the budget: far fewer voxels per step than its U-Net gets
    assert ours < engine / (memory_ratio(3) / 2)
    larger, _ = volume(MedNeXtPlanner(901, gpu_memory_target_in_gb=32))
    assert larger > ours
    strides = plan["architecture"]["arch_kwargs"]["strides"]
    assert all(p % t == 0 for p, t in zip(plan["patch_size"], total_stride(strides), strict=True))
    assert plan["architecture"]["network_class_name"] == "mednext.nn.MedNeXt"


def test_memory_ratio_reflects_checkpointing() -> None:
    from mednext.pipeline.planning import memory_ratio

    s, b, m = memory_ratio(3, "S"), memory_ratio(3, "B"), memory_ratio(3, "M")
    assert 1.5 < s < b  # B's larger expansion ratios store more than S; both exceed the engine's U-Net
    assert m < 1.0  # M recomputes its blocks (gradient checkpointing) and stores far less
    assert memory_ratio(2, "B") > 1.5


def test_stage_strides_from_engine() -> None:
    from mednext.pipeline.planning import stage_strides_from_engine, total_stride

    engine = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    strides = stage_strides_from_engine(engine, 3)
    assert strides == [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert total_stride(strides) == [8, 16, 16]
    assert stage_strides_from_engine([[1, 1], [2, 2], [2, 2]], 2) == [[2, 2], [2, 2], [1, 1], [1, 1]]


# ----------------------------------------------------------------------------- training


@contextlib.contextmanager
def _interrupted_after_first_epoch() -> Iterator[None]:
    """Within this block training stops with a KeyboardInterrupt once epoch 0's checkpoint is written
    (as if the user pressed Ctrl-C)."""
    from mednext.pipeline.trainer import MedNeXtTrainer

    original = MedNeXtTrainer.on_epoch_end

    def on_epoch_end(self: MedNeXtTrainer) -> None:
        original(self)
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    MedNeXtTrainer.on_epoch_end = on_epoch_end
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        MedNeXtTrainer.on_epoch_end = original


@pytest.mark.slow
def test_train_interrupt_resume_3d(
    planned_3d: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["train", "901", "--workdir", str(planned_3d / "work"), "--config", "3d_fullres", "--fold", "0"]
    args += ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "1", "--no-val", *FAST]
    with _interrupted_after_first_epoch():
        main(args)
    out = _results(planned_3d, "Dataset901_Synth", "MedNeXtTrainer_Sk3", "MedNeXtPlans", "3d_fullres")
    fold = out / "fold_0"
    latest = torch.load(fold / "checkpoint_latest.pth", weights_only=True)
    assert latest["current_epoch"] == 1 and not (fold / "checkpoint_final.pth").exists()
    assert not list(fold.glob(".*.tmp"))  # no half-written checkpoint left behind

    # without --resume the run refuses to overwrite the interrupted one
    assert main(args) == 2

    import mednext.pipeline.trainer as trainer_module

    kept: list[bool] = []
    original = trainer_module.reuse_freed_memory
    monkeypatch.setattr(
        trainer_module, "reuse_freed_memory", lambda enable=True: kept.append(enable) or original(enable)
    )
    assert main([*args, "--resume"]) == 0
    assert kept == [True]  # CPU training keeps freed memory between steps (mednext.memory)
    final = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert not (fold / "checkpoint_latest.pth").exists()
    assert final["current_epoch"] == 2
    assert final["trainer_name"] == "MedNeXtTrainer_Sk3"
    assert tuple(final["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    assert final["init_args"]["configuration"] == "3d_fullres"
    opt = final["optimizer_state"]["param_groups"][0]
    assert opt["eps"] == 1e-4 and opt["weight_decay"] == 3e-5
    assert opt["lr"] == pytest.approx(1e-3 * (1 - 1 / 2) ** 0.9)  # poly decay continued at epoch 1
    assert not (latest["network_weights"]["stem.weight"] == final["network_weights"]["stem.weight"]).all()

    log = json.loads((fold / "training_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [0, 1]
    assert all(np.isfinite(e["train_loss"]) for e in log["epochs"])
    assert log["finished"] is True and log["precision"] == "float32"
    assert (fold / "progress.png").stat().st_size > 0

    # the results folder alone rebuilds the trained network
    plans = json.loads((out / "plans.json").read_text())
    ds = json.loads((out / "dataset.json").read_text())
    assert (out / "dataset_fingerprint.json").is_file()
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "mednext.nn.MedNeXt"
    from mednext.nn import MedNeXt

    net = MedNeXt(in_channels=len(ds["channel_names"]), num_classes=len(ds["labels"]), **arch["arch_kwargs"])
    net.load_state_dict(final["network_weights"])  # strict

    # a k5 run initialised from this k3 checkpoint by UpKern
    capsys.readouterr()
    upk = ["train", "901", "--workdir", str(planned_3d / "work"), "--fold", "2", "--kernel", "5"]
    upk += ["--upkern-from", str(fold / "checkpoint_final.pth"), "--epochs", "1", "--iters-per-epoch", "1"]
    assert main([*upk, "--val-iters", "0", "--no-val", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "UpKern from" in printed and "interpolated" in printed
    k5 = _results(planned_3d, "Dataset901_Synth", "MedNeXtTrainer_Sk5", "MedNeXtPlans", "3d_fullres")
    k5_arch = json.loads((k5 / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert k5_arch["arch_kwargs"]["kernel_sizes"][0] == [5, 5, 5]


@pytest.mark.slow
def test_train_2d_resume_validation_other_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as engine_trainer

    monkeypatch.setattr(engine_trainer, "default_num_processes", 1)  # export pool of the final validation
    src = make_dataset(tmp_path / "src", 902, "Flat", spatial_dims=2, num_cases=5, shape=SHAPE_2D, seed=2)
    _plan(tmp_path, src, "--configs", "2d,3d_fullres")  # 3d_fullres is skipped for 2D data
    plans = json.loads((tmp_path / "work/nnUNet_preprocessed/Dataset902_Flat/MedNeXtPlans.json").read_text())
    assert set(plans["configurations"]) == {"2d"}
    from mednext.pipeline.planning import MedNeXtPaperPlanner

    paper = MedNeXtPaperPlanner(902).plan_experiment()["configurations"]["2d"]
    assert paper["patch_size"] == [512, 512] and paper["spacing"] == [1.0, 1.0] and paper["batch_size"] == 2
    (tmp_path / "work/nnUNet_preprocessed/Dataset902_Flat/MedNeXtPlans_paper.json").unlink()

    args = ["train", "Dataset902_Flat", "--workdir", str(tmp_path / "work"), "--config", "2d", "--fold", "all"]
    args += ["--model", "B", "--kernel", "5", "--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "1", *FAST]
    with _interrupted_after_first_epoch():
        main(args)
    out = _results(tmp_path, "Dataset902_Flat", "MedNeXtTrainer_Bk5", "MedNeXtPlans", "2d")
    assert torch.load(out / "fold_all" / "checkpoint_latest.pth", weights_only=True)["current_epoch"] == 1
    assert main([*args, "--resume"]) == 0
    ckpt = torch.load(out / "fold_all" / "checkpoint_final.pth", weights_only=True)
    arch = json.loads((out / "plans.json").read_text())["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert arch["spatial_dims"] == 2 and arch["kernel_sizes"][0] == [5, 5]
    assert arch["expansion_ratios"] == [2, 3, 4, 4, 4, 4, 4, 3, 2]
    from mednext.nn import MedNeXt

    MedNeXt(in_channels=1, num_classes=3, **arch).load_state_dict(ckpt["network_weights"])
    summary = json.loads((out / "fold_all" / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    assert len(list((out / "fold_all" / "validation").glob("*.png"))) == 5


@pytest.mark.slow
def test_loss_weights_and_recipe(planned_3d: Path) -> None:
    from mednext.pipeline.trainer import get_trainer_class
    from mednext.pipeline.workdir import use_workdir

    use_workdir(planned_3d / "work")
    pre = planned_3d / "work/nnUNet_preprocessed/Dataset901_Synth"
    plans = json.loads((pre / "MedNeXtPlans.json").read_text())
    ds = json.loads((pre / "dataset.json").read_text())
    trainer = get_trainer_class("M", 3)(plans, "3d_fullres", 0, ds, torch.device("cpu"))
    trainer.configure_run(epochs=3, iters_per_epoch=1, val_iters=1, show_progress=False)
    trainer.initialize()
    assert trainer.loss.weight_factors == pytest.approx(np.array([16, 8, 4, 2, 1]) / 31)
    assert trainer.loss.loss.dc.batch_dice is True and trainer.loss.loss.dc.do_bg is False
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    scales = trainer._get_deep_supervision_scales()
    assert len(scales) == 5 and scales[0] == [1.0, 1.0, 1.0]
    net = trainer.network
    assert net.grad_checkpointing is True and net.config["block_counts"] == [3, 4, 4, 4, 4, 4, 4, 4, 3]
    with pytest.raises(ValueError, match="CUDA"):
        get_trainer_class("S", 3)(plans, "3d_fullres", 0, ds, torch.device("cpu")).configure_run(bf16=True)


@pytest.mark.slow
def test_train_errors(planned_3d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = ["--workdir", str(planned_3d / "work")]
    cases = [
        (["train", "999", *work, *FAST], "not found"),
        (["train", "901", *work, "--config", "2d", *FAST], "mednext plan Dataset901_Synth --configs 2d"),
        (["train", "901", *work, "--fold", "7", *FAST], "--fold"),
        (["train", "901", *work, "--fold", "3", "--resume", *FAST], "nothing to resume"),
        (["train", "901", *work, "--recipe", "paper", "--fold", "3", *FAST], "MedNeXtPlans_paper"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


# ----------------------------------------------------------------------------- bad raw datasets


def _bad_dataset(tmp_path: Path, spatial_dims: int = 3) -> Path:
    shape = (8, 16, 16) if spatial_dims == 3 else (32, 32)
    return make_dataset(tmp_path / "src", 950, "Bad", spatial_dims=spatial_dims, num_cases=5, shape=shape, seed=3)


def _plan_error(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["plan", str(src), "--workdir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert not (tmp_path / "work" / "nnUNet_preprocessed" / "Dataset950_Bad").exists()  # failed before the engine
    return err


def _edit_json(src: Path, **changes: object) -> None:
    meta = json.loads((src / "dataset.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (src / "dataset.json").write_text(json.dumps(meta))


def test_bad_dataset_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _bad_dataset(tmp_path, 2)
    (src / "dataset.json").write_text('{"labels": {"background": 0,}')
    assert "dataset.json is not valid JSON (line 1" in _plan_error(tmp_path, src, capsys)
    src = _bad_dataset(tmp_path / "b", 2)
    _edit_json(src, file_ending=None)
    assert "lacks file_ending" in _plan_error(tmp_path / "b", src, capsys)
    src = _bad_dataset(tmp_path / "c", 2)
    _edit_json(src, labels={"ball": 1, "box": 2})
    assert '"background": 0' in _plan_error(tmp_path / "c", src, capsys)
    src = _bad_dataset(tmp_path / "d", 2)
    _edit_json(src, file_ending=".jpg")
    assert "not read by the engine" in _plan_error(tmp_path / "d", src, capsys)
    src = _bad_dataset(tmp_path / "e", 2)
    _edit_json(src, numTraining=7)
    assert "set numTraining to 5" in _plan_error(tmp_path / "e", src, capsys)


def test_image_without_label_and_label_without_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _bad_dataset(tmp_path, 2)
    (src / "labelsTr" / "case_001.png").unlink()
    shutil.move(src / "imagesTr" / "case_002_0000.png", tmp_path / "gone.png")
    err = _plan_error(tmp_path, src, capsys)
    assert "case_001_0000.png: image without label; add labelsTr/case_001.png" in err
    assert "case_002.png: label without image; add imagesTr/case_002_0000.png" in err


def test_missing_channel_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_dataset(tmp_path / "src", 950, "Bad", spatial_dims=3, num_cases=5, shape=(8, 16, 16), num_channels=2)
    (src / "imagesTr" / "case_003_0001.nii.gz").unlink()
    err = _plan_error(tmp_path, src, capsys)
    assert "case case_003 lacks channel file(s) case_003_0001.nii.gz" in err


def test_geometry_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import SimpleITK as sitk

    src = _bad_dataset(tmp_path)
    label = np.zeros((8, 16, 17), np.uint8)
    write_image(src / "labelsTr" / "case_000.nii.gz", label, 3)  # size
    img = sitk.ReadImage(str(src / "labelsTr" / "case_001.nii.gz"))
    img.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(img, str(src / "labelsTr" / "case_001.nii.gz"))  # spacing
    img = sitk.ReadImage(str(src / "labelsTr" / "case_002.nii.gz"))
    img.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(img, str(src / "labelsTr" / "case_002.nii.gz"))  # origin
    err = _plan_error(tmp_path, src, capsys)
    assert "case_000_0000.nii.gz: size (16, 16, 8) differs from its label case_000.nii.gz (17, 16, 8)" in err
    assert "case_001_0000.nii.gz: spacing (1.0, 1.0, 2.0) differs from its label" in err
    assert "case_002_0000.nii.gz: origin (0.0, 0.0, 0.0) differs from its label" in err


def test_undeclared_label_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _bad_dataset(tmp_path, 2)
    from PIL import Image

    lab = np.array(Image.open(src / "labelsTr" / "case_004.png"))
    lab[0, 0] = 7
    Image.fromarray(lab).save(src / "labelsTr" / "case_004.png")
    err = _plan_error(tmp_path, src, capsys)
    assert "case_004.png: label value(s) [7] are not in dataset.json's labels" in err


def test_register_and_resolve(tmp_path: Path) -> None:
    from mednext.pipeline.datasets import DatasetError, register_dataset, resolve_dataset
    from mednext.pipeline.workdir import use_workdir

    dirs = use_workdir(tmp_path / "work")
    src = make_dataset(tmp_path / "src", 903, "Named", spatial_dims=2, num_cases=5, shape=(32, 32))
    assert register_dataset(src) == "Dataset903_Named"
    assert register_dataset(src) == "Dataset903_Named"  # idempotent
    assert (dirs.raw / "Dataset903_Named" / "dataset.json").is_file()
    plain = tmp_path / "my scans"
    shutil.copytree(src, plain)
    assert register_dataset(plain) == "Dataset900_my_scans"  # no DatasetXXX_ prefix: first free id from 900
    assert resolve_dataset("903") == resolve_dataset("Dataset903_Named") == "Dataset903_Named"
    other = make_dataset(tmp_path / "src2", 903, "Other", spatial_dims=2, num_cases=5, shape=(32, 32))
    with pytest.raises(DatasetError, match="already used by Dataset903_Named"):
        register_dataset(other)
    with pytest.raises(DatasetError, match="not found"):
        resolve_dataset("904")


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_torchrun_two_gloo_processes_keep_replicas_identical(planned_3d: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(planned_3d / "work" / "nnUNet_preprocessed", work / "nnUNet_preprocessed", symlinks=True)
    shutil.copytree(planned_3d / "work" / "nnUNet_raw", work / "nnUNet_raw", symlinks=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({"nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1", "nnUNet_compile": "0"})  # the child's environment
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "mednext", "train", "901", "--workdir", str(work), "--config", "3d_fullres", "--fold", "1"]
    cmd += ["--epochs", "1", "--iters-per-epoch", "3", "--val-iters", "1", "--no-val", *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fold = work / "nnUNet_results/Dataset901_Synth/MedNeXtTrainer_Sk3__MedNeXtPlans__3d_fullres/fold_1"
    log = json.loads((fold / "training_log.json").read_text())
    assert log["world_size"] == 2
    assert log["replica_max_abs_diff"] == 0.0
    assert log["batch_size"] == 1  # the planned batch of 2 is split over the two processes
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["network_weights"])


@pytest.mark.slow
def test_train_v2_base_through_the_same_trainer(planned_3d: Path) -> None:
    """`mednext train --model v2-base`: the v1 recipe's trainer with MedNeXt-v2 Base, whose results folder
    rebuilds the network and is found by `mednext predict --model v2-base`; --compile on the CPU keeps the
    eager network and says so in the log."""
    work = planned_3d / "work"
    args = ["train", "901", "--workdir", str(work), "--fold", "3", "--model", "v2-base", "--compile"]
    assert main([*args, "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "0", "--no-val", *FAST]) == 0
    out = _results(planned_3d, "Dataset901_Synth", "MedNeXtTrainer_V2Basek3", "MedNeXtPlans", "3d_fullres")
    final = torch.load(out / "fold_3" / "checkpoint_final.pth", weights_only=True)
    arch = json.loads((out / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["grn"] == {"where": "all", "norm": "sum"} and arch["width"] == 32
    assert arch["block_counts"] == [3, 4, 8, 8, 8, 8, 8, 4, 3] and arch["grad_checkpointing"] is True
    assert "down_0.grn_gamma" in final["network_weights"]
    from mednext.nn import MedNeXt

    MedNeXt(in_channels=1, num_classes=3, **arch).load_state_dict(final["network_weights"])  # strict
    logs = "".join(p.read_text(encoding="utf-8") for p in (out / "fold_3").glob("training_log_*.txt"))
    assert "torch.compile skipped on cpu" in logs

    from mednext.pipeline.predictor import resolve_trained_model
    from mednext.pipeline.workdir import use_workdir

    use_workdir(work)
    trained = resolve_trained_model("Dataset901_Synth", "3d_fullres", "V2-BASE", 3, None)
    assert trained.folder == out and trained.model == "V2-BASE" and trained.kernel == 3
    from mednext.pipeline.trainer import get_trainer_class

    assert get_trainer_class("V2-BASE", 5).__name__ == "MedNeXtTrainer_V2Basek5"  # any odd kernel, made on use
    with pytest.raises(ValueError, match="an odd --kernel"):
        get_trainer_class("V2-BASE", 4)
