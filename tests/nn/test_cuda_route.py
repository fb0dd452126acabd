"""The CUDA route of the fast path (polyphase strided / transposed depthwise convs, channels-last
group norm, optional Triton kernels) computes the plain path's function.

CI has no GPU, so the route's arithmetic is checked on the CPU (``config.override(force_cuda_route=True)``) in
float64; the Triton kernels themselves are checked when Triton is installed, through its CPU
interpreter (a subprocess, because the interpreter is chosen when the kernels are defined).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mednext import MedNeXt, config
from mednext.nn.kernels import cuda_route
from mednext.nn.kernels.polyphase import depthwise_conv_strided_polyphase, depthwise_conv_transpose_polyphase

ROUTES = [
    {"depthwise": "native", "up": "polyphase", "down": "native", "norm": "manual"},
    {"depthwise": "native", "up": "native", "down": "polyphase", "norm": "native"},
    {"depthwise": "native", "up": "polyphase", "down": "native", "norm": "triton"},  # no Triton: manual
]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [2, 3, "aniso"])
def test_polyphase_forms_equal_pytorch_float64(dims, kernel, stride):
    torch.manual_seed(kernel * 10 + dims)
    stride = (1,) + (2,) * (dims - 1) if stride == "aniso" else (stride,) * dims
    conv = F.conv3d if dims == 3 else F.conv2d
    convt = F.conv_transpose3d if dims == 3 else F.conv_transpose2d
    for size in ([5, 8, 9][:dims], [7, 6, 4][:dims]):
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        x = x.contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
        w = torch.randn(3, 1, *(kernel,) * dims, dtype=torch.float64)
        b = torch.randn(3, dtype=torch.float64)
        ref = convt(x, w, b, stride=stride, padding=kernel // 2, groups=3)
        got = depthwise_conv_transpose_polyphase(x, w, b, stride)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        assert got.movedim(1, -1).is_contiguous()  # stays channels-last
        ref = conv(x, w, b, stride=stride, padding=kernel // 2, groups=3)
        torch.testing.assert_close(depthwise_conv_strided_polyphase(x, w, b, stride), ref, rtol=1e-12, atol=1e-12)


def test_polyphase_gradients_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 5, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    w = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: depthwise_conv_transpose_polyphase(*a, (2, 2, 2)), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: depthwise_conv_strided_polyphase(*a, (2, 1, 2)), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_channels_last_group_norm(dtype):
    torch.manual_seed(1)
    x = (5 + 2 * torch.randn(2, 6, 9, 10, 11, dtype=torch.float64)).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ref = F.group_norm(x, 6, w, b, 1e-5)
    got = cuda_route.group_norm_channels_last(x.to(dtype), w, b, 1e-5)
    assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)  # like autocast's group norm
    assert got.movedim(1, -1).is_contiguous()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.fixture
def forced_route():
    """The CUDA route on CPU tensors; the test sets its parts (``forced_route(norm="native")``)."""
    with config.override(force_cuda_route=True):
        yield config.set_cuda_route


@pytest.mark.parametrize("route", range(len(ROUTES)))
@pytest.mark.parametrize(
    "cfg",
    [
        {"spatial_dims": 3, "strides": [2, (1, 2, 2)], "kernel_sizes": [3, 5, 3, 5, 3]},
        {"spatial_dims": 2, "strides": [2, 2, 2], "kernel_sizes": 5, "grn": True},
    ],
    ids=["3d", "2d"],
)
def test_cuda_route_equals_plain_path_float64(forced_route, route, cfg):
    forced_route(**ROUTES[route])
    torch.manual_seed(route)
    model = MedNeXt(2, 3, width=8, deep_supervision=True, **cfg).double().train()
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    stride = model.total_stride
    x = torch.randn(2, 2, *(2 * s + s for s in stride), dtype=torch.float64)
    results = {}
    for fast in (False, True):
        model.set_fast_path(fast)
        model.zero_grad(set_to_none=True)
        outs = model(x)
        sum((o.square().mean() + o.mean()) * (i + 1) for i, o in enumerate(outs)).backward()
        results[fast] = ([o.detach() for o in outs], [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*(results[f][0] for f in (True, False)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    scale = max(g.abs().max().item() for g in results[False][1])
    for a, b in zip(*(results[f][1] for f in (True, False)), strict=True):
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-10)


TRITON_CHECK = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from mednext.nn.kernels import triton as T
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    worst = 0.0
    for dims, k, s, size in ((2, 3, 2, (5, 6)),):  # the interpreter is slow; GPU runs cover the rest
        c = 3
        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        x = torch.randn(2, c, *size, device=dev).contiguous(memory_format=fmt).requires_grad_(True)
        w = torch.randn(c, 1, *(k,) * dims, device=dev, requires_grad=True)
        b = torch.randn(c, device=dev, requires_grad=True)
        conv, convt = (F.conv3d, F.conv_transpose3d) if dims == 3 else (F.conv2d, F.conv_transpose2d)
        for ours, ref in ((T.depthwise_conv, conv), (T.depthwise_conv_transpose, convt)):
            a = ours(x, w, b, (s,) * dims)
            r = ref(x.double(), w.double(), b.double(), stride=s, padding=k // 2, groups=c)
            g = torch.randn_like(r)
            ga = torch.autograd.grad(a, (x, w, b), g.float())
            gr = torch.autograd.grad(r, (x, w, b), g)
            for u, v in zip((a, *ga), (r, *gr)):
                assert u.shape == v.shape, (u.shape, v.shape)
                worst = max(worst, ((u.double() - v).norm() / v.norm()).item())
    for shape in ((2, 5, 7, 9, 40), (3, 70, 33, 17)):  # group norm: > 1 channel block, > 1 voxel chunk
        fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
        x = (3 + 2 * torch.randn(*shape, device=dev)).contiguous(memory_format=fmt).requires_grad_(True)
        w = torch.randn(shape[1], device=dev, requires_grad=True)
        b = torch.randn(shape[1], device=dev, requires_grad=True)
        a = T.group_norm(x, w, b, 1e-5)
        assert a.dtype == x.dtype and a.is_contiguous(memory_format=fmt)
        r = F.group_norm(x.double(), shape[1], w.double(), b.double(), 1e-5)
        g = torch.randn_like(r)
        ga = torch.autograd.grad(a, (x, w, b), g.float())
        gr = torch.autograd.grad(r, (x, w, b), g)
        for u, v in zip((a, *ga), (r, *gr)):
            worst = max(worst, ((u.double() - v).norm() / v.norm()).item())
    print(worst)
    """
)

NETWORK_CHECK = textwrap.dedent(
    """
    import torch
    from mednext import MedNeXt, config
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = MedNeXt(2, 3, width=4, spatial_dims=2, strides=[2, 2], kernel_sizes=[3, 5, 3, 5, 3], deep_supervision=True)
    model = model.to(dev).train()
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 2, 12, 12, device=dev)
    config.set_cuda_route(layout="channels_last", depthwise="triton", norm="triton")
    res = {}
    for fast in (False, True):
        config.set_force_cuda_route(fast)
        model.set_fast_path(fast)
        model.zero_grad(set_to_none=True)
        outs = model(x)
        sum((o.square().mean() + o.mean()) * (i + 1) for i, o in enumerate(outs)).backward()
        res[fast] = ([o.detach() for o in outs], [p.grad.clone() for p in model.parameters()])
    route = config.get().cuda_route
    assert route.depthwise == "triton" and route.norm == "triton"  # no fallback
    out = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(res[True][0], res[False][0]))
    scale = max(g.abs().max().item() for g in res[False][1])
    grad = max((a - b).abs().max().item() / scale for a, b in zip(res[True][1], res[False][1]))
    print(out, grad)
    """
)


def _run_triton(script: str) -> list[float]:
    env = dict(os.environ)
    if not torch.cuda.is_available():  # the real kernels where a GPU is present
        env["TRITON_INTERPRET"] = "1"
    env.pop("MEDNEXT_CUDA_ROUTE", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [float(v) for v in proc.stdout.strip().splitlines()[-1].split()]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU builds of torch)")
def test_triton_kernels_under_interpreter():
    (worst,) = _run_triton(TRITON_CHECK)
    assert worst < 1e-5  # float32 accumulation against float64


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU builds of torch)")
def test_triton_route_network_equals_plain_path():
    # Depthwise convs and group norms through the Triton kernels, the whole network in float32
    # (with deep supervision, both resampling blocks, k3 and k5) against the plain path.
    out, grad = _run_triton(NETWORK_CHECK)
    assert out < 1e-5 and grad < 1e-5


@pytest.mark.parametrize("part", ["depthwise", "norm"])
def test_unusable_triton_falls_back_to_pytorch_with_a_warning(monkeypatch, part):
    # Triton can be installed yet fail at its first compile (no C compiler, unsupported GPU):
    # the network must warn once and go on with PyTorch's kernels for that part only, same numbers.
    def fail(*args):
        raise RuntimeError("Failed to find C compiler")

    def conv(x, w, b, stride):  # working stand-ins, channels-last out like cuDNN's
        y = F.conv3d(x, w, b, stride, [k // 2 for k in w.shape[2:]], groups=x.shape[1])
        return y.contiguous(memory_format=torch.channels_last_3d)

    def conv_transpose(x, w, b, stride):
        y = F.conv_transpose3d(x, w, b, stride, [k // 2 for k in w.shape[2:]], groups=x.shape[1])
        return y.contiguous(memory_format=torch.channels_last_3d)

    class Kernels:
        MAX_LAST_TAPS = 7
        depthwise_conv = staticmethod(fail if part == "depthwise" else conv)
        depthwise_conv_transpose = staticmethod(fail if part == "depthwise" else conv_transpose)
        group_norm = staticmethod(fail)

    config.set_force_cuda_route(True)
    config.set_cuda_route(depthwise="triton", norm="manual" if part == "depthwise" else "triton")
    monkeypatch.setattr(cuda_route, "triton_kernels", lambda x: Kernels())
    torch.manual_seed(0)
    model = MedNeXt(in_channels=2, num_classes=3, width=8, kernel_sizes=3, spatial_dims=3).double().eval()
    x = torch.randn(1, 2, 32, 16, 16, dtype=torch.float64)
    what = "depthwise kernels" if part == "depthwise" else "group norm kernels"
    with pytest.warns(RuntimeWarning, match=f"Triton {what} failed .*Failed to find C compiler"):
        out = model(x)
    route = config.get().cuda_route
    assert route.norm == "manual"
    assert route.depthwise == ("native" if part == "depthwise" else "triton")  # the other part stays
    model.set_fast_path(False)
    torch.testing.assert_close(out, model(x), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU builds of torch)")
def test_triton_route_hands_float32_weights_to_the_kernels_under_autocast(monkeypatch):
    from mednext.nn.kernels import triton as triton_kernels

    x, w, b = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), torch.randn(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa, wa, ba = triton_kernels._autocast(x, w, b)
        assert xa.dtype == torch.bfloat16 and wa is w and ba is b  # no cast launches, float32 gradients
        config.set_cuda_route(dw_weights="autocast")
        xa, wa, ba = triton_kernels._autocast(x, w, b)
        assert (xa.dtype, wa.dtype, ba.dtype) == (torch.bfloat16,) * 3  # as PyTorch's convolutions see them


class _HostReads(TorchDispatchMode):
    """Records the operations a CUDA graph cannot capture: a tensor's value read on the host (``item``,
    ``bool``), a tensor built from host data (``torch.tensor``: a host-to-device copy on CUDA), and
    outputs whose shape depends on values (``nonzero``, ``masked_select``, ``unique``)."""

    FORBIDDEN = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.nonzero", "aten.masked_select", "aten.unique")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.FORBIDDEN):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _NoLaunch:
    """Stands in for a ``triton.jit`` kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _host_reads_of_a_training_step(model: MedNeXt, x: torch.Tensor, autocast: bool) -> list[str]:
    from mednext.nn import MedNeXtBlock
    from mednext.nn.layers import is_channels_last

    layouts = []
    for block in model.modules():
        if isinstance(block, MedNeXtBlock):
            block.register_forward_pre_hook(lambda module, args: layouts.append(is_channels_last(args[0])))
    model(x)  # first call outside the recording: one-time set-up (compiles, caches) need not be capturable
    with _HostReads() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = sum(o.float().square().mean() for o in model(x))  # every head's backward too
        loss.backward()
    assert layouts and all(layouts), "some block ran off the channels-last route"
    return mode.seen


@pytest.mark.parametrize("route", range(len(ROUTES)))
def test_cuda_route_training_step_has_nothing_a_cuda_graph_cannot_capture(forced_route, route):
    # A CUDA graph (benchmarks/gpu_explore.py's "+graph" variants) cannot capture a step that reads values on
    # the host or copies host data to the device (say, an index tensor built on the host for a polyphase conv);
    # the route's forward and backward do neither, checked on the CPU here.
    forced_route(**ROUTES[route], layout="channels_last")
    torch.manual_seed(0)
    model = MedNeXt(1, 3, width=8, strides=[2, 2], kernel_sizes=[3, 5, 3, 5, 3], deep_supervision=True).train()
    # float32: under CPU autocast PyTorch's CPU convolutions return channels-first bfloat16 (cuDNN keeps the
    # layout), which would take the rest of the network off the route here
    assert _host_reads_of_a_training_step(model, torch.randn(1, 1, 16, 16, 16), autocast=False) == []


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU builds of torch)")
def test_triton_route_training_step_has_nothing_a_cuda_graph_cannot_capture(forced_route, monkeypatch):
    # The Triton wrappers' host code (grids, tiles, statistics buffers), with kernels that launch nothing.
    from mednext.nn.kernels import triton as triton_kernels

    for name in triton_kernels.KERNELS:
        monkeypatch.setattr(triton_kernels, name, _NoLaunch())
    monkeypatch.setattr(cuda_route, "triton_kernels", lambda x: triton_kernels)
    forced_route(layout="channels_last", depthwise="triton", norm="triton")
    torch.manual_seed(0)
    model = MedNeXt(1, 3, width=8, strides=[2, 2], kernel_sizes=[3, 5, 3, 5, 3], deep_supervision=True).train()
    assert _host_reads_of_a_training_step(model, torch.randn(1, 1, 16, 16, 16), autocast=True) == []


def test_unsupported_cuda_route_is_refused_on_first_use_not_at_import():
    script = textwrap.dedent(
        """
        import mednext.nn.layers, mednext.nn.kernels.cuda_route  # importing reads no switch
        from mednext import create_mednext
        from mednext.errors import ConfigError
        try:
            create_mednext("S", 1, 2)
        except ConfigError as err:
            print("ConfigError:", err)
        """
    )
    env = dict(os.environ, MEDNEXT_CUDA_ROUTE="fastest")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ConfigError: MEDNEXT_CUDA_ROUTE='fastest' is not supported" in proc.stdout
