"""Case and dataset names never lead a write (or a model load) outside the working and output folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic_data import make_dataset
from test_predict import blob_image, make_results_folder, write_image

from mednext.cli import main


def files_under(root: Path) -> set[Path]:
    """Every file below ``root`` (links included), as paths relative to it."""
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize(
    "bad_id",
    ["../../../../outside/evil", "/abs/evil", "sub/case", "..", "ca\x00se", "ca\nse", "back\\slash"],
)
def test_case_ids_with_path_parts_are_refused_at_plan(tmp_path: Path, capsys, bad_id: str) -> None:
    src = make_dataset(tmp_path / "deep" / "er" / "src", 960, "Trav", spatial_dims=3, num_cases=3, shape=(8, 16, 16))
    meta = json.loads((src / "dataset.json").read_text())
    meta["dataset"] = {
        (bad_id if i == 1 else f"case_{i:03d}"): {
            "images": [f"imagesTr/case_{i:03d}_0000.nii.gz"],
            "label": f"labelsTr/case_{i:03d}.nii.gz",
        }
        for i in range(3)
    }
    (src / "dataset.json").write_text(json.dumps(meta))
    before = files_under(tmp_path)
    capsys.readouterr()
    assert main(["plan", str(src), "--workdir", str(tmp_path / "work"), "--num-processes", "1"]) == 2
    err = capsys.readouterr().err
    assert "case identifier" in err and repr(bad_id) in err and "dataset.json" in err
    written = files_under(tmp_path) - before
    assert all(str(p).startswith("work") for p in written), written
    assert not (tmp_path / "work" / "nnUNet_preprocessed" / "Dataset960_Trav").exists()


@pytest.mark.parametrize(
    "spec", ["../elsewhere/Dataset961_Out", "Dataset961_Out/../../../elsewhere", "/abs/Dataset961"]
)
def test_predict_dataset_must_be_a_name_not_a_path(tmp_path: Path, capsys, spec: str) -> None:
    work = tmp_path / "work"
    # a results folder that the path would reach from inside the results folder
    make_results_folder(tmp_path / "elsewhere", "Dataset961_Out")
    make_results_folder(work / "nnUNet_results", "Dataset961_Out")
    image = tmp_path / "x.nii.gz"
    write_image(image, blob_image((8, 16, 16)), (1, 1, 2))
    capsys.readouterr()
    code = main(["predict", "-i", str(image), "-o", str(tmp_path / "out"), "--workdir", str(work), "--dataset", spec])
    assert code == 2
    err = capsys.readouterr().err
    assert "Dataset901_Name" in err and spec in err
    assert not (tmp_path / "out").exists()
