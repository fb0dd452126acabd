"""Weights files cannot make mednext allocate what their tensors do not hold, nor run pickled code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mednext.errors import CheckpointError, UnsafeCheckpointError
from mednext.nn import create_mednext, load_pretrained, safe_torch_load, save_checkpoint


def _tiny_file_claiming_a_huge_network(path: Path, **config_changes) -> Path:
    model = create_mednext("S", 1, 2, spatial_dims=3, width=4)
    config = {**model.config, **config_changes}
    metadata = {"format": "mednext", "format_version": "1", "config": json.dumps(config), "preset": "",
                "versions": "{}", "meta": "{}"}  # fmt: skip
    save_file({"stem.weight": torch.zeros(4, 1, 1, 1, 1)}, str(path), metadata=metadata)
    return path


def _peak_rss_mb(code: str) -> tuple[int, str, float]:
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import resource
        print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300
    )
    peak = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_MB")]
    return proc.returncode, proc.stdout + proc.stderr, peak[0] if peak else float("nan")


_COMMANDS = """
import torch
from mednext.cli import main
codes = [main(["export", {path!r}, "--format", "onnx", "-o", {onnx!r}]),
         main(["upkern", {path!r}, {k5!r}, "--kernel", "5"])]
print("CODES", codes)
from mednext.nn import load_pretrained
try:
    load_pretrained({path!r})
except ValueError as err:
    print("REFUSED", err)
"""


@pytest.mark.parametrize("changes", [{"width": 4096}, {"block_counts": [4000] * 9}])
def test_config_is_checked_against_the_tensors_before_building(tmp_path: Path, changes) -> None:
    path = _tiny_file_claiming_a_huge_network(tmp_path / "tiny.safetensors", **changes)
    assert path.stat().st_size < 4096
    # the same commands on a genuine small checkpoint: what the process needs anyway (torch, onnx, ...)
    genuine = save_checkpoint(create_mednext("S", 1, 2, spatial_dims=3, width=4), tmp_path / "ok.safetensors")
    code, out, control = _peak_rss_mb(
        _COMMANDS.format(path=str(genuine), onnx=str(tmp_path / "ok.onnx"), k5=str(tmp_path / "ok_k5.safetensors"))
    )
    assert code == 0 and "CODES [0, 0]" in out, out
    code, out, peak = _peak_rss_mb(
        _COMMANDS.format(path=str(path), onnx=str(tmp_path / "m.onnx"), k5=str(tmp_path / "k5.safetensors"))
    )
    assert code == 0, out
    assert "CODES [2, 2]" in out and "REFUSED" in out and "tiny.safetensors" in out
    assert out.count("mednext export: error") == 1 and out.count("mednext upkern: error") == 1
    # building the claimed network would take tens of GB; refusing it costs what the control costs
    assert peak < control + 300, f"{peak:.0f} MB resident against {control:.0f} MB for a genuine checkpoint"
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "k5.safetensors").exists()


def test_a_genuine_checkpoint_still_loads(tmp_path: Path) -> None:
    model = create_mednext("S", 2, 3, spatial_dims=2, width=8)
    save_checkpoint(model, tmp_path / "ok.safetensors")
    loaded = load_pretrained(tmp_path / "ok.safetensors")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_pipeline_checkpoint_whose_arch_kwargs_claim_more_is_refused(tmp_path: Path) -> None:
    model = create_mednext("S", 1, 2, spatial_dims=3, width=4)
    arch = {k: v for k, v in model.config.items() if k not in ("in_channels", "num_classes")}
    checkpoint = {"network_weights": model.state_dict(), "mednext": {"architecture": {"arch_kwargs": {**arch,
                  "block_counts": [500] * 9}}}}  # fmt: skip
    torch.save(checkpoint, tmp_path / "checkpoint_final.pth")
    with pytest.raises(ValueError, match="checkpoint_final.pth"):
        load_pretrained(tmp_path / "checkpoint_final.pth")


def test_object_arrays_in_a_pickle_are_called_unsafe_not_corrupt(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "extra": np.array([{"a": 1}], dtype=object)}, tmp_path / "obj.pth")
    with pytest.raises(UnsafeCheckpointError, match="obj.pth"):
        safe_torch_load(tmp_path / "obj.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "cut.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        safe_torch_load(tmp_path / "cut.pth")
