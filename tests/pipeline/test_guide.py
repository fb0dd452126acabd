"""docs/guide.md, run: its dataset.json examples are accepted and its commands run, in order, on tiny data.

Training lines get a tiny run length and the CPU; before the guide's ``--resume`` line, that fold
is trained again and interrupted after its first epoch, so that the line has something to resume;
the ``torchrun`` line runs two CPU (gloo) processes with ``--device cpu``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")

from synthetic_data import make_dataset  # noqa: E402
from test_train import SHAPE_2D, SHAPE_3D, _interrupted_after_first_epoch, _one_process  # noqa: E402

from mednext.cli import main  # noqa: E402

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
RUN_LENGTH = ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "1", "--device", "cpu", "--num-workers", "0"]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.+?)\n```", GUIDE.read_text(encoding="utf-8"), flags=re.S)


def guide_commands() -> list[str]:
    return [line.strip() for block in blocks("bash") for line in block.splitlines() if line.strip()]


def test_guide_dataset_json_examples_are_accepted(tmp_path):
    from mednext.pipeline.datasets import validate_raw_dataset

    examples = [json.loads(block) for block in blocks("json")]
    assert [e["file_ending"] for e in examples] == [".nii.gz", ".nii.gz", ".png", ".nii.gz"]
    for i, example in enumerate(examples):
        two_d = example["file_ending"] == ".png"
        folder = make_dataset(
            tmp_path, 910 + i, f"Example{i}", spatial_dims=2 if two_d else 3, num_cases=example["numTraining"],
            shape=SHAPE_2D if two_d else SHAPE_3D, num_channels=len(example["channel_names"]),
        )  # fmt: skip
        (folder / "dataset.json").write_text(json.dumps(example))
        info = validate_raw_dataset(folder)
        assert info.spatial_dims == (2 if two_d else 3)


def test_every_guide_command_is_one_this_test_knows():
    for command in guide_commands():
        assert command.split()[0] in ("mednext", "torchrun"), command


@pytest.mark.slow
def test_guide_commands_run_in_order(tmp_path, monkeypatch):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as engine_trainer

    monkeypatch.setattr(engine_trainer, "default_num_processes", 1)  # export pool of the final validation
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    make_dataset(tmp_path, 901, "Liver", spatial_dims=3, num_cases=5, shape=SHAPE_3D, seed=1)
    make_dataset(tmp_path, 902, "Cells", spatial_dims=2, num_cases=5, shape=SHAPE_2D, seed=2)
    held_out = make_dataset(tmp_path / "src", 903, "HeldOut", spatial_dims=3, num_cases=2, shape=SHAPE_3D, seed=3)
    shutil.copytree(held_out / "imagesTr", tmp_path / "held_out" / "images")
    shutil.copytree(held_out / "labelsTr", tmp_path / "held_out" / "labels")

    for command in guide_commands():
        args = shlex.split(command)
        if args[0] == "torchrun":
            _torchrun(args, tmp_path)
            continue
        args = args[1:]
        if args[0] == "plan":
            args += ["--num-processes", "1"]
        if args[0] == "train":
            args += RUN_LENGTH
        if "--resume" in args:  # first an interrupted run of that fold: stopped after epoch 1, as by Ctrl-C
            value = dict(zip(args, args[1:]))
            trainer = f"MedNeXtTrainer_{value['--model']}k{value['--kernel']}"
            (fold,) = (tmp_path / "work" / "nnUNet_results").glob(
                f"*/{trainer}__*__{value['--config']}/fold_{value['--fold']}"
            )
            shutil.rmtree(fold)
            with _one_process(), _interrupted_after_first_epoch():
                main([a for a in args if a != "--resume"])
            assert not (fold / "checkpoint_final.pth").exists() and (fold / "checkpoint_latest.pth").is_file()
        with _one_process():
            assert main(args) == 0, command

    results = tmp_path / "work" / "nnUNet_results"
    k3 = results / "Dataset901_Liver" / "MedNeXtTrainer_Sk3__MedNeXtPlans__3d_fullres"
    for fold in (0, 1, 2):
        assert (k3 / f"fold_{fold}" / "checkpoint_final.pth").is_file()
    assert (
        results / "Dataset901_Liver" / "MedNeXtTrainer_Sk5__MedNeXtPlans__3d_fullres/fold_0/checkpoint_final.pth"
    ).is_file()
    assert (results / "Dataset902_Cells" / "MedNeXtTrainer_Sk3__MedNeXtPlans__2d/fold_0/checkpoint_final.pth").is_file()
    log = (k3 / "fold_1").glob("training_log_*.txt")
    assert any("initialised from" in p.read_text() for p in log)
    evaluation = json.loads((tmp_path / "predictions" / "evaluation.json").read_text())
    assert [c["case"] for c in evaluation["cases"]] == ["case_000", "case_001"]
    assert set(evaluation["mean"]) == {"ball", "box"}


def _torchrun(args: list[str], cwd: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    rest = ["cpu" if a == "cuda" else a for a in args[1:]]  # the CPU's gloo backend stands in for GPUs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--master_port", port, *rest, *RUN_LENGTH[:6], "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({"nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1", "nnUNet_compile": "0"})
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
