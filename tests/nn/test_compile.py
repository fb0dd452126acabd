"""torch.compile: the network compiles as one graph (``fullgraph=True``: any graph break is an error), in
training and in eval, and gives eager's outputs and gradients.

Compiled on the CPU, the network runs its plain path (PyTorch's convolutions): the CPU fast path's
kernels loop in Python over cache-sized chunks and taps, which the compiler would unroll into a graph
that grows with the patch (docs/decisions.md, "torch.compile"). The fast path's kernels themselves (the
depthwise autograd functions, the fused branch) also trace as one graph; the last test checks that,
through the module-level kernels, so a later change of the policy keeps a tested alternative.

Compiling is slow on a small CPU, so the models are tiny (one stage, one block per position) and the
float64 comparisons use the ``aot_eager`` backend: Dynamo's capture and AOT autograd's joint forward and
backward graph, which is where graph breaks and autograd-function problems show, without Inductor's C++
code generation. One test runs Inductor itself (the default backend, what users get)."""

import pytest
import torch
import torch._dynamo

from mednext import MedNeXt
from mednext.nn.kernels import fused

V2_GRN = {"where": "all", "norm": "sum"}


def _tiny(grn, checkpointing, dtype=torch.float64, block_counts=1) -> MedNeXt:
    torch.manual_seed(0)
    model = MedNeXt(
        2, 3, width=8, strides=[2], block_counts=block_counts, kernel_sizes=3, deep_supervision=True, grn=grn,
        grad_checkpointing=checkpointing,
    ).to(dtype)  # fmt: skip
    for p in model.parameters():  # GRN and the norms' affine parameters off their initial values
        p.data.add_(0.2 * torch.randn_like(p))
    return model


def _step(model, x):
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum((o.square().mean() + o.mean()) * (i + 1) for i, o in enumerate(outs)).backward()
    return [o.detach() for o in outs], [p.grad.clone() for p in model.parameters()]


def _assert_equal(result, reference):
    for a, b in zip(result[0], reference[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    scale = max(g.abs().max().item() for g in reference[1])
    for a, b in zip(result[1], reference[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11 * scale)


@pytest.mark.slow
@pytest.mark.parametrize(("grn", "checkpointing"), [(False, "cheap"), (V2_GRN, True)], ids=["v1-cheap", "v2-grn-block"])
def test_compiled_training_step_equals_eager_float64(grn, checkpointing, monkeypatch):
    calls = []
    original = fused.norm_expand_compress
    monkeypatch.setattr(fused, "norm_expand_compress", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = _tiny(grn, checkpointing).train()
    x = torch.randn(2, 2, 8, 12, 8, dtype=torch.float64)
    eager = _step(model, x)  # the CPU fast path: the fused branch runs in v1 blocks
    assert bool(calls) == (not grn)
    calls.clear()
    torch._dynamo.reset()
    _assert_equal(_step(torch.compile(model, fullgraph=True, backend="aot_eager"), x), eager)
    assert calls == []  # compiled: the plain path


@pytest.mark.slow
def test_inductor_compiles_the_network_in_eval_float32(monkeypatch):
    """Inductor's code (C++ on the CPU) for the eval forward against eager (the fast path) in float32:
    other kernels and summation orders, so float32 rounding relative to the output's scale."""
    # Inductor imports setuptools to build C++; if an earlier test imported the standard library's
    # distutils, setuptools' distutils shim fails on that import unless told to leave distutils alone.
    monkeypatch.setenv("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    model = _tiny(V2_GRN, False, torch.float32, block_counts=[0, 1, 0]).eval()  # down, one block, up
    x = torch.randn(1, 2, 8, 16, 8)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(x)
    assert compiled.shape == eager.shape == (1, 3, 8, 16, 8)
    assert ((compiled - eager).abs().max() / eager.abs().max()).item() < 1e-5


@pytest.mark.slow
def test_fast_path_kernels_trace_as_one_graph_float64():
    """The CPU fast path's custom autograd functions (a block with the fused branch, and a down block with
    the strided depthwise conv and its backward) under Dynamo and AOT autograd, against eager."""
    from mednext.nn import MedNeXtDownBlock
    from mednext.nn.layers import channels_last

    torch.manual_seed(1)
    block = MedNeXtDownBlock(8, 16, 3, 3, stride=2).double().train()
    for p in block.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    x = channels_last(torch.randn(2, 8, 6, 8, 6, dtype=torch.float64))

    def step(fn):
        block.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        out = fn(xi)
        (out.square().mean() + out.mean()).backward()
        return [out.detach(), xi.grad], [p.grad.clone() for p in block.parameters()]

    eager = step(block)
    torch._dynamo.reset()
    compiled = step(torch.compile(block, fullgraph=True, backend="aot_eager"))
    _assert_equal(compiled, eager)
