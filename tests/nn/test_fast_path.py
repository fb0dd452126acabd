"""The default fast path (channels-last layout, 1x1 convs as GEMMs) equals the plain path."""

import pytest
import torch

from mednext import MedNeXt, create_mednext

CONFIGS = [
    {"spatial_dims": 3, "strides": [2, 2], "kernel_sizes": [3, 5, 3, 5, 3]},
    {"spatial_dims": 3, "strides": [(1, 2, 2), 3], "kernel_sizes": 3, "grn": True},
    {"spatial_dims": 2, "strides": [2, 2, 2], "kernel_sizes": 5, "norm": "layer"},
    {"spatial_dims": 2, "strides": [(2, 1), 2], "kernel_sizes": 3, "grn": True, "resample_residual": False},
    {"spatial_dims": 3, "strides": [2, 2], "residual": False, "expansion_ratios": [2, 3, 4, 3, 2]},
]


def _run(model, x, fast):
    model.set_fast_path(fast)
    model.zero_grad(set_to_none=True)
    outs = model(x)
    loss = sum((o.square().mean() + o.mean()) * (i + 1) for i, o in enumerate(outs))
    loss.backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_fast_path_equals_plain_path_float64(cfg):
    torch.manual_seed(len(str(cfg)))
    model = MedNeXt(2, 3, width=8, deep_supervision=True, **cfg).double().train()
    for p in model.parameters():  # fresh random values everywhere, GRN included
        p.data.add_(0.1 * torch.randn_like(p))
    stride = model.total_stride
    x = torch.randn(2, 2, *(2 * s + (s if i == 0 else 0) for i, s in enumerate(stride)), dtype=torch.float64)
    outs_plain, grads_plain = _run(model, x, fast=False)
    outs_fast, grads_fast = _run(model, x, fast=True)
    for a, b in zip(outs_fast, outs_plain, strict=True):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    scale = max(g.abs().max().item() for g in grads_plain.values())
    for name, g in grads_plain.items():
        # Biases right before a per-channel norm have zero true gradient; compare against the global scale.
        torch.testing.assert_close(grads_fast[name], g, rtol=1e-9, atol=1e-11 * scale, msg=name)


def test_fast_path_float32_eval_output():
    torch.manual_seed(3)
    model = create_mednext("S", 1, 4).eval()
    x = torch.randn(1, 1, 32, 32, 48)
    with torch.no_grad():
        model.set_fast_path(False)
        plain = model(x)
        model.set_fast_path(True)
        fast = model(x)
    # float32 rounding through 30 blocks: relative to the output's scale
    assert (fast - plain).abs().max() / plain.abs().max() < 1e-5


def test_fast_path_is_default_and_switchable_by_configuration():
    from mednext import config

    assert create_mednext("S", 1, 2).fast_path
    assert not create_mednext("S", 1, 2, spatial_dims=2).fast_path  # 2D: oneDNN's convs are faster
    with config.override(fast_path=False):  # what MEDNEXT_FAST_PATH=0 sets
        assert not create_mednext("S", 1, 2).fast_path
        assert not create_mednext("S", 1, 2, spatial_dims=2).fast_path
    assert create_mednext("S", 1, 2).fast_path


def test_fast_path_under_cpu_bfloat16_autocast():
    """The custom channels-last ops follow autocast's dtypes, so a bfloat16 autocast step runs
    and stays as close to the float32 result as the plain path's autocast step; every block stays on
    the fast path (PyTorch's CPU conv returns channels-first bfloat16, which our ops lay out again)."""
    from mednext.nn import MedNeXtBlock
    from mednext.nn.layers import is_channels_last

    torch.manual_seed(3)
    model = MedNeXt(2, 3, width=8, deep_supervision=True, spatial_dims=3, strides=[2, 2], kernel_sizes=3).train()
    layouts = {}
    for name, block in model.named_modules():
        if isinstance(block, MedNeXtBlock):
            block.register_forward_pre_hook(
                lambda m, args, name=name: layouts.update({name: is_channels_last(args[0])})
            )
    x = torch.randn(2, 2, 8, 8, 8)
    model.set_fast_path(False)
    ref_out, ref_grads = _run(model, x, fast=False)
    errors = {}
    for fast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.set_fast_path(fast)
            model.zero_grad(set_to_none=True)
            outs = model(x)
            loss = sum((o.float().square().mean() + o.float().mean()) * (i + 1) for i, o in enumerate(outs))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        out_err = max(((o.float() - r).norm() / r.norm()).item() for o, r in zip(outs, ref_out, strict=True))
        scale = max(g.abs().max().item() for g in ref_grads.values())
        grad_err = max((grads[n].float() - g).abs().max().item() / scale for n, g in ref_grads.items())
        errors[fast] = (out_err, grad_err)
        if fast:
            assert len(layouts) == 14 and all(layouts.values()), layouts
    assert errors[True][0] < 3e-2 and errors[True][1] < 3e-2, errors
    assert errors[True][0] < 3 * errors[False][0] + 1e-3, errors  # no worse than autocast's own error


def test_fast_path_traces_as_one_graph_for_torch_compile():
    # The layers read mednext.config each time they run; that read must not break torch.compile's graph
    # (a lock, say, would split the network into one graph per layer). A compiled network runs its plain
    # path on the CPU (docs/decisions.md), so the fast path's layers are traced on a block's channels-last
    # input; the network is traced too.
    import torch._dynamo

    from mednext.nn import MedNeXtBlock
    from mednext.nn.layers import channels_last

    torch.manual_seed(0)
    model = MedNeXt(1, 2, width=8, strides=[2, 2], kernel_sizes=3).eval()
    block = MedNeXtBlock(8, 8, 2, 3).eval()
    for module, x in ((model, torch.randn(1, 1, 16, 16, 16)), (block, channels_last(torch.randn(1, 8, 6, 6, 6)))):
        explained = torch._dynamo.explain(module)(x)
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
