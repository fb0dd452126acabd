"""ONNX (run in onnxruntime) and TorchScript exports, 2D and 3D, with dynamic batch and spatial axes."""

from __future__ import annotations

import json

import pytest
import torch

from mednext.cli import main
from mednext.nn import MedNeXt
from mednext.nn.export import export_model, run_exported
from mednext.nn.weights.checkpoint import save_checkpoint

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = {
    # 2D: three stages (total stride 8), GRN and deep supervision heads (unused in the export)
    "2d": (
        {"spatial_dims": 2, "width": 8, "strides": (2, 2, 2), "grn": True, "deep_supervision": True},
        [(1, 2, 32, 32), (3, 2, 48, 24)],
    ),
    # 3D: anisotropic first stride (total stride (4, 8, 8)) and a 5x5x5 kernel in the middle
    "3d": (
        {
            "spatial_dims": 3,
            "width": 4,
            "strides": [(1, 2, 2), (2, 2, 2), (2, 2, 2)],
            "kernel_sizes": [3, 3, 3, 5, 3, 3, 3],
        },
        [(1, 2, 8, 16, 16), (2, 2, 12, 24, 8)],
    ),
}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_pytorch_at_two_sizes(tmp_path, name, fmt):
    torch.manual_seed(0)
    kwargs, shapes = MODELS[name]
    model = MedNeXt(2, 3, **kwargs)
    with torch.no_grad():
        for p in model.parameters():  # GRN and norm parameters away from their identity values
            p.add_(torch.randn_like(p) * 0.1)
    model.train()  # the export switches to eval mode and restores the mode afterwards
    path = export_model(model, tmp_path / f"model.{fmt}", fmt)
    assert model.training
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically, no temp file left
    model.eval()
    for shape in shapes:  # the second shape differs from the traced one in batch and every spatial axis
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x)
        got = run_exported(path, fmt, x)
        assert got.shape == expected.shape == (shape[0], 3, *shape[2:])
        assert relative_error(got, expected) < 1e-4


def test_config_travels_with_the_files(tmp_path):
    import onnx

    model = MedNeXt(1, 2, spatial_dims=2, width=4, strides=(2, 2))
    onnx_path = export_model(model, tmp_path / "m.onnx", "onnx")
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["mednext_config"]) == model.config
    assert json.loads(props["total_stride"]) == [4, 4]
    ts_path = export_model(model, tmp_path / "m.pt", "torchscript")
    extra = {"mednext_config.json": ""}
    torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["mednext_config.json"]) == model.config
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, tmp_path / "m.tflite", "tflite")


@pytest.mark.slow
def test_cli_exports_and_verifies(tmp_path, capsys):
    torch.manual_seed(1)
    # one input channel, the common CT case (a channel axis of size 1 is also "channels-last")
    model = MedNeXt(1, 2, spatial_dims=3, width=4, strides=(2, 2), deep_supervision=True)
    ckpt = save_checkpoint(model, tmp_path / "model.safetensors")
    for fmt, out in (("onnx", tmp_path / "model.onnx"), ("torchscript", tmp_path / "model.pt")):
        assert main(["export", str(ckpt), "--format", fmt, "-o", str(out)]) == 0
        assert out.exists()
    text = capsys.readouterr().out
    assert text.count("max difference to PyTorch") == 4
    x = torch.randn(2, 1, 12, 8, 16)
    with torch.no_grad():
        expected = model.eval()(x)
    assert relative_error(run_exported(tmp_path / "model.pt", "torchscript", x), expected) < 1e-4
    assert main(["export", str(ckpt), "--format", "onnx", "-o", str(tmp_path / "model.onnx")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.safetensors"), "--format", "onnx", "-o", "x.onnx"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
