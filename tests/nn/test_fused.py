"""The fused norm -> expansion -> GELU -> compression branch (mednext.nn.kernels.fused) equals the unfused
fast path and the plain path, in float64 exactly and in float32 within the unfused path's error."""

import pytest
import torch

from mednext import config
from mednext.nn import MedNeXtBlock, MedNeXtDownBlock, MedNeXtUpBlock
from mednext.nn.kernels import fused
from mednext.nn.layers import channels_last


def _block(kind: str, c: int, r: int, k: int, dims: int) -> torch.nn.Module:
    if kind == "block":
        return MedNeXtBlock(c, c, r, k, spatial_dims=dims)
    if kind == "block-no-residual":
        return MedNeXtBlock(c, 2 * c, r, k, spatial_dims=dims, residual=False)
    if kind == "down":
        return MedNeXtDownBlock(c, 2 * c, r, k, stride=2, spatial_dims=dims)
    return MedNeXtUpBlock(c, c // 2, r, k, stride=2, spatial_dims=dims)


def _grads(block, x, enabled, monkeypatch, recompute=False):
    block.recompute_expansion = recompute
    x = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    with config.override(fused_blocks=enabled):
        out = block(x)
        weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)
        ((out * weight).sum() + out.square().mean()).backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


# Chunks of the expansion (fused._ROWS_BYTES): one per sample at these sizes, or five rows of the last
# axis (50 rows of 24 float64 expansion channels), which leaves a partial last chunk.
CHUNKS = {"whole": None, "chunked": 50 * 24 * 8}


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("kind", ["block", "block-no-residual", "down", "up"])
def test_fused_branch_equals_unfused_float64(kind, dims, chunks, monkeypatch):
    if CHUNKS[chunks]:
        monkeypatch.setattr(fused, "_ROWS_BYTES", CHUNKS[chunks])
    torch.manual_seed(11)
    block = _block(kind, 8, 3, 3, dims).double().train()
    for p in block.parameters():
        p.data.add_(0.2 * torch.randn_like(p))  # non-trivial norm affine and biases
    shape = (2, 8, 6, 8, 10) if dims == 3 else (2, 8, 12, 10)
    x = channels_last(torch.randn(shape, dtype=torch.float64) * 2 + 3)
    ref = _grads(block, x, False, monkeypatch)
    for recompute in (False, True):
        out, gx, grads = _grads(block, x, True, monkeypatch, recompute)
        assert out.movedim(1, -1).is_contiguous()  # stays channels-last
        torch.testing.assert_close(out, ref[0], rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(gx, ref[1], rtol=1e-10, atol=1e-12)
        scale = max(g.abs().max().item() for g in ref[2].values())
        for name, g in ref[2].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-11 * scale, msg=name)


def test_fused_branch_float32_error_no_worse_than_unfused(monkeypatch):
    """Float32 against a float64 reference, on a 32^3 volume whose channels have mean 3 and std 1:
    the fused branch's error (worst output or gradient, relative to its largest value) stays at
    float32 rounding, within a factor of the unfused path's."""
    torch.manual_seed(12)
    block = _block("block", 16, 2, 3, 3).train()
    for p in block.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = channels_last(torch.randn(2, 16, 32, 32, 32) + 3)
    ref = _grads(block.double(), x.double(), False, monkeypatch)
    block.float()
    errors = {}
    for enabled in (False, True):
        out, gx, grads = _grads(block, x, enabled, monkeypatch)
        errs = [
            (out.double() - ref[0]).abs().max() / ref[0].abs().max(),
            (gx.double() - ref[1]).abs().max() / ref[1].abs().max(),
        ]
        errs += [
            (grads[n].double() - g).abs().max() / g.abs().max() for n, g in ref[2].items() if "conv1.bias" not in n
        ]
        errors[enabled] = max(e.item() for e in errs)
    # Measured: unfused 1.7e-6, fused 9.1e-6 (the norm's sums come from the expansion's weight-gradient GEMM,
    # so a channel's mean enters them; with mean 0 the two are 9.3e-6 and 5.4e-6): float32 rounding either way.
    assert errors[True] < 3e-5, errors
    assert errors[True] < 10 * errors[False], errors


@pytest.mark.parametrize("chunks", CHUNKS)
def test_fused_no_grad_forward_equals_training_forward(chunks, monkeypatch):
    if CHUNKS[chunks]:
        monkeypatch.setattr(fused, "_ROWS_BYTES", CHUNKS[chunks] // 2)  # float32, expansion 32: 37 rows -> 32
    torch.manual_seed(13)
    block = _block("block", 8, 4, 5, 3).eval()
    x = channels_last(torch.randn(1, 8, 8, 8, 8))
    with torch.no_grad():
        inference = block(x)
    training = block(x.requires_grad_())
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)
    with config.override(fused_blocks=False), torch.no_grad():
        torch.testing.assert_close(inference, block(x), rtol=1e-5, atol=1e-5)  # the unfused fast path


def test_fast_path_network_runs_the_fused_branch(monkeypatch):
    from mednext import create_mednext

    calls = []
    original = fused.norm_expand_compress
    monkeypatch.setattr(fused, "norm_expand_compress", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = create_mednext("S", 1, 2).train()
    model(torch.randn(1, 1, 32, 32, 32))
    # S: 2 blocks per position at 9 positions, 4 down and 4 up blocks
    assert len(calls) == 2 * 9 + 4 + 4
    calls.clear()
    model.set_fast_path(False)
    model(torch.randn(1, 1, 32, 32, 32))
    assert not calls
