"""UpKern: reference semantics, 2D/3D, any odd kernel sizes, sources in every layout, errors, CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mednext import upkern
from mednext.cli import main
from mednext.errors import ShapeMismatchError
from mednext.nn import MedNeXt, create_mednext
from mednext.nn.weights.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def small(kernel: int, dims: int = 3, **kwargs) -> MedNeXt:
    args = {"spatial_dims": dims, "width": 4, "strides": (2, 2), "expansion_ratios": [2, 3, 4, 3, 2]}
    return MedNeXt(1, 2, kernel_sizes=kernel, **(args | kwargs))


def test_b_k3_to_k5_report_and_values():
    torch.manual_seed(0)
    source = create_mednext("B", 1, 4, kernel_size=3, deep_supervision=True)
    target = create_mednext("B", 1, 4, kernel_size=5, deep_supervision=True)
    report = upkern(target, source)
    sd_src, sd_dst = source.state_dict(), target.state_dict()
    depthwise = [k for k in sd_dst if k.endswith("conv1.weight")]
    assert len(depthwise) == 9 * 2 + 4 + 4  # 18 blocks in the nine positions, 4 down, 4 up
    assert [k for k, _, _ in report.interpolated] == depthwise
    assert ("enc_block_0.0.conv1.weight", (32, 1, 3, 3, 3), (32, 1, 5, 5, 5)) in report.interpolated
    assert len(report.copied) == len(sd_dst) - len(depthwise)
    assert report.missing == [] and report.ignored == []
    assert all(torch.equal(sd_dst[k], sd_src[k]) for k in report.copied)
    # the interpolated kernel is trilinear resizing with align_corners=False, computed independently
    w = sd_src["up_2.conv1.weight"]
    expected = F.interpolate(w, size=(5, 5, 5), mode="trilinear", align_corners=False)
    assert torch.allclose(sd_dst["up_2.conv1.weight"], expected, atol=0, rtol=0)
    # a constant kernel stays constant (align_corners=False keeps the borders)
    flat = small(3)
    with torch.no_grad():
        flat.enc_block_0[0].conv1.weight.fill_(0.25)
    grown = small(5)
    upkern(grown, flat)
    assert torch.allclose(grown.enc_block_0[0].conv1.weight, torch.full((4, 1, 5, 5, 5), 0.25))


@pytest.mark.parametrize(("dims", "old", "new"), [(2, 3, 5), (2, 3, 7), (3, 5, 7), (3, 3, 7)])
def test_any_odd_kernel_sizes(dims, old, new):
    torch.manual_seed(1)
    source, target = small(old, dims), small(new, dims)
    report = upkern(target, source)
    mode = "bilinear" if dims == 2 else "trilinear"
    assert all(dst == (s[0], 1, *[new] * dims) for _, s, dst in report.interpolated)
    src = source.down_1.conv1.weight
    expected = F.interpolate(src, size=(new,) * dims, mode=mode, align_corners=False)
    assert torch.equal(target.down_1.conv1.weight.detach(), expected.detach())
    x = torch.randn(1, 1, *[16] * dims)
    assert torch.isfinite(target(x)).all()


def test_sources_in_every_layout(tmp_path):
    torch.manual_seed(2)
    source = small(3, grn=True, deep_supervision=False)
    ref_file = tmp_path / "model_best.model"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, ref_file)
    own_file = save_checkpoint(source, tmp_path / "k3.safetensors")
    expected = small(5, grn=True, deep_supervision=True)
    upkern(expected, source)
    for src in (source.state_dict(), ref_file, own_file):
        target = small(5, grn=True, deep_supervision=True)
        report = upkern(target, src)
        # the target's deep-supervision heads are not in the source: left as initialised, reported
        assert report.missing == [f"out_{i}.conv_out.{p}" for i in (1, 2) for p in ("weight", "bias")]
        got = target.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items() if not k.startswith("out_"))


def test_monai_source():
    monai_nets = pytest.importorskip("monai.networks.nets.mednext")
    theirs = monai_nets.MedNeXt(spatial_dims=2, init_filters=4, kernel_size=3, use_residual_connection=True,
                                blocks_down=(1, 1), blocks_up=(1, 1), blocks_bottleneck=1)  # fmt: skip
    target = MedNeXt(1, 2, spatial_dims=2, width=4, strides=(2, 2), block_counts=1, kernel_sizes=5,
                     down_expansion_ratios=[2, 2])  # fmt: skip
    report = upkern(target, theirs.state_dict())
    assert len(report.interpolated) == 5 + 2 + 2 and report.missing == []
    w = F.interpolate(theirs.up_blocks[0].conv1.weight, size=(5, 5), mode="bilinear", align_corners=False)
    assert torch.equal(target.up_1.conv1.weight.detach(), w.detach())


def test_errors_when_source_and_target_cannot_correspond():
    with pytest.raises(ValueError, match="2D MedNeXt but the target is 3D"):
        upkern(small(5, 3), small(3, 2))
    with pytest.raises(ShapeMismatchError, match=r"'stem.weight' has shape \(4, 1, 1, 1, 1\).*\(8, 1, 1, 1, 1\)"):
        upkern(small(5, width=8), small(3))
    with pytest.raises(
        ShapeMismatchError, match=r"'down_0.conv2.weight' has shape \(12, 4, 1, 1, 1\).*\(16, 4, 1, 1, 1\)"
    ):
        upkern(small(5, expansion_ratios=[2, 4, 4, 3, 2]), small(3))


@pytest.mark.slow
def test_cli_writes_a_k5_checkpoint(tmp_path, capsys):
    torch.manual_seed(3)
    source = create_mednext("S", 1, 3, kernel_size=3, spatial_dims=2)
    src = save_checkpoint(source, tmp_path / "s_k3.safetensors")
    dst = tmp_path / "s_k5.safetensors"
    assert main(["upkern", str(src), str(dst), "--kernel", "5"]) == 0
    out = capsys.readouterr().out
    assert "26 interpolated" in out and "kernel 5" in out
    model, info = load_checkpoint(dst)
    assert model.config["kernel_sizes"] == [[5, 5]] * 9
    assert info["preset"] == "S"
    assert info["meta"]["upkern"]["interpolated"] == 26 and info["meta"]["upkern"]["source_kernel_sizes"] == [3]
    assert torch.equal(model.stem.weight, source.stem.weight)
    # an existing output is not replaced without --overwrite; a bad kernel is refused
    assert main(["upkern", str(src), str(dst), "--kernel", "5"]) == 2
    assert main(["upkern", str(src), str(tmp_path / "x.safetensors"), "--kernel", "4"]) == 2
    assert "must be odd" in capsys.readouterr().err
