"""MedNeXt-v2 (arXiv 2512.17774): the Base and Wide presets, GRN with channel-sum normalisation in every
block, and the fast paths (CPU channels-last, CUDA route on the CPU) against the plain path in float64."""

import json

import pytest
import torch

from mednext import MedNeXt, config, create_mednext
from mednext.nn import GlobalResponseNorm, MedNeXtBlock, global_response_norm
from mednext.nn.kernels import fused

# Counted by an independent implementation for 1 input channel and 3 classes (the paper rounds to 62M and
# 247M): the full-resolution head only, no deep-supervision heads.
INDEPENDENT_COUNTS = {"v2-base": 61_969_507, "v2-wide": 246_536_387}
V2_GRN = {"where": "all", "norm": "sum"}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset", INDEPENDENT_COUNTS)
def test_v2_parameter_counts_equal_the_independent_count(preset):
    with torch.device("meta"):
        plain = create_mednext(preset, 1, 3)
        supervised = create_mednext(preset, 1, 3, deep_supervision=True)
    assert n_params(plain) == INDEPENDENT_COUNTS[preset]
    # the four deep-supervision heads (1x1 transposed convs on 2C, 4C, 8C, 16C, with bias) come on top
    c = plain.widths[0]
    heads = sum(w * 3 + 3 for w in (2 * c, 4 * c, 8 * c, 16 * c))
    assert n_params(supervised) == INDEPENDENT_COUNTS[preset] + heads
    # v1 L has the same convolutions: the difference is GRN's gamma and beta on every block's expansion
    with torch.device("meta"):
        large = create_mednext("L", 1, 3, width=c)
    hidden = sum(m.conv2.out_channels for m in plain.modules() if isinstance(m, MedNeXtBlock))
    assert n_params(plain) - n_params(large) == 2 * hidden


def test_v2_presets_follow_the_paper():
    with torch.device("meta"):
        base, wide = create_mednext("v2-base", 1, 3), create_mednext("V2-Wide", 1, 3)
    for model, width in ((base, 32), (wide, 64)):
        assert model.widths == [width * 2**i for i in range(5)]  # five resolutions
        assert model.config["block_counts"] == [3, 4, 8, 8, 8, 8, 8, 4, 3]
        assert model.config["expansion_ratios"] == [3, 4, 8, 8, 8, 8, 8, 4, 3]
        assert {tuple(k) for k in model.config["kernel_sizes"]} == {(3, 3, 3)}
        assert model.config["grn"] == V2_GRN
        blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, MedNeXtBlock)]
        assert len(blocks) == 54 + 8  # 54 blocks, 4 down and 4 up blocks
        for name, block in blocks:  # GRN in every block, down_0 included, channel sum
            assert block.grn and block.grn_normalisation == "sum", name


def test_v2_presets_are_recognised_in_saved_configs():
    from mednext.nn.weights.checkpoint import detect_preset

    with torch.device("meta"):
        for preset in INDEPENDENT_COUNTS:
            model = create_mednext(preset, 2, 5, deep_supervision=True)
            assert detect_preset(model.config) == preset.upper()
        assert detect_preset(create_mednext("L", 1, 3).config) == "L"  # L differs from v2-base by GRN only


def test_v2_fresh_grn_parameters_are_zero():
    model = MedNeXt(1, 2, width=4, strides=[2, 2], grn=V2_GRN)
    grn = [p for name, p in model.named_parameters() if "grn" in name]
    # 5 positions x 2 blocks, 2 down and 2 up blocks: gamma and beta each, all zero (GRN is the identity)
    assert len(grn) == 2 * (5 * 2 + 2 + 2) and all(not p.any() for p in grn)


def test_v2_base_runs_and_shapes():
    torch.manual_seed(0)
    model = create_mednext("v2-base", 1, 3, deep_supervision=True).train()
    outs = model(torch.randn(1, 1, 32, 16, 16))
    assert [tuple(o.shape) for o in outs] == [
        (1, 3, 32, 16, 16),
        (1, 3, 16, 8, 8),
        (1, 3, 8, 4, 4),
        (1, 3, 4, 2, 2),
        (1, 3, 2, 1, 1),
    ]


def test_grn_sum_matches_formula_and_differs_from_mean_by_channel_count():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 4, 5, 3, dtype=torch.float64)
    gamma, beta = torch.randn(1, 6, 1, 1, 1, dtype=torch.float64), torch.randn(1, 6, 1, 1, 1, dtype=torch.float64)
    gx = x.square().sum(dim=(2, 3, 4), keepdim=True).sqrt()
    expected = gamma * x * (gx / (gx.sum(dim=1, keepdim=True) + 1e-6)) + beta + x
    torch.testing.assert_close(global_response_norm(x, gamma, beta, "sum"), expected, rtol=1e-13, atol=1e-13)
    # sum = 6 * mean: scaling gamma by 6 turns "sum" into "mean" (up to the 1e-6 in the denominator)
    torch.testing.assert_close(
        global_response_norm(x, 6 * gamma, beta, "sum"),
        global_response_norm(x, gamma, beta, "mean"),
        rtol=1e-5,
        atol=1e-5,
    )
    module = GlobalResponseNorm(6, 3, normalisation="sum")
    with torch.no_grad():
        module.gamma.copy_(gamma)
        module.beta.copy_(beta)
    torch.testing.assert_close(module(x.float()), expected.float(), rtol=1e-5, atol=1e-5)


def test_grn_setting_forms_and_errors():
    assert MedNeXt(1, 2, width=4, strides=[2], grn={"where": "all_but_down_0", "norm": "mean"}).config["grn"] is True
    assert MedNeXt(1, 2, width=4, strides=[2], grn={"norm": "sum"}).config["grn"] == {
        "where": "all_but_down_0",
        "norm": "sum",
    }
    v1 = MedNeXt(1, 2, width=4, strides=[2, 2], grn=True)
    assert not v1.down_0.grn and v1.down_1.grn and v1.down_1.grn_normalisation == "mean"
    for bad, pattern in (
        ("sum", "grn='sum' is not supported"),
        ({"where": "encoder"}, "grn\\['where'\\]='encoder'"),
        ({"norm": "max"}, "grn\\['norm'\\]='max'"),
        ({"place": "all"}, "unknown key"),
    ):
        with pytest.raises(ValueError, match=pattern):
            MedNeXt(1, 2, width=4, strides=[2], grn=bad)
    with pytest.raises(ValueError, match="normalisation 'max'"):
        global_response_norm(torch.ones(1, 2, 2), torch.ones(1), torch.ones(1), "max")


def test_v2_config_rebuilds_identical_model_through_json():
    torch.manual_seed(2)
    model = MedNeXt(1, 2, width=4, strides=[2, 2], grn=V2_GRN, deep_supervision=True).eval()
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    clone = MedNeXt(**json.loads(json.dumps(model.config))).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def _perturbed_v2(seed: int, **kwargs) -> MedNeXt:
    torch.manual_seed(seed)
    model = MedNeXt(2, 3, width=8, deep_supervision=True, grn=V2_GRN, **kwargs).double().train()
    for p in model.parameters():  # GRN's gamma and beta off zero, so GRN is not the identity
        p.data.add_(0.2 * torch.randn_like(p))
    return model


def _outputs_and_grads(model: MedNeXt, x: torch.Tensor, fast: bool):
    model.set_fast_path(fast)
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum((o.square().mean() + o.mean()) * (i + 1) for i, o in enumerate(outs)).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_equal(result, reference):
    for a, b in zip(result[0], reference[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    scale = max(g.abs().max().item() for g in reference[1].values())
    for name, g in reference[1].items():
        torch.testing.assert_close(result[1][name], g, rtol=1e-9, atol=1e-11 * scale, msg=name)


@pytest.mark.parametrize("checkpointing", [False, "cheap", True])
def test_v2_fast_path_equals_plain_path_float64(checkpointing, monkeypatch):
    """The CPU fast path on a v2 network: GRN blocks take the unfused channels-last branch (the fused
    branch is never called), with the plain path's values and gradients in float64."""
    calls = []
    original = fused.norm_expand_compress
    monkeypatch.setattr(fused, "norm_expand_compress", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = _perturbed_v2(3, strides=[2, (1, 2, 2)], kernel_sizes=3, block_counts=[1, 2, 1, 2, 1])
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 2, 8, 12, 8, dtype=torch.float64)
    reference = _outputs_and_grads(model, x, fast=False)
    from mednext.nn.layers import is_channels_last

    layouts = []
    for block in model.modules():
        if isinstance(block, MedNeXtBlock):  # GRN's output, the compression's input, stays channels-last
            block.conv3.register_forward_pre_hook(lambda m, args: layouts.append(is_channels_last(args[0])))
    _assert_equal(_outputs_and_grads(model, x, fast=True), reference)
    assert len(layouts) == (7 + 2 + 2) * (2 if checkpointing else 1) and all(layouts)  # recomputed: twice
    assert calls == []
    assert any(name.startswith("down_0.grn") for name in reference[1])


def test_v2_cuda_route_equals_plain_path_float64():
    model = _perturbed_v2(4, strides=[2, 2], kernel_sizes=[3, 5, 3, 5, 3], block_counts=1)
    x = torch.randn(2, 2, 12, 8, 8, dtype=torch.float64)
    reference = _outputs_and_grads(model, x, fast=False)
    with config.override(force_cuda_route=True):
        for route in ({"up": "polyphase", "down": "native", "norm": "manual"}, {"up": "native", "down": "polyphase"}):
            config.set_cuda_route(**route)
            _assert_equal(_outputs_and_grads(model, x, fast=True), reference)


def test_v2_float32_fast_path_close_to_float64():
    model = _perturbed_v2(5, strides=[2, 2], kernel_sizes=3, block_counts=1)
    x = torch.randn(1, 2, 16, 16, 16, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        model.set_fast_path(False)
        reference = model(x)
        model.float().set_fast_path(True)
        fast = model(x.float())
    assert ((fast.double() - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_v2_weights_round_trip_through_our_format_and_monai_names(tmp_path):
    from mednext.nn import load_pretrained, save_checkpoint, to_monai
    from mednext.nn.weights.layouts import MONAI_KEYS, rename_keys

    model = _perturbed_v2(6, strides=[2, 2], kernel_sizes=3, block_counts=1).float().eval()
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        expected = model(x)
    save_checkpoint(model, tmp_path / "v2.safetensors")
    ours = load_pretrained(tmp_path / "v2.safetensors")
    monai_named, origins, unplaced = rename_keys(model.state_dict(), MONAI_KEYS, 2, to_ours=False)
    assert (
        not unplaced
        and "down_blocks.0.global_resp_gamma" in monai_named
        and "out_blocks.0.conv_out.weight" in monai_named
    )
    assert origins["up_blocks.0.conv1.weight"] == "up_1.conv1.weight"  # MONAI counts up blocks from the deepest
    named = load_pretrained(monai_named)
    assert named.load_report.layout == "monai" and named.config["grn"] == V2_GRN  # GRN in down_0: v2
    for loaded in (ours, named):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="down_0.grn_gamma is not zero.*summed norm"):
        to_monai(model)  # MONAI's network has no GRN in down blocks and normalises by the mean
