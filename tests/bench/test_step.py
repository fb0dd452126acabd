"""The benchmark runs all variants on the same weights and refuses to time diverging models."""

import sys

import pytest
import torch

from mednext.bench.step import build_variants, check_parity, write_markdown
from mednext.cli import main
from mednext.errors import UserError


@pytest.fixture()
def without_monai(monkeypatch):
    """Imports of MONAI fail, as where the `bench` extra is not installed."""
    for name in ("monai", "monai.networks.nets.mednext"):
        monkeypatch.setitem(sys.modules, name, None)


def monai_version() -> str:
    """The installed MONAI's version, which the tables name (the test extra allows any MONAI >= 1.4)."""
    return pytest.importorskip("monai").__version__


def test_missing_monai_names_the_extra(without_monai, capsys):
    rc = main(["benchmark", "--dims", "2", "--patch", "32", "--repeats", "1", "--no-memory"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mednext benchmark: error:" in err and 'pip install "mednext[bench]"' in err
    assert "Traceback" not in err
    with pytest.raises(UserError, match=r"mednext\[bench\]"):
        build_variants("S", 3, 2, 1, 3)


def test_variants_share_weights_and_outputs():
    models = build_variants("S", 3, 2, 1, 3)
    x = torch.randn(1, 1, 32, 32)
    diffs = check_parity(models, x)
    assert set(diffs) == {"monai", "monai_cl", "ours_plain", "ours", "monai_kept", "ours_kept"}
    assert all(v < 1e-5 for v in diffs.values())
    assert not models["ours_plain"].fast_path
    assert not models["ours"].fast_path  # "ours" is the user's default, and 2D networks default to plain
    assert build_variants("S", 3, 3, 1, 3)["ours"].fast_path  # 3D networks default to the fast path


@pytest.mark.slow
def test_benchmark_command_writes_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    rc = main(["benchmark", "--dims", "2", "--patch", "32", "--batch", "1", "--repeats", "1", "--no-memory",
               "--in-process", "--write", str(out)])  # fmt: skip
    assert rc == 0
    text = out.read_text()
    assert "(all in one process)" in text and "--in-process" in text
    assert "MedNeXt-S k3 2D, patch 32x32, batch 1" in text
    assert text.count("| mednext (default) |") == 1 and f"| MONAI {monai_version()} as shipped | " in text


def test_write_markdown_appends(tmp_path):
    from mednext.bench.step import BenchmarkResult

    r = BenchmarkResult("S", 3, 3, (8, 8, 8), 1, "cpu", 1, 1, {"monai": 0.0, "monai_cl": 0.0})
    r.train_s = {"monai": [2.0], "monai_cl": [1.0]}
    r.infer_s = {"monai": [1.0], "monai_cl": [0.5]}
    path = tmp_path / "b.md"
    write_markdown(path, r, "test machine", "cmd")
    write_markdown(path, r, "test machine", "cmd")
    text = path.read_text()
    assert text.count("## MedNeXt-S k3 3D") == 2
    assert f"| MONAI {monai_version()}, channels_last_3d | 1.000 | 0.50 | 1.00 | 0.500 | 0.50 |" in text


def test_unknown_variant_is_refused():
    from mednext.bench.step import run_benchmark

    with pytest.raises(ValueError, match="unknown benchmark variant"):
        run_benchmark(variants=("monai", "monai_cl", "ours_fast"))


@pytest.mark.slow
def test_kept_memory_variants_are_timed_and_labelled(tmp_path):
    from mednext.bench.step import machine_description, run_benchmark

    result = run_benchmark(
        "S", 3, 3, (32, 32, 32), 1, repeats=1, warmup=0, threads=1, memory=False,
        variants=("monai", "monai_cl", "ours_kept"), log=lambda s: None,
    )  # fmt: skip
    assert result.fresh_processes  # the CPU default: each round of each variant in a new process
    assert set(result.train_s) == {"monai", "monai_cl", "ours_kept"}
    assert all(len(v) == 1 and v[0] > 0 for v in [*result.train_s.values(), *result.infer_s.values()])
    assert result.parity["ours_kept"] < 1e-5  # our network (a copy of "ours"), parity checked in this process
    path = tmp_path / "b.md"
    write_markdown(path, result, machine_description(), "cmd")
    text = path.read_text()
    assert "| mednext (default), freed memory kept (as mednext train on the CPU) |" in text
    assert "(each round of each variant in a fresh process)" in text
