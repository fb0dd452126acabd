"""Killed runs, full disks, paths that are files, concurrent runs on one folder, permissions."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from synthetic_data import make_dataset
from test_predict import blob_image, make_results_folder, write_image

import mednext.files
from mednext.cli import main
from mednext.files import atomic_write_text, folder_lock

# Started in every Python process of the command under test: SIGKILL the process group as soon as
# the patched method has returned KILL_AFTER times, as `kill -9` of the command would.
_SITECUSTOMIZE = """
import os, signal
if os.environ.get("KILL_AFTER"):
    import importlib
    module_name, class_name, method = os.environ["KILL_METHOD"].rsplit(".", 2)
    cls = getattr(importlib.import_module(module_name), class_name)
    original = getattr(cls, method)
    calls = []

    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= int(os.environ["KILL_AFTER"]):
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return result

    setattr(cls, method, patched)
"""


def _killed(tmp_path: Path, method: str, after: int, *argv: str) -> None:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "KILL_AFTER": str(after), "KILL_METHOD": method}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "mednext", *argv], env=env, start_new_session=True,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stdout[-1000:] + proc.stderr[-2000:]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def _predict_args(tmp_path: Path, dataset_id: int) -> tuple[Path, list[str]]:
    work = tmp_path / "work"
    make_results_folder(work / "nnUNet_results", f"Dataset{dataset_id}_Runs")
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        write_image(inp / f"case{i}_0000.nii.gz", blob_image((8, 16, 16), seed=i), (1, 1, 2))
    args = ["-i", str(inp), "--workdir", str(work), "--dataset", str(dataset_id), "--device", "cpu", "--no-tta"]
    return inp, args


@pytest.mark.slow
def test_killed_prediction_leaves_only_whole_files_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    _, args = _predict_args(tmp_path, 970)
    out = tmp_path / "out"
    # killed once the second case is exported into the workspace, before it is moved to its name
    _killed(tmp_path, "mednext.pipeline.predictor.MedNeXtPredictor.export_case", 2, "predict", *args, "-o", str(out))
    first = sorted(p.name for p in out.glob("*.nii.gz"))
    assert first == ["case0.nii.gz"]  # the case finished before the kill; the second never reached its name
    assert any(name.startswith(".mednext-predict-") for name in _hidden(out))  # the kill left its workspace
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case0.nii.gz")))

    assert main(["predict", *args, "-o", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert _hidden(out) == []  # workspace and lock gone
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case0.nii.gz"))), before)


@pytest.mark.slow
def test_killed_training_resumes_at_the_epoch_it_saved(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src", 971, "Runs", spatial_dims=3, num_cases=5, shape=(8, 16, 16), seed=7)
    work = ["--workdir", str(tmp_path / "work")]
    assert main(["plan", str(src), *work, "--num-processes", "1", "--configs", "3d_fullres"]) == 0
    train = ["train", "971", *work, "--fold", "0", "--epochs", "3", "--iters-per-epoch", "2", "--val-iters", "1",
             "--no-val", "--device", "cpu", "--num-workers", "0", "--quiet"]  # fmt: skip
    _killed(tmp_path, "mednext.pipeline.trainer.MedNeXtTrainer.on_epoch_end", 2, *train)
    fold = tmp_path / "work" / "nnUNet_results" / "Dataset971_Runs" / "MedNeXtTrainer_Sk3__MedNeXtPlans__3d_fullres"
    fold = fold / "fold_0"
    latest = torch.load(fold / "checkpoint_latest.pth", weights_only=True)
    assert latest["current_epoch"] == 2 and not (fold / "checkpoint_final.pth").exists()
    assert main([*train, "--resume"]) == 0
    final = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert final["current_epoch"] == 3
    log = json.loads((fold / "training_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [0, 1, 2]
    assert _hidden(fold) == []


def test_full_disk_is_one_line_naming_the_file_and_nothing_is_half_written(tmp_path: Path, capsys, monkeypatch) -> None:
    _, args = _predict_args(tmp_path, 972)
    out = tmp_path / "out"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mednext.files.os, "fsync", full)
    capsys.readouterr()
    assert main(["predict", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # the first file written whole is the run's record, before any segmentation is moved into place
    assert str(out / "mednext_predict.json") in err and "No space left on device" in err and "free space" in err
    assert not (out / "mednext_predict.json").exists() and not list(out.glob("case*")) and _hidden(out) == []


def test_paths_that_are_files_are_one_line_errors(tmp_path: Path, capsys) -> None:
    _, args = _predict_args(tmp_path, 973)
    blocker = tmp_path / "out"
    blocker.write_text("a file, not a folder")
    capsys.readouterr()
    assert main(["predict", *args, "-o", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker) in err and "a file stands where a folder is needed" in err

    src = make_dataset(tmp_path / "src", 974, "Files", spatial_dims=3, num_cases=3, shape=(8, 16, 16))
    work = tmp_path / "workfile"
    work.write_text("not a folder")
    assert main(["plan", str(src), "--workdir", str(work), "--num-processes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(work) in err
    assert work.read_text() == "not a folder"


def test_a_second_run_on_the_same_folder_is_refused(tmp_path: Path, capsys) -> None:
    _, args = _predict_args(tmp_path, 975)
    out = tmp_path / "out"
    with folder_lock(out, "mednext predict"):
        capsys.readouterr()
        assert main(["predict", *args, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "in use by mednext predict (process" in err
        assert not list(out.glob("*.nii.gz"))
    assert main(["predict", *args, "-o", str(out)]) == 0


def test_a_plan_waits_for_no_one_while_a_training_reads_the_data(tmp_path: Path, capsys) -> None:
    src = make_dataset(tmp_path / "src", 976, "Busy", spatial_dims=3, num_cases=3, shape=(8, 16, 16))
    pre = tmp_path / "work" / "nnUNet_preprocessed" / "Dataset976_Busy"
    with folder_lock(pre, "mednext train", shared=True), folder_lock(pre, "mednext train", shared=True):
        capsys.readouterr()
        assert main(["plan", str(src), "--workdir", str(tmp_path / "work"), "--num-processes", "1"]) == 2
        assert "in use by mednext train" in capsys.readouterr().err
    assert not (pre / "MedNeXtPlans.json").exists()


def test_files_are_created_with_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o664


def test_unwritable_output_folder_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    # permissions are injected: the tests may run as root, which writes into read-only folders
    import mednext.pipeline.predictor as predictor

    _, args = _predict_args(tmp_path, 977)
    out = tmp_path / "out"

    def denied(dir: str, prefix: str) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x"))

    monkeypatch.setattr(predictor.tempfile, "mkdtemp", denied)
    capsys.readouterr()
    assert main(["predict", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "Permission denied" in err
    assert "choose a folder you may write to" in err
