"""Gradient checkpointing modes: none, whole blocks ("block", True) and "cheap" (norm, expansion
and GELU recomputed). Same gradients in every mode; "cheap" stores no R*C-channel tensor."""

import pytest
import torch

from mednext import MedNeXt, config, create_mednext
from mednext.nn import MedNeXtBlock, MedNeXtDownBlock, MedNeXtUpBlock
from mednext.nn.layers import channels_last

MODES = (False, True, "cheap")
pytestmark = pytest.mark.usefixtures("one_thread")


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor, run) -> int:
    """Bytes of the distinct storages the autograd graph keeps for the backward pass, beyond the
    parameters and the input ``x``."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


def _loss_and_grads(model: MedNeXt, x: torch.Tensor, mode, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(mode)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = model(x)
        loss = sum((o.float().square().mean() + o.float().mean()) * (i + 1) for i, o in enumerate(outs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _model(seed: int, **cfg) -> MedNeXt:
    torch.manual_seed(seed)
    model = MedNeXt(2, 3, width=8, deep_supervision=True, **cfg)
    for p in model.parameters():  # fresh random values everywhere, GRN included
        p.data.add_(0.1 * torch.randn_like(p))
    return model


CONFIGS = [
    {"spatial_dims": 3, "strides": [2, 2], "grn": True, "expansion_ratios": [2, 3, 4, 3, 2]},
    {"spatial_dims": 3, "strides": [(1, 2, 2), 2], "kernel_sizes": 5, "norm": "layer"},
    {"spatial_dims": 2, "strides": [2, 2, 2], "grn": True, "kernel_sizes": 3},
    {"spatial_dims": 2, "strides": [(2, 1), 2], "residual": False, "resample_residual": False},
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_every_mode_gives_the_gradients_of_no_checkpointing_float64(cfg, fast):
    model = _model(len(str(cfg)), **cfg).double()
    model.set_fast_path(fast)
    x = torch.randn(2, 2, *(2 * s for s in model.total_stride), dtype=torch.float64)
    loss_ref, grads_ref = _loss_and_grads(model, x, False)
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for mode in (True, "cheap"):
        loss, grads = _loss_and_grads(model, x, mode)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
        for name, g in grads_ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-13 * scale, msg=f"{mode}: {name}")


@pytest.mark.parametrize("route", ["plain", "cuda-route"])
def test_cheap_mode_under_autocast_gives_the_gradients_of_no_checkpointing(route):
    # The recomputation replays the forward under the same autocast state, so the same bfloat16 ops run.
    # "cuda-route": the fast path's CUDA choices (native convs, manual channels-last group norm) on the CPU.
    model = _model(5, spatial_dims=3, strides=[2, 2], grn=True)
    model.set_fast_path(route != "plain")
    if route == "cuda-route":
        config.set_force_cuda_route(True)
    x = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    # A process's first bfloat16 CPU conv backward of a shape can run another oneDNN kernel than the later ones
    # (its weight gradient differs at bfloat16 precision): a warm-up step gives every compared step the same kernels.
    _loss_and_grads(model, x, False, autocast=True)
    loss_ref, grads_ref = _loss_and_grads(model, x, False, autocast=True)
    for mode in (True, "cheap"):
        loss, grads = _loss_and_grads(model, x, mode, autocast=True)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
        for name, g in grads_ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)


def test_cheap_mode_on_the_cuda_route_gives_the_gradients_of_no_checkpointing_float64():
    config.set_force_cuda_route(True)  # the CUDA route's arithmetic, run on the CPU
    model = _model(6, spatial_dims=3, strides=[2, 2], grn=True).double()
    x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    loss_ref, grads_ref = _loss_and_grads(model, x, False)
    loss, grads = _loss_and_grads(model, x, "cheap")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-13 * scale, msg=name)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("grn", [False, True], ids=["", "grn"])
def test_cheap_block_stores_only_the_depthwise_output(grn, fast):
    c, r = 8, 3
    x = torch.randn(2, c, 6, 8, 10)
    x = (channels_last(x) if fast else x).requires_grad_()
    block = MedNeXtBlock(c, c, r, 3, grn=grn).train()
    c_tensor = x.numel() * x.element_size()  # one C-channel activation
    none = _saved_bytes(block, x, lambda: block(x))
    block.recompute_expansion = True
    cheap = _saved_bytes(block, x, lambda: block(x))
    if fast and not grn:  # the fused branch (mednext.nn.kernels.fused) also keeps the norm's mean and 1/std
        stats = 2 * x.shape[0] * c * x.element_size()
        assert cheap == c_tensor + stats  # the depthwise conv's output, nothing of width R*C
        # without checkpointing: the depthwise output (C), GELU's input and output (R*C each)
        assert none == (1 + 2 * r) * c_tensor + stats
    else:
        assert cheap == c_tensor  # the depthwise conv's output, nothing of width R*C
        # without checkpointing: centred input and normed features (C each), GELU's input and output (R*C each)
        assert none >= (2 + 2 * r) * c_tensor
    block.eval()  # no recomputation outside training
    assert _saved_bytes(block, x, lambda: block(x)) == none


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("cls", [MedNeXtDownBlock, MedNeXtUpBlock], ids=["down", "up"])
def test_cheap_resampling_blocks_store_no_expanded_tensor(cls, fast):
    c, r = 8, 2
    x = torch.randn(2, c, 4, 6, 8)
    x = (channels_last(x) if fast else x).requires_grad_()
    block = cls(c, 2 * c if cls is MedNeXtDownBlock else c // 2, r, 3, stride=2).train()
    with torch.no_grad():
        y = block.conv1(x)  # the depthwise conv's output: C channels at the output resolution
    y_bytes = y.numel() * y.element_size()
    none = _saved_bytes(block, x, lambda: block(x))
    block.recompute_expansion = True
    cheap = _saved_bytes(block, x, lambda: block(x))
    # Without checkpointing the expansion's output and GELU's output are stored (R*C each), and on the
    # unfused (plain) path the norm's tensors too (>= (2 + 2R) C); cheap keeps one C tensor; the rest (the
    # same in both modes) belongs to the depthwise conv itself.
    stored = (2 * r if fast else 1 + 2 * r) * y_bytes
    assert none - cheap >= stored


def test_whole_model_saved_bytes_order_none_cheap_block():
    model = _model(7, spatial_dims=3, strides=[2, 2], block_counts=2, expansion_ratios=4)
    x = channels_last(torch.randn(1, 2, 16, 16, 16))
    saved = {}
    for mode in MODES:
        model.set_grad_checkpointing(mode)
        saved[mode] = _saved_bytes(model, x, lambda: model(x))
    # per stride-1 block: none 2 + 2R = 10 C-tensors, cheap 1, whole-block checkpointing 0 (its input only)
    assert saved[True] < saved["cheap"] < saved[False] / 4


def test_modes_api_and_config_round_trip():
    assert _config_mode(create_mednext("S", 1, 2)) is False
    assert _config_mode(create_mednext("M", 1, 2)) is True  # the reference's default: whole blocks
    model = create_mednext("S", 1, 2, grad_checkpointing="cheap")
    assert model.grad_checkpointing == "cheap" and _config_mode(model) == "cheap"
    rebuilt = MedNeXt(**model.config)
    assert rebuilt.grad_checkpointing == "cheap"
    assert all(b.recompute_expansion for b in rebuilt.modules() if isinstance(b, MedNeXtBlock))
    for given, stored in (("block", True), ("BLOCK", True), (True, True), ("none", False), (False, False)):
        rebuilt.set_grad_checkpointing(given)
        assert rebuilt.grad_checkpointing is stored and rebuilt.config["grad_checkpointing"] is stored
        assert not any(b.recompute_expansion for b in rebuilt.modules() if isinstance(b, MedNeXtBlock))
    assert MedNeXt(1, 2, width=4, strides=[2], grad_checkpointing="block").grad_checkpointing is True
    with pytest.raises(ValueError, match="grad_checkpointing='partial'.*'cheap'"):
        MedNeXt(1, 2, width=4, strides=[2], grad_checkpointing="partial")
    with pytest.raises(ValueError, match="grad_checkpointing"):
        rebuilt.set_grad_checkpointing([True])


def _config_mode(model: MedNeXt):
    return model.config["grad_checkpointing"]


def test_summary_names_every_mode():
    from mednext.nn.summary import ModelSummary

    memory = [
        {"device": "cpu", "batch": 1, "patch": "64x64x64", "grad_checkpointing": m, "peak_mib": 1.0, "measure": "rss"}
        for m in MODES
    ]
    text = ModelSummary("S", 3, 3, (1, 64, 64, 64), [], 0, 0, memory).format()
    for label in ("checkpointing off", "checkpointing whole blocks", "checkpointing cheap (norm, expansion, GELU)"):
        assert label in text
