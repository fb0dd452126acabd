"""The network: parameter counts, shapes, deep supervision, checkpointing, norms and errors."""

import pytest
import torch

from mednext import MedNeXt, create_mednext
from mednext.nn import ChannelsFirstLayerNorm, GlobalResponseNorm, MedNeXtUpBlock, global_response_norm

# Exact trainable parameter counts of the reference (3D, 1 input channel, 4 classes, deep supervision on).
REFERENCE_PARAMS = {
    ("S", 3): 5_554_836,
    ("S", 5): 5_984_468,
    ("B", 3): 10_530_228,
    ("B", 5): 10_959_860,
    ("M", 3): 17_552_884,
    ("M", 5): 18_264_756,
    ("L", 3): 61_783_188,
    ("L", 5): 62_996_820,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("preset", "kernel"), list(REFERENCE_PARAMS))
def test_preset_parameter_counts_equal_reference(preset, kernel):
    with torch.device("meta"):  # shapes only: fast even for L
        model = create_mednext(preset, 1, 4, kernel_size=kernel, deep_supervision=True)
    assert n_params(model) == REFERENCE_PARAMS[(preset, kernel)]


def test_2d_small_parameter_count_equals_reference():
    with torch.device("meta"):
        model = create_mednext("S", 1, 4, spatial_dims=2, deep_supervision=True)
    assert n_params(model) == 5_475_924


def test_preset_block_expansions_follow_reference_positions():
    with torch.device("meta"):
        model = create_mednext("L", 1, 4)
    exp = [3, 4, 8, 8, 8, 8, 8, 4, 3]
    for i in range(4):
        c = 32 * 2**i
        # down_i uses the next position's ratio, up_i its decoder stage's ratio (reference convention)
        assert model.get_submodule(f"down_{i}").conv2.out_channels == c * exp[i + 1]
        assert model.get_submodule(f"up_{i}").conv2.out_channels == 2 * c * exp[8 - i]
        assert model.get_submodule(f"enc_block_{i}")[0].conv2.out_channels == c * exp[i]
        assert model.get_submodule(f"dec_block_{i}")[0].conv2.out_channels == c * exp[8 - i]
    assert [len(model.get_submodule(f"enc_block_{i}")) for i in range(4)] == [3, 4, 8, 8]
    assert model.grad_checkpointing  # M and L checkpoint by default, like the reference
    assert not create_mednext("S", 1, 2).grad_checkpointing


def test_monai_down_convention_is_expressible():
    with torch.device("meta"):
        model = create_mednext("B", 1, 4, down_expansion_ratios=[2, 3, 4, 4])
    assert [model.get_submodule(f"down_{i}").conv2.out_channels // (32 * 2**i) for i in range(4)] == [2, 3, 4, 4]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("preset", ["S", "B"])
def test_output_shape(preset, dims):
    model = create_mednext(preset, 2, 3, spatial_dims=dims).eval()
    size = (32, 48) if dims == 2 else (16, 32, 48)
    with torch.no_grad():
        out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)


def test_kernel5_3d_output_shape():
    model = create_mednext("M", 1, 2, kernel_size=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 16, 16)).shape == (1, 2, 32, 16, 16)


@pytest.mark.parametrize("kernel", [3, 5, (1, 3, 3)])
def test_anisotropic_strides_return_skip_shapes(kernel):
    strides = [(1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 1, 1), 3]
    model = MedNeXt(1, 2, strides=strides, width=8, block_counts=1, kernel_sizes=kernel, deep_supervision=True)
    assert model.total_stride == (12, 24, 24)
    model.train()
    outs = model(torch.randn(1, 1, 12, 48, 24))
    assert [o.shape[2:] for o in outs] == [
        (12, 48, 24),
        (12, 24, 12),
        (6, 12, 6),
        (6, 6, 3),
        (3, 6, 3),
        (1, 2, 1),
    ]


@pytest.mark.parametrize("stride", [2, 3, 4, (1, 2), (3, 1)])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_up_block_returns_stride_times_input(stride, kernel):
    block = MedNeXtUpBlock(4, 2, expansion=2, kernel_size=kernel, stride=stride, spatial_dims=2)
    s = (stride, stride) if isinstance(stride, int) else stride
    assert block(torch.randn(1, 4, 5, 3)).shape == (1, 2, 5 * s[0], 3 * s[1])


@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervision_count_order_and_eval_output(dims):
    model = create_mednext("S", 1, 3, spatial_dims=dims, deep_supervision=True)
    x = torch.randn(1, 1, *([32] * dims))
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 5
    assert [o.shape[2] for o in outs] == [32, 16, 8, 4, 2]  # highest resolution first
    assert all(o.shape[:2] == (1, 3) for o in outs)
    model.eval()
    with torch.no_grad():
        full = model(x)
    assert isinstance(full, torch.Tensor) and full.shape == (1, 3, *([32] * dims))
    torch.testing.assert_close(full, outs[0].detach())
    model.train()
    model.set_deep_supervision(False)
    assert isinstance(model(x), torch.Tensor)


def test_deep_supervision_cannot_be_enabled_without_heads():
    with pytest.raises(ValueError, match="deep_supervision=False"):
        create_mednext("S", 1, 2).set_deep_supervision(True)


@pytest.mark.parametrize("dims", [2, 3])
def test_grad_checkpointing_gives_same_loss_and_gradients(dims):
    torch.manual_seed(0)
    model = MedNeXt(2, 3, spatial_dims=dims, width=8, strides=[2, 2], grn=True, deep_supervision=True).double()
    for p in model.parameters():  # make GRN non-trivial
        p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 2, *([16] * dims), dtype=torch.float64)

    def loss_and_grads(ckpt: bool):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model.train()
        loss = sum(o.square().mean() * (i + 1) for i, o in enumerate(model(x)))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-12, atol=0)
    for a, b in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert not any("dummy" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("dims", [2, 3])
def test_fresh_grn_is_identity(dims):
    grn = GlobalResponseNorm(6, spatial_dims=dims)
    x = torch.randn(2, 6, *([5] * dims))
    torch.testing.assert_close(grn(x), x, rtol=0, atol=0)


def test_grn_matches_formula():
    x = torch.randn(2, 6, 4, 5, 3, dtype=torch.float64)
    gamma, beta = torch.randn(1, 6, 1, 1, 1, dtype=torch.float64), torch.randn(1, 6, 1, 1, 1, dtype=torch.float64)
    gx = x.square().sum(dim=(2, 3, 4), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(global_response_norm(x, gamma, beta), gamma * x * nx + beta + x)


@pytest.mark.parametrize("dims", [2, 3])
def test_layer_norm_matches_float64_reference(dims):
    norm = ChannelsFirstLayerNorm(5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
        norm.bias.copy_(torch.randn(5))
    x = torch.randn(3, 5, *([6] * dims)) * 3 + 1
    xd = x.double()
    mean = xd.mean(1, keepdim=True)
    var = (xd - mean).square().mean(1, keepdim=True)
    shape = (1, 5) + (1,) * dims
    expected = (xd - mean) / torch.sqrt(var + 1e-5) * norm.weight.double().view(shape) + norm.bias.double().view(shape)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_layer_norm_network_runs(dims):
    model = create_mednext("S", 1, 2, spatial_dims=dims, norm="layer").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *([16] * dims))).shape == (1, 2, *([16] * dims))


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small3d():
    return create_mednext("S", 2, 3).eval()


def test_error_wrong_channel_count(small3d):
    with pytest.raises(ValueError, match=r"expects 2 input channel\(s\).*got 1.*in_channels=1"):
        small3d(torch.randn(1, 1, 16, 16, 16))


def test_error_wrong_dimensionality(small3d):
    with pytest.raises(ValueError, match=r"expects a 5D tensor.*got 4D.*x\[None\]"):
        small3d(torch.randn(2, 16, 16, 16))
    model2d = create_mednext("S", 1, 2, spatial_dims=2)
    with pytest.raises(ValueError, match=r"expects a 4D tensor \(N, C, H, W\), got 5D"):
        model2d(torch.randn(1, 1, 16, 16, 16))


def test_error_not_divisible_names_divisor_and_nearest(small3d):
    with pytest.raises(ValueError) as err:
        small3d(torch.randn(1, 2, 16, 100, 40))
    msg = str(err.value)
    assert "total stride (16, 16, 16)" in msg
    assert "axis 1 has 100, needs a multiple of 16 (nearest: 96 or 112)" in msg
    assert "axis 2 has 40" in msg and "32 or 48" in msg
    assert "axis 0" not in msg


def test_error_unknown_preset_lists_valid():
    with pytest.raises(ValueError, match=r"unknown MedNeXt preset 'XL'; valid presets are S, B, M, L"):
        create_mednext("XL", 1, 2)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"expansion_ratios": [2, 2, 2]}, r"expansion_ratios has 3 entries but this network needs 9"),
        ({"block_counts": [1] * 7, "strides": [2, 2, 2, 2]}, r"block_counts has 7 entries .* needs 9"),
        ({"kernel_sizes": [3] * 5}, r"kernel_sizes has 5 entries .* needs 9"),
        ({"kernel_sizes": 4}, r"must be odd"),
        ({"strides": [(2, 2), 2, 2, 2]}, r"strides\[0\]=\(2, 2\) has 2 entries; give one int or 3"),
        ({"down_expansion_ratios": [2, 2]}, r"down_expansion_ratios has 2 entries .* needs 4"),
        ({"norm": "batch"}, r"norm='batch' is not supported"),
        ({"spatial_dims": 1}, r"spatial_dims=1 is not supported"),
        ({"strides": []}, r"one stride per stage"),
    ],
)
def test_error_inconsistent_configuration(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MedNeXt(1, 2, **kwargs)


def test_error_even_kernel_in_preset():
    with pytest.raises(ValueError, match="odd positive int"):
        create_mednext("S", 1, 2, kernel_size=4)


def test_config_rebuilds_identical_model():
    model = create_mednext("B", 1, 3, kernel_size=5, spatial_dims=2, deep_supervision=True)
    clone = MedNeXt(**model.config)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32)
    model.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_error_single_voxel_bottleneck(small3d):
    with pytest.raises(ValueError, match=r"one voxel at the bottleneck.*twice the total stride"):
        small3d(torch.randn(1, 2, 16, 16, 16))
