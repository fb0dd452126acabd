"""Foreign weights: MONAI parity (both directions), reference .model files, inference, transfer, inflation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mednext import load_pretrained
from mednext.errors import CheckpointError
from mednext.nn import MedNeXt, create_mednext
from mednext.nn.weights import (
    LayoutError,
    ShapeMismatchError,
    convert_state_dict,
    infer_config,
    inflate_2d_to_3d,
    to_monai,
    to_reference_state_dict,
    transfer_weights,
)

monai_nets = pytest.importorskip("monai.networks.nets.mednext")


pytestmark = pytest.mark.usefixtures("one_thread")


# Input sizes: the 16x down-sampled bottleneck keeps at least two voxels, so its GroupNorm is not degenerate.
SIZES = {3: (32, 16, 16), 2: (32, 64)}

# Reference facts: exact 3D parameter counts, in_channels=1, 4 classes, deep supervision on.
REFERENCE_PARAMS = {
    ("S", 3): 5_554_836, ("S", 5): 5_984_468, ("B", 3): 10_530_228, ("B", 5): 10_959_860,
    ("M", 3): 17_552_884, ("M", 5): 18_264_756, ("L", 3): 61_783_188, ("L", 5): 62_996_820,
}  # fmt: skip
MONAI_PARAMS = {("B", 3): 10_514_772, ("M", 5): 18_249_300, ("L", 3): 61_730_676}
PRESET_SETTINGS = {  # exp_r and block counts for the 9 positions
    "S": ([2] * 9, [2] * 9),
    "B": ([2, 3, 4, 4, 4, 4, 4, 3, 2], [2] * 9),
    "M": ([2, 3, 4, 4, 4, 4, 4, 3, 2], [3, 4, 4, 4, 4, 4, 4, 4, 3]),
    "L": ([3, 4, 8, 8, 8, 8, 8, 4, 3], [3, 4, 8, 8, 8, 8, 8, 4, 3]),
}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def randomise_affine(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm and GRN parameters start at 1/0: make them random so a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "resp" in name or "grn" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))


def randomise_all(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def outputs(model: torch.nn.Module, x: torch.Tensor, training: bool) -> list[torch.Tensor]:
    if isinstance(model, MedNeXt) and hasattr(model, "set_fast_path"):
        # The plain path does MONAI's operations in MONAI's order; the default channels-last path
        # rounds differently (test_fast_path_matches_monai_to_float32_rounding covers it).
        model.set_fast_path(False)
    model.train(training)
    with torch.no_grad():
        y = model(x)
    return list(y) if isinstance(y, (list, tuple)) else [y]


# ----------------------------------------------------------------------------- MONAI -> mednext


@pytest.mark.slow
@pytest.mark.parametrize("deep_supervision", [False, True], ids=["ds-off", "ds-on"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("kernel", [3, 5], ids=["k3", "k5"])
@pytest.mark.parametrize("preset", ["S", "B", "M", "L"])
def test_monai_presets_load_with_identical_outputs(preset, kernel, dims, deep_supervision):
    torch.manual_seed(0)
    exp, blocks = PRESET_SETTINGS[preset]
    if preset in ("S", "B"):  # MONAI's own factory, full width
        theirs = monai_nets.create_mednext(
            preset,
            spatial_dims=dims,
            in_channels=2,
            out_channels=3,
            kernel_size=kernel,
            deep_supervision=deep_supervision,
        )
    else:  # M and L at width 8 to keep CI fast (full width: test_monai_parameter_counts_are_kept, docs/weights.md)
        theirs = monai_nets.MedNeXt(
            spatial_dims=dims, init_filters=8, in_channels=2, out_channels=3, kernel_size=kernel,
            deep_supervision=deep_supervision, use_residual_connection=True, encoder_expansion_ratio=exp[:4],
            bottleneck_expansion_ratio=exp[4], decoder_expansion_ratio=exp[5:], blocks_down=blocks[:4],
            blocks_bottleneck=blocks[4], blocks_up=blocks[5:],
        )  # fmt: skip
    randomise_affine(theirs)
    ours = load_pretrained(theirs.state_dict())

    assert ours.config["expansion_ratios"] == exp
    assert ours.config["block_counts"] == blocks
    assert ours.config["down_expansion_ratios"] == exp[:4]  # MONAI's convention, not the reference's exp[1:5]
    assert ours.config["kernel_sizes"] == [[kernel] * dims] * 9
    assert ours.config["deep_supervision"] is deep_supervision
    assert ours.load_report.layout == "monai"
    x = torch.randn(1, 2, *SIZES[dims])
    # With deep supervision, training mode returns every output (GroupNorm has no running statistics,
    # so the full-resolution one equals eval mode's); without, eval mode returns the only one.
    got, expected = outputs(ours, x, deep_supervision), outputs(theirs, x, deep_supervision)
    assert len(got) == len(expected) == (5 if deep_supervision else 1)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize(("preset", "kernel"), list(MONAI_PARAMS))
def test_monai_parameter_counts_are_kept(preset, kernel):
    theirs = monai_nets.create_mednext(preset, in_channels=1, out_channels=4, kernel_size=kernel, deep_supervision=True)
    ours = load_pretrained(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == MONAI_PARAMS[(preset, kernel)]


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_grn_loads_with_zero_down_grn(dims):
    torch.manual_seed(1)
    theirs = monai_nets.MedNeXt(
        spatial_dims=dims, init_filters=8, in_channels=2, out_channels=2, kernel_size=3, deep_supervision=True,
        use_residual_connection=True, global_resp_norm=True, encoder_expansion_ratio=[2, 3, 4, 4],
        decoder_expansion_ratio=[4, 4, 3, 2], bottleneck_expansion_ratio=4,
    )  # fmt: skip
    randomise_affine(theirs, seed=2)
    ours = load_pretrained(theirs.state_dict())
    assert ours.config["grn"] is True
    assert ours.load_report.zero_filled == [f"down_{i}.grn_{p}" for i in (1, 2, 3) for p in ("gamma", "beta")]
    assert not ours.down_2.grn_gamma.any()
    x = torch.randn(1, 2, *SIZES[dims])
    for training in (False, True):
        for a, b in zip(outputs(ours, x, training), outputs(theirs, x, training)):
            # float32 rounding: our GRN computes x * (1 + gamma * nx) + beta, MONAI's gamma * (x * nx) + beta + x
            # (the same function, tests/nn/test_v2.py; measured up to 1.03e-5 here)
            assert relative_error(a, b) < 3e-5
    # and back: the zero down-block GRN tensors are dropped again
    kwargs, sd = to_monai(ours)
    again = monai_nets.MedNeXt(**kwargs)
    again.load_state_dict(sd, strict=True)
    assert relative_error(outputs(again, x, False)[0], outputs(theirs, x, False)[0]) == 0


def test_monai_without_residuals():
    torch.manual_seed(3)
    theirs = monai_nets.MedNeXt(spatial_dims=3, init_filters=8, in_channels=2, out_channels=2, kernel_size=5)
    ours = load_pretrained(theirs.state_dict())
    assert ours.config["residual"] is False and ours.config["resample_residual"] is False
    assert ours.config["kernel_sizes"] == [[5, 5, 5]] * 9
    x = torch.randn(1, 2, 32, 16, 16)
    assert relative_error(outputs(ours, x, False)[0], outputs(theirs, x, False)[0]) < 1e-5


def test_monai_layer_norm_is_refused():
    theirs = monai_nets.MedNeXt(spatial_dims=3, init_filters=8, kernel_size=3, norm_type="layer")
    with pytest.raises(LayoutError, match=r"norm_type='layer'.*cannot be converted"):
        load_pretrained(theirs.state_dict())


# ----------------------------------------------------------------------------- mednext -> MONAI


@pytest.mark.parametrize(("preset", "dims", "kernel"), [("S", 3, 3), ("B", 2, 5), ("L", 2, 3)])
def test_mednext_with_monai_convention_exports_to_monai(preset, dims, kernel):
    exp = PRESET_SETTINGS[preset][0]
    torch.manual_seed(4)
    ours = create_mednext(
        preset, 2, 3, kernel_size=kernel, spatial_dims=dims, deep_supervision=True, down_expansion_ratios=exp[:4]
    )
    randomise_affine(ours, seed=5)
    kwargs, sd = to_monai(ours)
    theirs = monai_nets.MedNeXt(**kwargs)
    theirs.load_state_dict(sd, strict=True)
    x = torch.randn(1, 2, *SIZES[dims])
    got, expected = outputs(theirs, x, True), outputs(ours, x, True)
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected):
        assert relative_error(a, b) < 1e-5


def test_reference_convention_cannot_go_to_monai():
    with pytest.raises(ValueError, match=r"down_0 has expansion ratio 3 but enc_block_0 has 2"):
        to_monai(create_mednext("B", 1, 2, spatial_dims=2))
    grn = MedNeXt(1, 2, spatial_dims=2, width=8, strides=(2, 2), grn=True)
    with torch.no_grad():
        grn.down_1.grn_gamma.fill_(0.5)
    with pytest.raises(ValueError, match=r"down_1.grn_gamma is not zero"):
        to_monai(grn)


# ----------------------------------------------------------------------------- reference (.model) layout


def reference_state_dict(
    preset: str, kernel: int, dims: int, in_channels: int, classes: int, deep_supervision: bool, grn: bool = False
) -> dict[str, torch.Tensor]:
    """A reference-layout state dict written from the documented key names and shapes only."""
    exp, blocks = PRESET_SETTINGS[preset]
    C, k1 = 32, (1,) * dims
    kk = (kernel,) * dims
    sd: dict[str, torch.Tensor] = {"dummy_tensor": torch.ones(1), "stem.weight": torch.randn(C, in_channels, *k1)}
    sd["stem.bias"] = torch.randn(C)

    def block(prefix: str, width: int, r: int, out: int, with_grn: bool, kind: str = "") -> None:
        sd[f"{prefix}.conv1.weight"] = torch.randn(width, 1, *kk)
        sd[f"{prefix}.conv1.bias"] = torch.randn(width)
        sd[f"{prefix}.norm.weight"] = torch.randn(width)
        sd[f"{prefix}.norm.bias"] = torch.randn(width)
        sd[f"{prefix}.conv2.weight"] = torch.randn(r * width, width, *k1)
        sd[f"{prefix}.conv2.bias"] = torch.randn(r * width)
        sd[f"{prefix}.conv3.weight"] = torch.randn(out, r * width, *k1)
        sd[f"{prefix}.conv3.bias"] = torch.randn(out)
        if with_grn:
            sd[f"{prefix}.grn_gamma"] = torch.randn(1, r * width, *k1)
            sd[f"{prefix}.grn_beta"] = torch.randn(1, r * width, *k1)
        if kind == "down":
            sd[f"{prefix}.res_conv.weight"] = torch.randn(out, width, *k1)
        if kind == "up":
            sd[f"{prefix}.res_conv.weight"] = torch.randn(width, out, *k1)  # ConvTranspose: (in, out, ...)
        if kind:
            sd[f"{prefix}.res_conv.bias"] = torch.randn(out)

    for i in range(4):
        for n in range(blocks[i]):
            block(f"enc_block_{i}.{n}", C * 2**i, exp[i], C * 2**i, grn)
        block(f"down_{i}", C * 2**i, exp[i + 1], C * 2 ** (i + 1), grn and i > 0, "down")
    for n in range(blocks[4]):
        block(f"bottleneck.{n}", C * 16, exp[4], C * 16, grn)
    for i in reversed(range(4)):
        block(f"up_{i}", C * 2 ** (i + 1), exp[8 - i], C * 2**i, grn, "up")
        for n in range(blocks[8 - i]):
            block(f"dec_block_{i}.{n}", C * 2**i, exp[8 - i], C * 2**i, grn)
    for i in range(5 if deep_supervision else 1):
        sd[f"out_{i}.conv_out.weight"] = torch.randn(C * 2**i, classes, *k1)
        sd[f"out_{i}.conv_out.bias"] = torch.randn(classes)
    return sd


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("preset", ["S", "B", "M", "L"])
def test_reference_layout_loads_every_tensor(preset, kernel):
    torch.manual_seed(6)
    sd = reference_state_dict(preset, kernel, 3, 1, 4, deep_supervision=True)
    # the generator agrees with the reference's documented parameter counts
    assert sum(v.numel() for k, v in sd.items() if k != "dummy_tensor") == REFERENCE_PARAMS[(preset, kernel)]
    model = load_pretrained({"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[(preset, kernel)]
    assert model.config == create_mednext(preset, 1, 4, kernel_size=kernel, deep_supervision=True).config | {
        "grad_checkpointing": False
    }
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items() if k != "dummy_tensor")
    assert model.load_report.dropped == ["dummy_tensor"]
    assert model.load_report.stripped_prefixes == ["module."]


@pytest.mark.parametrize("dims", [2, 3])
def test_reference_model_file_with_grn_and_numpy_history(tmp_path, dims):
    torch.manual_seed(7)
    sd = reference_state_dict("S", 3, dims, 4, 2, deep_supervision=False, grn=True)
    assert "down_0.grn_gamma" not in sd and "down_1.grn_gamma" in sd
    path = tmp_path / "model_final_checkpoint.model"
    torch.save(
        {
            "epoch": 3,
            "state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "plot_stuff": ([np.float64(0.5), np.float64(0.4)], [np.float32(0.6)], [], [np.float64(0.1)]),
            "best_stuff": (2, np.float64(0.4), np.float64(0.7), np.float64(0.6)),
        },
        path,
    )
    model = load_pretrained(path)
    c = model.config
    assert (c["spatial_dims"], c["in_channels"], c["num_classes"], c["grn"]) == (dims, 4, 2, True)
    assert c["deep_supervision"] is False
    assert model.load_report.zero_filled == []
    assert torch.equal(model.down_1.grn_beta, sd["down_1.grn_beta"])
    # the reference layout also comes back out
    back = to_reference_state_dict(model)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_nnunet_v2_checkpoint_and_overrides():
    torch.manual_seed(8)
    src = MedNeXt(2, 3, spatial_dims=3, width=8, strides=[(1, 2, 2), (2, 2, 2)], kernel_sizes=[3, 5, 5, 5, 3])
    ckpt = {"network_weights": src.state_dict(), "init_args": {"plans": {}}, "current_epoch": 5}
    inferred = infer_config(convert_state_dict(ckpt)[0])
    assert inferred["kernel_sizes"] == [[3] * 3, [5] * 3, [5] * 3, [5] * 3, [3] * 3]
    assert inferred["strides"] == [[2, 2, 2]] * 2  # strides leave no trace in the weights
    model = load_pretrained(ckpt, strides=[(1, 2, 2), (2, 2, 2)])
    assert model.config == src.config
    assert model.load_report.overridden == ["strides"]
    x = torch.randn(1, 2, 8, 16, 16)
    assert torch.equal(model(x), src.eval()(x))


def test_pipeline_checkpoint_brings_its_strides(tmp_path):
    src = MedNeXt(1, 2, spatial_dims=3, width=8, strides=[(1, 2, 2), (2, 2, 2)], deep_supervision=True, norm="layer")
    arch_kwargs = {k: v for k, v in src.config.items() if k not in ("in_channels", "num_classes")}
    path = tmp_path / "checkpoint_final.pth"
    torch.save(
        {
            "network_weights": src.state_dict(),
            "logging": {"mean_fg_dice": [np.float64(0.5)]},
            "current_epoch": 2,
            "mednext": {"preset": "S", "architecture": {"network_class_name": "x", "arch_kwargs": arch_kwargs}},
        },
        path,
    )
    model = load_pretrained(path)
    assert model.config == src.config  # strides and norm come from the entry, not the defaults
    assert "architecture entry" in model.load_report.summary()


# ----------------------------------------------------------------------------- errors


def test_unknown_layout_names_first_keys():
    sd = {"encoder.0.weight": torch.zeros(1), "encoder.0.bias": torch.zeros(1), "stem.weight": torch.zeros(1)}
    with pytest.raises(LayoutError, match=r"could not place: 'encoder.0.weight', 'encoder.0.bias'"):
        load_pretrained(sd)
    monai_sd = monai_nets.MedNeXt(init_filters=4, kernel_size=3).state_dict()
    monai_sd["extra_head.weight"] = torch.zeros(1)
    with pytest.raises(LayoutError, match=r"could not be placed: 'extra_head.weight'"):
        load_pretrained(monai_sd)
    with pytest.raises(LayoutError, match=r"hold no state dict"):
        load_pretrained({"epoch": 1, "optimizer": {"lr": 1.0}})
    gap = {k.replace("down_1.", "down_2."): v for k, v in MedNeXt(1, 2, width=4, strides=(2, 2)).state_dict().items()}
    with pytest.raises(LayoutError, match=r"down_<i> blocks are numbered \[0, 2\]"):
        load_pretrained(gap)


def test_shape_conflicts_name_tensor_and_both_shapes():
    sd = MedNeXt(1, 3, spatial_dims=2, width=8, strides=(2, 2)).state_dict()
    with pytest.raises(ShapeMismatchError, match=r"'out_0.conv_out.weight' has shape \(8, 3, 1, 1\).*\(8, 5, 1, 1\)"):
        load_pretrained(sd, num_classes=5)
    bad = dict(sd)
    bad["enc_block_1.1.conv1.weight"] = torch.zeros(16, 1, 5, 5)
    with pytest.raises(
        ShapeMismatchError, match=r"'enc_block_1.1.conv1.weight' has shape \(16, 1, 5, 5\).*\(16, 1, 3, 3\)"
    ):
        load_pretrained(bad)


def test_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_pretrained(missing)
    good = tmp_path / "good.pth"
    torch.save({"state_dict": MedNeXt(1, 2, spatial_dims=2, width=4, strides=(2,)).state_dict()}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*truncated or corrupt"):
        load_pretrained(truncated)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="corrupt.model"):
        load_pretrained(corrupt)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt.*empty"):
        load_pretrained(empty)


# ----------------------------------------------------------------------------- fine-tuning transfer


def test_transfer_reinitialises_stem_and_heads_only(tmp_path):
    torch.manual_seed(9)
    source = MedNeXt(1, 3, spatial_dims=3, width=8, strides=(2, 2), grn=True)
    randomise_all(source)
    target = MedNeXt(4, 5, spatial_dims=3, width=8, strides=(2, 2), grn=True, deep_supervision=True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer_weights(target, source)
    assert {k for k, _, _ in report.reinitialised} == {
        "stem.weight", "stem.bias", "out_0.conv_out.weight", "out_0.conv_out.bias"
    }  # fmt: skip
    assert ("stem.weight", (8, 1, 1, 1, 1), (8, 4, 1, 1, 1)) in report.reinitialised
    assert report.missing == [f"out_{i}.conv_out.{p}" for i in (1, 2) for p in ("weight", "bias")]
    src, now = source.state_dict(), target.state_dict()
    assert len(report.copied) == len(now) - 8
    assert all(torch.equal(now[k], src[k]) for k in report.copied)
    assert torch.equal(now["out_1.conv_out.weight"], before["out_1.conv_out.weight"])
    assert not torch.equal(now["stem.bias"], src["stem.bias"])  # re-initialised as a whole module
    # same from a file, and width changes are refused with both shapes named
    from mednext.nn.weights.checkpoint import save_checkpoint

    path = save_checkpoint(source, tmp_path / "src.safetensors")
    assert len(transfer_weights(target, path).copied) == len(report.copied)
    wider = MedNeXt(1, 3, spatial_dims=3, width=16, strides=(2, 2), grn=True)
    with pytest.raises(
        ShapeMismatchError, match=r"'enc_block_0.0.grn_gamma' has shape \(1, 16, 1, 1, 1\).*\(1, 32, 1, 1, 1\)"
    ):
        transfer_weights(wider, source)
    with pytest.raises(ValueError, match="inflate_2d_to_3d"):
        transfer_weights(target, MedNeXt(1, 3, spatial_dims=2, width=8, strides=(2, 2)))


def test_transfer_from_monai_state_dict():
    theirs = monai_nets.MedNeXt(spatial_dims=2, init_filters=8, in_channels=1, out_channels=2, kernel_size=3,
                                use_residual_connection=True, blocks_down=(1, 1), blocks_up=(1, 1), blocks_bottleneck=1,
                                encoder_expansion_ratio=2, decoder_expansion_ratio=2)  # fmt: skip
    target = MedNeXt(3, 2, spatial_dims=2, width=8, strides=(2, 2), block_counts=1, down_expansion_ratios=[2, 2])
    report = transfer_weights(target, theirs.state_dict())
    assert [k for k, _, _ in report.reinitialised] == ["stem.weight", "stem.bias"]
    assert torch.equal(target.up_0.conv1.weight, theirs.up_blocks[1].conv1.weight)


# ----------------------------------------------------------------------------- 2D -> 3D inflation


def test_centre_inflation_reproduces_2d_model_on_every_slice():
    torch.manual_seed(10)
    flat = MedNeXt(2, 3, spatial_dims=2, width=8, strides=(2, 2), kernel_sizes=[3, 5, 5, 5, 3], grn=True)
    randomise_affine(flat, seed=11)
    deep = MedNeXt(2, 3, spatial_dims=3, width=8, strides=[(1, 2, 2)] * 2, kernel_sizes=[3, 5, 5, 5, 3], grn=True)
    report = inflate_2d_to_3d(deep, flat, mode="centre")
    assert report.reinitialised == [] and report.missing == []
    depthwise = [k for k in flat.state_dict() if k.endswith("conv1.weight")]
    assert sorted(k for k, _, _ in report.inflated) == sorted(depthwise)
    # a volume whose slices are all the same image gives the 2D output on every slice
    image = torch.randn(1, 2, 32, 32)
    volume = image[:, :, None].expand(1, 2, 6, 32, 32).contiguous()
    with torch.no_grad():
        expected = flat.eval()(image)
        got = deep.eval()(volume)
    for d in range(6):
        assert relative_error(got[:, :, d], expected) < 1e-5


def test_spread_inflation_keeps_the_kernel_sum():
    flat = MedNeXt(1, 2, spatial_dims=2, width=4, strides=(2,), kernel_sizes=3)
    deep = MedNeXt(1, 2, spatial_dims=3, width=4, strides=(2,), kernel_sizes=3)
    inflate_2d_to_3d(deep, flat)
    w2, w3 = flat.enc_block_0[0].conv1.weight, deep.enc_block_0[0].conv1.weight
    assert w3.shape == (4, 1, 3, 3, 3)
    assert torch.allclose(w3.sum(dim=2), w2, atol=1e-7)
    assert torch.equal(w3[:, :, 0], w3[:, :, 2])
    assert torch.equal(deep.enc_block_0[0].conv2.weight[..., 0, 0, 0], flat.enc_block_0[0].conv2.weight[..., 0, 0])
    with pytest.raises(ShapeMismatchError, match=r"in-plane kernel sizes"):
        inflate_2d_to_3d(MedNeXt(1, 2, spatial_dims=3, width=4, strides=(2,), kernel_sizes=5), flat)
    with pytest.raises(ValueError, match="2D source and a 3D target"):
        inflate_2d_to_3d(deep, deep)
