"""`mednext predict` on a cohort: overlap of the stages, parts, --continue-prediction, progress."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")

from test_predict import blob_image, make_results_folder, results_root, write_image  # noqa: E402

from mednext.cli import main  # noqa: E402
from mednext.pipeline import cohort  # noqa: E402
from mednext.pipeline.io import InputCase  # noqa: E402
from mednext.pipeline.predictor import MedNeXtPredictor, predict  # noqa: E402

DATASET = "Dataset971_Cohort"


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(1)
    work = tmp_path / "work"
    make_results_folder(results_root(work), DATASET, folds={0: {"final": 3}, 1: {"final": 4}})
    return work


def _cohort(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        shape = (9 + i % 3, 18 + i, 20 + 2 * (i % 2))
        write_image(folder / f"case{i:02d}_0000.nii.gz", blob_image(shape, seed=i), (1.0, 1.1, 2.0))
        names.append(f"case{i:02d}")
    return names


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("case*.nii.gz"))}


def _predict(workdir, inp, out, lines=None, **kwargs):
    log = lines.append if lines is not None else (lambda _: None)
    kwargs.setdefault("tta", False)
    return predict(inp, out, DATASET, workdir=workdir, device="cpu", log=log, **kwargs)


def test_overlapped_stages_give_the_sequential_result(workdir, tmp_path):
    inp = tmp_path / "in"
    names = _cohort(inp, 5)
    lines: list[str] = []
    written = _predict(workdir, inp, tmp_path / "overlap", lines, overlap=True, save_probabilities=True)
    _predict(workdir, inp, tmp_path / "sequential", overlap=False, save_probabilities=True)
    assert [p.name for p in written] == [f"{n}.nii.gz" for n in names]  # in case order
    overlapped, sequential = _arrays(tmp_path / "overlap"), _arrays(tmp_path / "sequential")
    assert overlapped.keys() == sequential.keys() == {f"{n}.nii.gz" for n in names}
    for name in overlapped:
        np.testing.assert_array_equal(overlapped[name], sequential[name])
        assert len(np.unique(overlapped[name])) > 1  # a segmentation, not an empty map
    for n in names:
        a = np.load(tmp_path / "overlap" / f"{n}.npz")["probabilities"]
        b = np.load(tmp_path / "sequential" / f"{n}.npz")["probabilities"]
        np.testing.assert_array_equal(a, b)
    progress = [line for line in lines if line.lstrip().startswith("[")]
    assert [line.split("]")[0].strip() for line in progress] == [f"[{i}/5" for i in range(1, 6)]
    assert all("left" in line for line in progress[:-1]) and "left" not in progress[-1]
    record = json.loads((tmp_path / "overlap" / "mednext_predict.json").read_text())
    assert record["finished"] is True and sorted(record["cases"]) == names and record["folds"] == [0, 1]
    assert not [p for p in (tmp_path / "overlap").iterdir() if p.name.startswith(".")]


def test_parts_together_segment_every_case_once(workdir, tmp_path, capsys):
    inp = tmp_path / "in"
    names = _cohort(inp, 7)
    out = tmp_path / "out"
    seen = []
    for part in range(3):
        written = _predict(workdir, inp, out, num_parts=3, part_id=part)
        seen += [p.name for p in written]
        record = json.loads((out / f"mednext_predict.part-{part}-of-3.json").read_text())
        assert sorted(record["cases"]) == sorted(names)[part::3]
    assert sorted(seen) == [f"{n}.nii.gz" for n in names]
    whole = tmp_path / "whole"
    _predict(workdir, inp, whole)
    for name, array in _arrays(whole).items():
        np.testing.assert_array_equal(_arrays(out)[name], array)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # part locks and workspaces gone

    base = ["predict", "-i", str(inp), "-o", str(out), "--workdir", str(workdir), "-d", DATASET, "--device", "cpu"]
    assert main([*base, "--num-parts", "3", "--part-id", "3"]) == 2
    assert "--part-id 3 must be between 0 and 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "-num_parts", "0"])
    with pytest.raises(ValueError, match="--part-id"):
        cohort.select_part([], 2, -1)


def test_continue_prediction_skips_finished_cases_and_refuses_other_settings(workdir, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    names = _cohort(inp, 6)
    out = tmp_path / "out"
    exported: list[str] = []
    real_export = MedNeXtPredictor.export_case

    def failing_export(self, logits, properties, output_truncated, save_probabilities):
        if len(exported) == 3:
            raise RuntimeError("power cut")
        exported.append(Path(output_truncated).name)
        return real_export(self, logits, properties, output_truncated, save_probabilities)

    monkeypatch.setattr(MedNeXtPredictor, "export_case", failing_export)
    with pytest.raises(RuntimeError, match="power cut"):
        _predict(workdir, inp, out)
    assert sorted(p.name for p in out.glob("case*")) == [f"{n}.nii.gz" for n in names[:3]]
    record = json.loads((out / "mednext_predict.json").read_text())
    assert record["finished"] is False

    monkeypatch.setattr(MedNeXtPredictor, "export_case", real_export)
    # Other settings than those that made the folder's segmentations: refused, nothing written.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ValueError, match="tta: False there, True now"):
        _predict(workdir, inp, out, continue_prediction=True, tta=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    lines: list[str] = []
    called: list[str] = []
    monkeypatch.setattr(
        MedNeXtPredictor,
        "prepare_case",
        lambda self, case, crop_body=False, _real=MedNeXtPredictor.prepare_case: (
            called.append(case.case_id) or _real(self, case, crop_body)
        ),
    )
    written = _predict(workdir, inp, out, lines, continue_prediction=True)
    assert called == names[3:]  # the finished cases are neither read nor segmented again
    assert [p.name for p in written] == [f"{n}.nii.gz" for n in names[3:]]
    assert any("3 already segmented" in line for line in lines)
    assert json.loads((out / "mednext_predict.json").read_text())["finished"] is True
    fresh = tmp_path / "fresh"
    _predict(workdir, inp, fresh)
    assert _arrays(out).keys() == _arrays(fresh).keys()
    for name, array in _arrays(fresh).items():
        np.testing.assert_array_equal(_arrays(out)[name], array)


def test_continue_prediction_refuses_segmentations_of_unknown_origin(workdir, tmp_path):
    inp = tmp_path / "in"
    _cohort(inp, 2)
    out = tmp_path / "out"
    out.mkdir()
    write_image(out / "case00.nii.gz", np.zeros((9, 18, 20), np.uint8), (1.0, 1.1, 2.0))
    with pytest.raises(ValueError, match="no mednext_predict.*record"):
        _predict(workdir, inp, out, continue_prediction=True)
    # A case whose input changed since (another source) is segmented again.
    case = InputCase("case00", [inp / "case00_0000.nii.gz"], source="elsewhere.nii.gz")
    settings = {"results_folder": "r", "folds": [0], "checkpoint": "c", "tta": False, "step_size": 0.5}
    (out / "mednext_predict.json").write_text(json.dumps({**settings, "crop_body": False, "cases": {"case00": "x"}}))
    assert cohort.finished_cases(out, {**settings, "crop_body": False}, [case], ".nii.gz", False) == set()


def test_window_progress_reaches_the_log_for_long_cases(workdir, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    inp.mkdir()
    write_image(inp / "long_0000.nii.gz", blob_image((20, 40, 40), seed=9), (1.0, 1.0, 2.0))
    monkeypatch.setattr(cohort, "WINDOW_LOG_INTERVAL_S", 0.0)
    lines: list[str] = []
    calls: list[tuple[int, int, int, int]] = []
    real = cohort.Progress.windows

    def recording(self, done, total, fold=0, folds=1):
        calls.append((done, total, fold, folds))
        return real(self, done, total, fold, folds)

    monkeypatch.setattr(cohort.Progress, "windows", recording)
    _predict(workdir, inp, tmp_path / "out", lines, tile_batch=1)
    totals = {t for _, t, _, _ in calls}
    assert len(totals) == 1 and totals.pop() > 8  # several windows per case
    assert [(d, f) for d, _, f, _ in calls] == [(d, f) for f in (0, 1) for d in range(1, len(calls) // 2 + 1)]
    assert any("long: window batch" in line and "of fold 2/2" in line for line in lines)


def test_progress_bar_on_a_terminal(workdir, tmp_path, capsys):
    inp = tmp_path / "in"
    _cohort(inp, 3)
    predict(inp, tmp_path / "out", DATASET, workdir=workdir, device="cpu", tta=False, progress_bar=True)
    captured = capsys.readouterr()
    assert "3/3" in captured.err and "case" in captured.err  # tqdm's bar, on standard error
    assert "[3/3] case02" in captured.out


def test_nnunet_spellings_of_the_predict_flags(capsys):
    from mednext.cli import build_parser

    args = build_parser().parse_args(
        ["predict", "-i", "in", "-o", "out", "-d", "901", "-c", "2d", "-f", "0", "1", "-tr", "MedNeXtTrainer_Bk5",
         "-p", "MedNeXtPlans", "-chk", "checkpoint_best.pth", "-device", "cpu", "--disable_tta", "-step_size", "0.75",
         "--save_probabilities", "--continue_prediction", "-num_parts", "4", "-part_id", "3", "--disable_progress_bar"]
    )  # fmt: skip
    assert (args.dataset, args.config, args.fold, args.trainer, args.plans) == (
        "901", "2d", [0, 1], "MedNeXtTrainer_Bk5", "MedNeXtPlans"
    )  # fmt: skip
    assert (args.checkpoint, args.device, args.no_tta, args.step) == ("best", "cpu", True, 0.75)
    assert args.save_probabilities and args.continue_prediction and args.no_progress_bar
    assert (args.num_parts, args.part_id) == (4, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "-i", "x", "-o", "y", "-d", "1", "-chk", "checkpoint_other.pth"])
    base = ["predict", "-i", "in", "-o", "out", "-d", "901"]
    assert main([*base, "-tr", "MedNeXtTrainer_Bk5", "--kernel", "3"]) == 2
    assert "-tr MedNeXtTrainer_Bk5 means --kernel 5" in capsys.readouterr().err
    assert main([*base, "-tr", "nnUNetTrainer"]) == 2
    assert "nnUNetv2_predict" in capsys.readouterr().err
