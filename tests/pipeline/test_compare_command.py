"""`mednext compare` end to end on a tiny 2D dataset: MedNeXt and nnU-Net's default U-Net trained for a
few iterations, an interrupted comparison resumed with nnU-Net's ResEnc M added, an ordinary training
reused, and the report recomputed from the saved predictions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from synthetic_data import make_dataset

from mednext.cli import main

RUN = ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "1", "--device", "cpu", "--quiet"]
MODELS = ["--models", "mednext:S:k3", "nnunet:2d"]


def _interrupt_when(command: list[str], target: Path, env: dict[str, str], limit_s: float = 300.0) -> None:
    """Start ``command`` and kill it once ``target`` exists; its training process must end with it."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + limit_s
        while not target.is_file():
            assert proc.poll() is None, "the comparison ended before it could be interrupted"
            assert time.monotonic() < deadline, f"{target} did not appear"
            time.sleep(0.1)
    finally:
        proc.kill()  # the comparison only, as a scheduler's kill or a closed terminal would
        proc.wait()
    # the training process it started ends with it (its folder locks go when it has exited)
    deadline = time.monotonic() + 60
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the training process outlived the killed comparison")
        time.sleep(0.1)


@pytest.mark.slow
def test_compare_trains_resumes_reuses_and_reports(tmp_path: Path) -> None:
    from mednext.pipeline.workdir import COMPILE, DEFAULT_PROCESSES, engine_setting

    src = make_dataset(tmp_path / "src", 972, "Versus", spatial_dims=2, num_cases=10, shape=(32, 32), seed=4)
    workdir = tmp_path / "work"
    work = ["--workdir", str(workdir)]
    out = tmp_path / "out"
    results = workdir / "nnUNet_results" / "Dataset972_Versus"
    torch.set_num_threads(1)
    with engine_setting(DEFAULT_PROCESSES, 1), engine_setting(COMPILE, 0):
        # an ordinary training of the same budget, made before the comparison: reused, not trained again
        assert main(["plan", str(src), *work, "--configs", "2d", "--num-processes", "1"]) == 0
        assert main(["train", "972", "2d", "0", "--no-val", *work, *RUN]) == 0
        ours = results / "MedNeXtTrainer_Sk3__MedNeXtPlans__2d" / "fold_0" / "checkpoint_final.pth"
        before = ours.read_bytes()

        # a comparison killed while nnU-Net's first fold is half trained ...
        theirs = results / "nnUNetTrainer_budget__nnUNetPlans__2d" / "fold_0"
        command = [sys.executable, "-m", "mednext", "compare", "972", *work, "--out", str(out), *MODELS,
                   "--folds", "0", *RUN]  # fmt: skip
        _interrupt_when(command, theirs / "checkpoint_latest.pth", dict(os.environ))
        assert not (theirs / "checkpoint_final.pth").is_file()
        assert not (out / "compare.json").is_file()

        # ... continues where it stopped, with nnU-Net's residual-encoder preset M added
        three = [*MODELS, "nnunet-resenc:M"]
        assert main(["compare", "972", *work, "--out", str(out), *three, "--folds", "0", *RUN]) == 0
    assert ours.read_bytes() == before
    peak = json.loads((theirs / "mednext_training_peak.json").read_text())
    assert peak["resumed"] is True and peak["peak_memory_mb"] > 0
    resumed = torch.load(theirs / "checkpoint_final.pth", weights_only=True)
    assert len(resumed["logging"]["train_losses"]) == 2  # two epochs in all, the first from before the kill

    report = json.loads((out / "compare.json").read_text())
    splits = json.loads((workdir / "nnUNet_preprocessed" / "Dataset972_Versus" / "splits_final.json").read_text())
    assert sorted(report["cases"]) == sorted(splits[0]["val"]) and len(splits[0]["val"]) == 2
    assert [m["spec"] for m in report["models"]] == ["mednext:S:k3:2d", "nnunet:2d", "nnunet-resenc:M:2d"]
    # the engine's own planner made ResEnc M's plans, and its network is the engine's
    plans = json.loads((results / "nnUNetTrainer_budget__nnUNetResEncUNetMPlans__2d" / "plans.json").read_text())
    assert plans["experiment_planner_used"] == "nnUNetPlannerResEncM"
    assert plans["configurations"]["2d"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert report["baseline"] == "nnunet:2d" and report["classes"] == ["ball", "box"]
    assert sorted((r["model"], r["metric"], r["class"]) for r in report["comparisons"]) == sorted(
        (s, m, c)
        for s in ("mednext:S:k3:2d", "nnunet-resenc:M:2d")
        for m in ("dice", "nsd")
        for c in ("ball", "box", "mean over classes")
    )
    for row in report["comparisons"]:
        assert row["n"] == 2 and row["wins"] + row["ties"] + row["losses"] == 2 and 0 < row["p_value"] <= 1
    for spec in ("mednext:S:k3:2d", "nnunet:2d", "nnunet-resenc:M:2d"):
        costs = report["costs"][spec]
        assert costs["parameters"] > 0 and costs["time_per_epoch_s"] > 0 and costs["inference_s_per_case"] > 0
        assert costs["epochs_per_fold"] == [2]
    assert report["costs"]["mednext:S:k3:2d"]["folds_trained_in_this_comparison"] == []  # the ordinary training
    assert report["costs"]["nnunet-resenc:M:2d"]["folds_trained_in_this_comparison"] == [0]
    assert report["costs"]["nnunet:2d"]["peak_memory_mb"] > 0
    text = (out / "compare.md").read_text()
    assert "MedNeXt-S k3 2d against nnU-Net 2d (Dice): " in text and "## Cost" in text
    assert "nnU-Net ResEnc M 2d against nnU-Net 2d (NSD): " in text
    for name in ("paired_dice.png", "paired_nsd.png", "cost_vs_dice.png"):
        assert (out / name).stat().st_size > 1000

    # the per-case scores are those of the saved predictions, and the report is recomputed from them alone
    from mednext.pipeline.evaluate import LabelSet, evaluate_case

    pre = workdir / "nnUNet_preprocessed" / "Dataset972_Versus"
    case = sorted(report["cases"])[0]
    again = evaluate_case(out / "predictions" / "nnunet_2d" / f"{case}.png", pre / "gt_segmentations" / f"{case}.png",
                          LabelSet.from_dataset_json(pre / "dataset.json"))  # fmt: skip
    assert report["cases"][case]["nnunet:2d"]["ball"]["dice"] == pytest.approx(again.metrics["ball"]["dice"])
    saved = (out / "compare.json").read_bytes()
    (out / "compare.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "mednext", "compare", "972", *work, "--out", str(out),
                           "--report-only"], capture_output=True, text=True, encoding="utf-8", errors="replace")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "compare.json").read_bytes() == saved

    # a different budget in the same folder is refused rather than mixed in
    assert main(["compare", "972", *work, "--out", str(out), *MODELS, "--folds", "0", "--epochs", "3"]) == 2
