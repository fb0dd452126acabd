"""Preprocessing is complete or refused: a killed `mednext plan`, a changed raw dataset and a split
file that does not match the cases never lead to training on fewer (or other) cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_data import make_dataset

from mednext.cli import main

SHAPE = (8, 16, 16)
FAST = ["--device", "cpu", "--num-workers", "0", "--quiet", "--epochs", "1", "--iters-per-epoch", "1",
        "--val-iters", "1", "--no-val"]  # fmt: skip

# Started in every Python process of a `mednext plan` run (the engine's spawned workers too): after
# the engine's preprocessor has saved KILL_AFTER_CASES cases, SIGKILL the whole process group,
# as `kill -9` of the command would.
_SITECUSTOMIZE = """
import os, signal
if os.environ.get("KILL_AFTER_CASES"):
    from pathlib import Path
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    _save = DefaultPreprocessor.run_case_save

    def run_case_save(self, output_filename_truncated, *args, **kwargs):
        _save(self, output_filename_truncated, *args, **kwargs)
        done = len(list(Path(output_filename_truncated).parent.glob("*.pkl")))
        if done >= int(os.environ["KILL_AFTER_CASES"]):
            os.killpg(os.getpgid(0), signal.SIGKILL)

    DefaultPreprocessor.run_case_save = run_case_save
"""


def _plan_killed(tmp_path: Path, src: Path, after: int) -> None:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "KILL_AFTER_CASES": str(after), "nnUNet_def_n_proc": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "mednext", "plan", str(src), "--workdir", str(tmp_path / "work"),
           "--num-processes", "1", "--configs", "3d_fullres"]  # fmt: skip
    proc = subprocess.run(
        cmd,
        env=env,
        start_new_session=True,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]


def _train(tmp_path: Path, fold: int, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["train", "962", "--config", "3d_fullres", "--fold", str(fold), "--workdir", str(tmp_path / "work"),
                 *FAST])  # fmt: skip
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_killed_plan_is_refused_then_replanned(tmp_path: Path, capsys) -> None:
    src = make_dataset(tmp_path / "src", 962, "Kill", spatial_dims=3, num_cases=12, shape=SHAPE, seed=4)
    _plan_killed(tmp_path, src, after=4)
    pre = tmp_path / "work" / "nnUNet_preprocessed" / "Dataset962_Kill"
    data = pre / "MedNeXtPlans_3d_fullres"
    assert 4 <= len(list(data.glob("*.pkl"))) < 12  # the kill left part of the cases
    code, err = _train(tmp_path, 0, capsys)
    assert code == 2
    assert "incomplete" in err and "mednext plan Dataset962_Kill" in err
    assert not (pre / "splits_final.json").exists()  # nothing was trained on the partial data
    assert not (tmp_path / "work" / "nnUNet_results" / "Dataset962_Kill").exists()

    # a complete plan makes training possible, on all 12 cases
    assert main(["plan", str(src), "--workdir", str(tmp_path / "work"), "--num-processes", "1",
                 "--configs", "3d_fullres"]) == 0  # fmt: skip
    code, err = _train(tmp_path, 1, capsys)
    assert code == 0, err
    splits = json.loads((pre / "splits_final.json").read_text())
    assert len(splits) == 5 and len(splits[1]["train"]) + len(splits[1]["val"]) == 12


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mednext.pipeline.workdir import DEFAULT_PROCESSES, engine_setting

    root = tmp_path_factory.mktemp("planned")
    src = make_dataset(root / "src", 962, "Kill", spatial_dims=3, num_cases=6, shape=SHAPE, seed=5)
    with engine_setting(DEFAULT_PROCESSES, 1):
        assert main(["plan", str(src), "--workdir", str(root / "work"), "--num-processes", "1",
                     "--configs", "3d_fullres"]) == 0  # fmt: skip
    return root


def _copy(planned: Path, tmp_path: Path) -> Path:
    shutil.copytree(planned / "src", tmp_path / "src", symlinks=True)
    shutil.copytree(planned / "work", tmp_path / "work", symlinks=True)
    raw_link = tmp_path / "work" / "nnUNet_raw" / "Dataset962_Kill"
    raw_link.unlink()
    raw_link.symlink_to(tmp_path / "src" / "Dataset962_Kill", target_is_directory=True)
    return tmp_path / "work" / "nnUNet_preprocessed" / "Dataset962_Kill"


@pytest.mark.slow
def test_stale_split_file_is_refused(planned: Path, tmp_path: Path, capsys) -> None:
    pre = _copy(planned, tmp_path)
    stale = [{"train": ["case_000", "case_001", "case_002", "case_003"], "val": ["case_004"]}] * 5
    (pre / "splits_final.json").write_text(json.dumps(stale))
    code, err = _train(tmp_path, 1, capsys)
    assert code == 2
    assert "splits_final.json" in err and "case_005" in err and "delete" in err
    other = [{"train": ["case_000", "case_001", "case_002", "case_003", "case_004"], "val": ["gone_007"]}] * 5
    (pre / "splits_final.json").write_text(json.dumps(other))
    code, err = _train(tmp_path, 0, capsys)
    assert code == 2 and "gone_007" in err


@pytest.mark.slow
def test_preprocessing_changed_after_plan_is_refused(planned: Path, tmp_path: Path, capsys) -> None:
    pre = _copy(planned, tmp_path)
    victim = pre / "MedNeXtPlans_3d_fullres" / "case_002.b2nd"
    victim.write_bytes(victim.read_bytes()[:-10])  # a preprocessed file cut short
    code, err = _train(tmp_path, 0, capsys)
    assert code == 2 and "case_002" in err and "mednext plan Dataset962_Kill" in err


@pytest.mark.slow
def test_raw_dataset_changed_after_plan_is_refused(planned: Path, tmp_path: Path, capsys) -> None:
    _copy(planned, tmp_path)
    raw = tmp_path / "src" / "Dataset962_Kill"
    for f in (raw / "imagesTr" / "case_005_0000.nii.gz", raw / "labelsTr" / "case_005.nii.gz"):
        f.unlink()
    meta = json.loads((raw / "dataset.json").read_text())
    meta["numTraining"] = 5
    (raw / "dataset.json").write_text(json.dumps(meta))
    code, err = _train(tmp_path, 0, capsys)
    assert code == 2 and "changed since" in err and "case_005" in err
