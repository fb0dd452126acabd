"""`mednext compare`'s model specs, budget and verdict in words (no training)."""

from __future__ import annotations

import sys

import pytest

from mednext.cli import main
from mednext.errors import UserError
from mednext.pipeline.compare import Budget, parse_model_spec, resolve_models
from mednext.pipeline.compare_report import markdown, verdict_sentence


def test_specs_name_the_engines_trainers_and_plans() -> None:
    s = parse_model_spec("mednext:S:k3")
    assert (s.text, s.trainer, s.plans, s.configuration) == (
        "mednext:S:k3:3d_fullres", "MedNeXtTrainer_Sk3", "MedNeXtPlans", "3d_fullres",
    )  # fmt: skip
    assert parse_model_spec("mednext:b:K5:2d").results_name() == "MedNeXtTrainer_Bk5__MedNeXtPlans__2d"
    assert parse_model_spec("mednext:v2-base:k3", "2d").trainer == "MedNeXtTrainer_V2Basek3"
    n = parse_model_spec("nnunet:3d_fullres")
    assert (n.trainer, n.plans, n.configuration, n.label) == (
        "nnUNetTrainer_budget", "nnUNetPlans", "3d_fullres", "nnU-Net 3d_fullres",
    )  # fmt: skip
    r = parse_model_spec("nnunet-resenc:M", "2d")
    assert (r.text, r.plans, r.configuration) == ("nnunet-resenc:M:2d", "nnUNetResEncUNetMPlans", "2d")
    assert parse_model_spec("nnunet-resenc:xl:3d_fullres").plans == "nnUNetResEncUNetXLPlans"
    assert parse_model_spec("mednext:S:k3:2d").slug == "mednext_S_k3_2d"


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("unet:3d", "unknown kind"),
        ("mednext:S", "needs a preset and a kernel"),
        ("mednext:X:k3", "preset 'X'"),
        ("mednext:S:k4", "odd number"),
        ("mednext:S:3", "odd number"),
        ("mednext:v2-wide:k5", "kernel 3 only"),
        ("mednext:S:k3:3d_lowres", "configuration '3d_lowres'"),
        ("nnunet", "configuration only"),
        ("nnunet:3d_cascade_fullres", "configuration"),
        ("nnunet-resenc:S", "one of M, L, XL"),
        ("nnunet-resenc:M:2d:x", "too many"),
    ],
)
def test_bad_specs_name_the_spec_and_the_forms(spec: str, why: str) -> None:
    with pytest.raises(UserError, match=why) as err:
        parse_model_spec(spec)
    assert repr(spec) in str(err.value) and "nnunet:<2d|3d_fullres>" in str(err.value)


def test_baseline_defaults_to_nnunets_default_unet() -> None:
    specs, baseline = resolve_models(["mednext:S:k3", "nnunet-resenc:M", "nnunet:3d_fullres"], "3d_fullres", None)
    assert baseline.text == "nnunet:3d_fullres" and len(specs) == 3
    assert resolve_models(["mednext:S:k3", "mednext:B:k5"], "2d", None)[1].text == "mednext:B:k5:2d"
    assert resolve_models(["mednext:S:k3", "nnunet:2d"], "2d", "mednext:S:k3")[1].text == "mednext:S:k3:2d"
    with pytest.raises(UserError, match="twice"):
        resolve_models(["mednext:S:k3", "mednext:S:k3:3d_fullres"], "3d_fullres", None)
    with pytest.raises(UserError, match="at least two"):
        resolve_models(["mednext:S:k3"], "3d_fullres", None)
    with pytest.raises(UserError, match="--baseline"):
        resolve_models(["mednext:S:k3", "nnunet:2d"], "2d", "nnunet:3d_fullres")


def test_budget_is_epochs_or_hours() -> None:
    assert Budget(epochs=50).describe() == "50 epochs per model and fold"
    assert Budget(hours=2, iters_per_epoch=100).describe() == "2 h of training of 100 iterations per model and fold"
    for kwargs, match in (({}, "one of them"), ({"epochs": 5, "hours": 1.0}, "one of them"),
                          ({"epochs": 0}, "--epochs"), ({"hours": -1.0}, "--hours"),
                          ({"epochs": 5, "iters_per_epoch": 0}, "--iters-per-epoch")):  # fmt: skip
        with pytest.raises(UserError, match=match):
            Budget(**kwargs)


def test_command_line_errors_are_clear(tmp_path, capsys) -> None:
    work = ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    assert main(["compare", "901", *work, "--models", "mednext:S:k3", "nnunet:3d_fullres"]) == 2
    assert "--epochs N or as --hours H" in capsys.readouterr().err
    assert main(["compare", "901", *work, "--models", "mednext:S:k3", "nnunet:2.5d", "--epochs", "1"]) == 2
    assert "'nnunet:2.5d'" in capsys.readouterr().err
    assert main(["compare", "901", *work, "--report-only"]) == 2
    assert "no comparison" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "901", *work, "--epochs", "1", "--hours", "1"])


def _report() -> dict:
    row = {"model": "mednext:S:k3:3d_fullres", "baseline": "nnunet:3d_fullres", "metric": "dice", "n": 20,
           "mean_a": 0.9, "mean_b": 0.879, "wins": 15, "ties": 2, "losses": 3}  # fmt: skip
    return {
        "dataset": "Dataset901_X",
        "folds": [0, 1, 2, 3, 4],
        "budget": {"epochs": 50, "hours": None},
        "models": [
            {"spec": "mednext:S:k3:3d_fullres", "label": "MedNeXt-S k3 3d_fullres"},
            {"spec": "nnunet:3d_fullres", "label": "nnU-Net 3d_fullres"},
        ],
        "baseline": "nnunet:3d_fullres",
        "classes": ["liver", "spleen"],
        "case_source": "out-of-fold validation cases",
        "cases": {},
        "means": {
            s: {
                m: {c: {"mean": 0.9, "sd": 0.01, "n": 20} for c in ("liver", "spleen", "mean over classes")}
                for m in ("dice", "nsd")
            }
            for s in ("mednext:S:k3:3d_fullres", "nnunet:3d_fullres")
        },  # fmt: skip
        "comparisons": [
            {
                **row,
                "class": "liver",
                "mean_difference": 0.021,
                "ci_low": 0.008,
                "ci_high": 0.034,
                "p_value": 0.004,
                "verdict": "better",
            },
            {
                **row,
                "class": "spleen",
                "mean_difference": 0.003,
                "ci_low": -0.01,
                "ci_high": 0.012,
                "p_value": 0.41,
                "verdict": "not distinguishable",
            },
        ],  # fmt: skip
        "costs": {
            s: {
                "parameters": 5_600_000,
                "epochs_per_fold": [50] * 5,
                "time_per_epoch_s": 100.0,
                "train_s_per_fold": 5000.0,
                "peak_memory_mb": 9000.0,
                "peak_memory_kind": "ru_maxrss",
                "inference_s_per_case": 3.0,
                "device": ["cuda"],
            }
            for s in ("mednext:S:k3:3d_fullres", "nnunet:3d_fullres")
        },  # fmt: skip
        "statistics": {"nsd_tolerance_mm": 2.0},
    }


def test_the_verdict_reads_like_a_paper() -> None:
    sentence = verdict_sentence(_report(), "mednext:S:k3:3d_fullres")
    assert sentence == (
        "MedNeXt-S k3 3d_fullres against nnU-Net 3d_fullres (Dice): better on liver (+2.1 Dice, 95% CI 0.8 to 3.4, "
        "p=0.004, n=20); not distinguishable on spleen (+0.3 Dice, 95% CI -1.0 to 1.2, p=0.410, n=20)."
    )
    text = markdown(_report())
    assert sentence in text
    assert "| MedNeXt-S k3 3d_fullres | liver | +2.1 | 0.8 to 3.4 | 0.004 | 15/2/3 |" in text
    assert "| MedNeXt-S k3 3d_fullres | 5,600,000 | 50 | 100.00 | 1.389 | 8.79 | 3.00 |" in text


def test_trainings_of_another_budget_are_not_reused(tmp_path) -> None:
    import json
    from dataclasses import asdict

    import torch

    from mednext.pipeline.compare import BUDGET_FILE, _check_budget

    spec = parse_model_spec("mednext:S:k3")
    folder = tmp_path / "fold_0"
    folder.mkdir()
    _check_budget(folder, Budget(epochs=5), spec)  # nothing there yet
    # an ordinary training (mednext train) of 5 epochs of the recipe's 250 iterations
    torch.save({"mednext": {"num_epochs": 5, "iterations_per_epoch": 250}}, folder / "checkpoint_final.pth")
    _check_budget(folder, Budget(epochs=5), spec)
    for other in (Budget(epochs=6), Budget(epochs=5, iters_per_epoch=100), Budget(hours=1.0)):
        with pytest.raises(UserError, match="delete .*fold_0 to train it again"):
            _check_budget(folder, other, spec)
    # a comparison's training: its recorded budget decides
    (folder / BUDGET_FILE).write_text(json.dumps(asdict(Budget(hours=1.0))))
    _check_budget(folder, Budget(hours=1.0), spec)
    with pytest.raises(UserError, match="another budget"):
        _check_budget(folder, Budget(hours=2.0), spec)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_spawned_process_reports_its_own_peak_memory() -> None:
    # the training's child must not report its parent's peak (Linux keeps ru_maxrss through fork and exec)
    import multiprocessing

    import numpy as np
    import torch

    from mednext.pipeline.compare import peak_memory_mb

    held = np.ones(2**28, dtype=np.uint8)  # 256 MiB touched by this process
    mine = peak_memory_mb(torch.device("cpu"))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(peak_memory_mb, (torch.device("cpu"),))
    del held
    assert 0 < child < mine - 200
