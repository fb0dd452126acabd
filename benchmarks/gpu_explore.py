"""GPU exploration for issue 6 item 5: where MedNeXt's training step spends its time on CUDA.

Run on a CUDA machine: ``PYTHONPATH=src python benchmarks/gpu_explore.py --out DIR``.
Sections (each guarded, so one failure does not lose the rest):

1. correctness on CUDA: our fast path vs the plain path (float32), polyphase ops vs PyTorch's;
2. per-op timings of every depthwise-conv form at MedNeXt-L's full-resolution shapes (fp16);
3. whole training steps (fp16 autocast + GradScaler, deep supervision, AdamW) of MONAI's MedNeXt
   (NCDHW and channels_last_3d) and ours, with peak memory;
4. the profiler's top kernels of one MONAI training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

RESULTS: dict = {}
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a dry run of this script
AMP_DTYPE = torch.float16 if DEV == "cuda" else torch.bfloat16


SHAPES = {"s1": ((32, 128), (64, 64)), "down": ((32, 128),), "up": ((64, 64),), "gn": 128}
if DEV == "cpu":
    SHAPES = {"s1": ((32, 16),), "down": ((32, 16),), "up": ((64, 8),), "gn": 16}


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


OUT_DIR = os.environ.get("OUT", ".")  # main() sets it from --out


def dump() -> None:
    with open(os.path.join(OUT_DIR, "gpu_explore.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def log(*args) -> None:
    print(*args, flush=True)


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        if DEV == "cpu":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def section(name):
    def wrap(fn):
        def run(*a, **k):
            log(f"\n=== {name} ===")
            t0 = time.time()
            try:
                fn(*a, **k)
            except Exception:
                log(traceback.format_exc()[-3000:])
                RESULTS.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            log(f"--- {name}: {time.time() - t0:.1f} s")

        return run

    return wrap


# GPU_FORMS="ncdhw:native,cl:triton" limits the ops section to those layout:form pairs
FORMS = os.environ.get("GPU_FORMS")


def wanted(layout: str, form: str) -> bool:
    return FORMS is None or f"{layout}:{form}" in FORMS.split(",")


def cl(t):
    return t.contiguous(memory_format=torch.channels_last_3d)


def parse_variant(name: str) -> tuple[str, dict]:
    """ "ours@layout=channels_last,depthwise=triton+ckpt" -> ("ours", {"layout": ..., "depthwise": ...})."""
    base, _, route = name.split("+")[0].partition("@")
    return base, dict(kv.split("=") for kv in route.split(",")) if route else {}


def set_route(default, overrides: dict | None = None) -> None:
    """The CUDA route := ``default`` (a mednext.config.CudaRoute), then the overrides (its parts)."""
    from mednext import config

    config.set_cuda_route(default, **(overrides or {}))


@section("correctness")
def correctness():
    from mednext import create_mednext
    from mednext.nn.kernels import cuda_route, polyphase

    out = {}
    torch.backends.cudnn.allow_tf32 = False  # the plain path's convs would otherwise run in TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    kernels = cuda_route.triton_kernels(torch.empty(0, device=DEV))
    if kernels is not None:
        for dims in (3, 2):
            for k in (3, 5, 1):
                for s in (1, 2):
                    c = 24 if k != 1 else 40
                    size = (13, 18, 21)[-dims:]
                    x = torch.randn(2, c, *size, device=DEV)
                    x = x.contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
                    x.requires_grad_(True)
                    w = torch.randn(c, 1, *(k,) * dims, device=DEV, requires_grad=True)
                    b = torch.randn(c, device=DEV, requires_grad=True)
                    conv = F.conv3d if dims == 3 else F.conv2d
                    convt = F.conv_transpose3d if dims == 3 else F.conv_transpose2d
                    for name, fn, ref in (
                        (
                            "conv",
                            lambda: kernels.depthwise_conv(x, w, b, (s,) * dims),
                            lambda: conv(x.double(), w.double(), b.double(), stride=s, padding=k // 2, groups=c),
                        ),
                        (
                            "convT",
                            lambda: kernels.depthwise_conv_transpose(x, w, b, (s,) * dims),
                            lambda: convt(x.double(), w.double(), b.double(), stride=s, padding=k // 2, groups=c),
                        ),
                    ):
                        a, r = fn(), ref()
                        g = torch.randn_like(r)
                        ga = torch.autograd.grad(a, (x, w, b), g.float())
                        gr = torch.autograd.grad(r, (x, w, b), g)
                        rel = max(((u.double() - v).norm() / v.norm()).item() for u, v in zip((a, *ga), (r, *gr)))
                        out[f"triton {name} {dims}D k{k} s{s}"] = rel
                        log(f"triton {name} {dims}D k{k} s{s}: max rel error (out, gx, gw, gb) vs float64 {rel:.2e}")
    for dims, preset, k, size in ((3, "S", 3, 32), (3, "L", 5, 32), (2, "S", 5, 64)):
        m = (
            create_mednext(
                preset, kernel_size=k, spatial_dims=dims, in_channels=2, num_classes=3, deep_supervision=True
            )
            .to(DEV)
            .train()
        )
        m.set_grad_checkpointing(False)
        m.set_deep_supervision(True)
        x = torch.randn(2, 2, *(size,) * dims, device=DEV)
        res = {}
        for fast in (False, True):
            m.set_fast_path(fast)
            m.zero_grad()
            outs = m(x)
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=DEV).view_as(o)).sum() for o in outs)
            loss.backward()
            res[fast] = ([o.detach().clone() for o in outs], [p.grad.clone() for p in m.parameters()])
        fo = max(((a - b).norm() / b.norm()).item() for a, b in zip(res[True][0], res[False][0]))
        # conv1 biases feed a group norm, so their true gradient is 0 and only a global scale is meaningful
        scale = max(b.abs().max().item() for b in res[False][1])
        fg = max((a - b).abs().max().item() for a, b in zip(res[True][1], res[False][1])) / scale
        out[f"{preset}k{k} {dims}D"] = {"outputs_rel": fo, "grads_rel_max": fg}
        log(f"fast vs plain {preset} k{k} {dims}D: outputs {fo:.2e}, grads (max abs diff / max abs grad) {fg:.2e}")
    c = 16
    for k in (3, 5):
        x = cl(torch.randn(2, c, 20, 22, 24, device=DEV, requires_grad=True))
        w = torch.randn(c, 1, k, k, k, device=DEV, requires_grad=True)
        for name, fn, ref in (
            (
                "transpose",
                lambda: polyphase.depthwise_conv_transpose_polyphase(x, w, None, (2, 2, 2)),
                lambda: F.conv_transpose3d(x, w, None, stride=2, padding=k // 2, groups=c),
            ),
            (
                "strided",
                lambda: polyphase.depthwise_conv_strided_polyphase(x, w, None, (2, 2, 2)),
                lambda: F.conv3d(x, w, None, stride=2, padding=k // 2, groups=c),
            ),
        ):
            torch.backends.cudnn.allow_tf32 = False
            a, b = fn(), ref()
            ga = torch.autograd.grad(a, (x, w), torch.ones_like(a))
            gb = torch.autograd.grad(b, (x, w), torch.ones_like(b))
            rel = max(((a - b).norm() / b.norm()).item(), *(((u - v).norm() / v.norm()).item() for u, v in zip(ga, gb)))
            out[f"polyphase {name} k{k}"] = rel
            log(f"polyphase {name} k{k}: {rel:.2e}")
    RESULTS["correctness"] = out
    dump()


@section("route_check")
def route_check(preset: str = "L", kernel: int = 5, size: int = 64):
    """The chosen CUDA route (e.g. the Triton kernels) against the plain path on one network,
    float32 with TF32 off: outputs and every parameter gradient, on a fresh random input."""
    from mednext import config, create_mednext

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(2)
    m = create_mednext(preset, kernel_size=kernel, in_channels=1, num_classes=4, deep_supervision=True).to(DEV)
    m.train().set_grad_checkpointing(False)
    x = torch.randn(1, 1, size, size, size, device=DEV)
    default_route = config.get().cuda_route
    res = {}
    routes = {
        "plain": {"layout": "plain", "depthwise": "native"},
        "triton": {"layout": "channels_last", "depthwise": "triton"},
    }
    for route, overrides in routes.items():
        set_route(default_route, overrides)
        m.zero_grad()
        t0 = time.time()
        outs = m(x)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=DEV).view_as(o)).sum() for o in outs)
        loss.backward()
        sync()
        res[route] = ([o.detach().clone() for o in outs], [p.grad.clone() for p in m.parameters()])
        log(f"route_check {route}: first forward+backward {time.time() - t0:.1f} s")
    set_route(default_route)
    fo = max(((a - b).norm() / b.norm()).item() for a, b in zip(res["triton"][0], res["plain"][0]))
    scale = max(b.abs().max().item() for b in res["plain"][1])
    fg = max((a - b).abs().max().item() for a, b in zip(res["triton"][1], res["plain"][1])) / scale
    RESULTS["route_check"] = {f"{preset}k{kernel} {size}^3": {"outputs_rel": fo, "grads_rel_max": fg}}
    log(f"route_check triton vs plain {preset} k{kernel} {size}^3 float32: outputs {fo:.2e}, grads {fg:.2e}")
    dump()


def sweep(module, attr: str, values, run, label: str, keep_fastest: bool, repeats: int = 5) -> dict:
    """Time ``run`` with ``module.attr`` set to each value; then keep the fastest value if
    ``keep_fastest``, else restore the value it had (so later sections run the chosen setting)."""
    before = getattr(module, attr)
    times = {}
    for value in values:
        setattr(module, attr, value)
        with torch.no_grad():
            times[value] = timed(run, repeats=repeats)
        log(f"{label}, {attr}={value}: {times[value]:.2f} ms")
    setattr(module, attr, min(times, key=times.get) if keep_fastest else before)
    if keep_fastest:
        RESULTS[attr] = getattr(module, attr)
        log(f"{attr} set to {getattr(module, attr)}")
    return times


def time_forms(res: dict, prefix: str, layout: str, forms: dict, x, w, fb, fwd_repeats: int, fwd_warmup: int) -> None:
    """Forward and forward+backward time of each wanted form of one conv on (x, w)."""
    for name, fn in forms.items():
        if not wanted(layout, name):
            continue
        key = f"{prefix} {name}"
        try:
            with torch.no_grad():
                f = timed(lambda: fn(x, w), repeats=fwd_repeats, warmup=fwd_warmup)
            fbt = timed(fb(fn, x, w), repeats=3, warmup=1)
            res[key] = {"fwd_ms": f, "fwd_bwd_ms": fbt}
            log(f"{key}: fwd {f:.2f} ms, fwd+bwd {fbt:.2f} ms")
        except Exception as e:  # noqa: BLE001
            log(f"{key}: failed {e}")


@section("ops")
def op_timings():
    from mednext.nn.kernels import cuda_route, polyphase

    res = {}
    torch.backends.cudnn.benchmark = True
    half = torch.float16 if DEV == "cuda" else torch.float32

    def fb(fn, x, w):
        def run():
            y = fn(x, w)
            torch.autograd.grad(y, (x, w), torch.ones_like(y))

        return run

    # stride-1 depthwise k5 at L's stage shapes (batch 2)
    for c, s in SHAPES["s1"]:
        for layout in ("ncdhw", "cl"):
            x = torch.randn(2, c, s, s, s, device=DEV, dtype=half)
            x = cl(x) if layout == "cl" else x
            x.requires_grad_(True)
            w = torch.randn(c, 1, 5, 5, 5, device=DEV, dtype=half, requires_grad=True)
            native = lambda x, w: F.conv3d(x, w, None, padding=2, groups=x.shape[1])  # noqa: E731
            key = f"dw k5 s1 {c}x{s}^3 {layout}"
            if wanted(layout, "native"):
                with torch.no_grad():
                    f = timed(lambda: native(x, w))
                fbt = timed(fb(native, x, w), repeats=3, warmup=1)
                res[key] = {"fwd_ms": f, "fwd_bwd_ms": fbt}
                log(f"{key}: fwd {f:.2f} ms, fwd+bwd {fbt:.2f} ms")
            kernels = cuda_route.triton_kernels(x)
            if layout == "cl" and kernels is not None and wanted(layout, "triton"):
                tri = lambda x, w: kernels.depthwise_conv(x, w, None, (1, 1, 1))  # noqa: E731
                full_res = c == SHAPES["s1"][0][0]  # the settings are chosen at the full-resolution stage
                by_rows = sweep(kernels, "FWD_ROWS", (1, 2, 4), lambda: tri(x, w), f"{key} triton fwd", full_res)
                with torch.no_grad():
                    f = timed(lambda: tri(x, w))
                fbt = timed(fb(tri, x, w), repeats=3, warmup=1)
                g = torch.ones_like(x)
                sweep(
                    kernels,
                    "WGRAD_PROGRAMS_PER_SM",
                    (2, 4, 8, 16),
                    lambda: kernels.weight_grad(x, g, (5, 5, 5), (1, 1, 1), (2, 2, 2)),
                    f"{key} triton weight grad",
                    full_res,
                    repeats=3,
                )
                with torch.no_grad():
                    wg = timed(lambda: kernels.weight_grad(x, g, (5, 5, 5), (1, 1, 1), (2, 2, 2)), repeats=3)
                    xg = timed(lambda: kernels.transposed(g, w, None, (1, 1, 1), tuple(x.shape[2:])), repeats=3)
                res[key + " triton"] = {"fwd_ms": f, "fwd_bwd_ms": fbt, "wgrad_ms": wg, "xgrad_ms": xg, "rows": by_rows}
                log(f"{key} triton: fwd {f:.2f} ms, fwd+bwd {fbt:.2f} ms (weight grad {wg:.2f}, input grad {xg:.2f})")
    # strided (down) and transposed (up) k5, stride 2, at the full-resolution stage
    for c, s in SHAPES["down"]:
        for layout in ("ncdhw", "cl"):
            x = torch.randn(2, c, s, s, s, device=DEV, dtype=half)
            x = (cl(x) if layout == "cl" else x).requires_grad_(True)
            w = torch.randn(c, 1, 5, 5, 5, device=DEV, dtype=half, requires_grad=True)
            forms = {
                "native": lambda x, w: F.conv3d(x, w, None, stride=2, padding=2, groups=x.shape[1]),
                "subsample": lambda x, w: F.conv3d(x, w, None, padding=2, groups=x.shape[1])[:, :, ::2, ::2, ::2],
                "polyphase": lambda x, w: polyphase.depthwise_conv_strided_polyphase(x, w, None, (2, 2, 2)),
                "triton": lambda x, w: cuda_route.triton_kernels(x).depthwise_conv(x, w, None, (2, 2, 2)),
            }
            time_forms(res, f"down k5 s2 {c}x{s}^3 {layout}", layout, forms, x, w, fb, fwd_repeats=5, fwd_warmup=2)
    for c, s in SHAPES["up"]:
        for layout in ("ncdhw", "cl"):
            x = torch.randn(2, c, s, s, s, device=DEV, dtype=half)
            x = (cl(x) if layout == "cl" else x).requires_grad_(True)
            w = torch.randn(c, 1, 5, 5, 5, device=DEV, dtype=half, requires_grad=True)

            def zero_insert(x, w):
                n, c, *sp = x.shape
                up = x.new_zeros((n, c, *((v - 1) * 2 + 1 for v in sp)))
                up = cl(up) if layout == "cl" else up
                up[:, :, ::2, ::2, ::2] = x
                return F.conv3d(up, w.flip((2, 3, 4)), None, padding=2, groups=c)

            forms = {
                "native": lambda x, w: F.conv_transpose3d(x, w, None, stride=2, padding=2, groups=x.shape[1]),
                "zero-insert": zero_insert,
                "polyphase": lambda x, w: polyphase.depthwise_conv_transpose_polyphase(x, w, None, (2, 2, 2)),
                "triton": lambda x, w: cuda_route.triton_kernels(x).depthwise_conv_transpose(x, w, None, (2, 2, 2)),
            }
            time_forms(res, f"up k5 s2 {c}x{s}^3 {layout}", layout, forms, x, w, fb, fwd_repeats=3, fwd_warmup=1)
    # group norm and GELU at the full-resolution stage (fp16 in, autocast semantics)
    for layout in ("ncdhw", "cl"):
        x = torch.randn(2, 32, *(SHAPES["gn"],) * 3, device=DEV, dtype=half)
        x = (cl(x) if layout == "cl" else x).requires_grad_(True)
        gn = torch.nn.GroupNorm(32, 32).to(DEV)
        with torch.autocast(DEV, dtype=AMP_DTYPE):
            f = timed(lambda: gn(x))
            y = gn(x)
            log(
                f"GN {layout}: out dtype {y.dtype}, channels-last out {y.is_contiguous(memory_format=torch.channels_last_3d)}"
            )

            def gnfb():
                y = gn(x)
                torch.autograd.grad(y, (x,), torch.ones_like(y))

            fbt = timed(gnfb, repeats=3, warmup=1)
        res[f"groupnorm 32x128^3 {layout}"] = {"fwd_ms": f, "fwd_bwd_ms": fbt}
        log(f"groupnorm {layout}: fwd {f:.2f} ms, fwd+bwd {fbt:.2f} ms")
    RESULTS["ops"] = res
    dump()


@section("candidates")
def candidates():
    """Session-6 candidates, per op under fp16 autocast at L's first two stage shapes: group norm
    (PyTorch's on NCDHW, ours "manual" on channels-last, the Triton kernels) forward and forward +
    backward; the depthwise weight gradient with and without the bias gradient fused into it, against
    the separate sum it replaces; the forward kernel's tile and warps and the weight gradient's warps
    (timed, then restored: the steps run the shipped settings)."""
    from mednext.nn.kernels import cuda_route

    kernels = cuda_route.triton_kernels(torch.empty(1, device=DEV))
    reps, warm = (5, 2) if DEV == "cuda" else (1, 0)  # the CPU dry run goes through Triton's interpreter
    res = {}
    for c, s in SHAPES["s1"]:
        key = f"2x{c}x{s}^3"
        base = torch.randn(2, c, s, s, s, device=DEV, dtype=torch.float16 if DEV == "cuda" else torch.float32)
        w = torch.randn(c, device=DEV, requires_grad=True)
        b = torch.randn(c, device=DEV, requires_grad=True)
        forms = {
            "native ncdhw": (base, lambda x: F.group_norm(x, c, w, b, 1e-5)),
            "manual cl": (cl(base), lambda x: cuda_route.group_norm_channels_last(x, w, b, 1e-5)),
        }
        if kernels is not None:
            forms["triton cl"] = (cl(base), lambda x: kernels.group_norm(x, w, b, 1e-5))
        for name, (x0, fn) in forms.items():
            x = x0.detach().requires_grad_(True)
            with torch.autocast(DEV, dtype=AMP_DTYPE):
                with torch.no_grad():
                    f = timed(lambda: fn(x), repeats=reps, warmup=warm)

                def fwd_bwd():
                    y = fn(x)
                    torch.autograd.grad(y, (x, w, b), torch.ones_like(y))

                fbt = timed(fwd_bwd, repeats=reps, warmup=warm)
            res[f"{key} groupnorm {name}"] = {"fwd_ms": f, "fwd_bwd_ms": fbt}
            log(f"{key} groupnorm {name}: fwd {f:.2f} ms, fwd+bwd {fbt:.2f} ms")
        if kernels is None:
            continue
        x = cl(base)
        g = torch.randn_like(x)
        with torch.no_grad():
            plain = timed(lambda: kernels.weight_grad(x, g, (5, 5, 5), (1, 1, 1), (2, 2, 2)), reps, warm)
            fused = timed(
                lambda: kernels.weight_grad(x, g, (5, 5, 5), (1, 1, 1), (2, 2, 2), bias_grad=True), reps, warm
            )
            bsum = timed(lambda: kernels._bias_grad(g, w), reps, warm)
            gw, gb = kernels.weight_grad(x, g, (5, 5, 5), (1, 1, 1), (2, 2, 2), bias_grad=True)
            err = ((gb - kernels._bias_grad(g, w)).abs().max() / g.float().sum((0, 2, 3, 4)).abs().max()).item()
        w5 = torch.randn(c, 1, 5, 5, 5, device=DEV)
        res[f"{key} k5 fwd tile"] = sweep(
            kernels, "FWD_TILE", (512, 1024, 2048), lambda: kernels.depthwise_conv(x, w5, None, (1, 1, 1)),
            f"{key} k5 fwd", False, reps,
        )  # fmt: skip
        res[f"{key} k5 fwd warps"] = sweep(
            kernels, "FWD_WARPS", (2, 4, 8), lambda: kernels.depthwise_conv(x, w5, None, (1, 1, 1)),
            f"{key} k5 fwd", False, reps,
        )  # fmt: skip
        res[f"{key} k5 wgrad warps"] = sweep(
            kernels, "WGRAD_WARPS", (2, 4, 8), lambda: kernels.weight_grad(x, g, (5, 5, 5), (1, 1, 1), (2, 2, 2)),
            f"{key} k5 weight grad", False, reps,
        )  # fmt: skip
        res[f"{key} k5 weight grad"] = {
            "alone_ms": plain,
            "with_bias_ms": fused,
            "bias_sum_ms": bsum,
            "bias_rel_err": err,
        }
        log(
            f"{key} k5 weight grad {plain:.2f} ms, with bias {fused:.2f} ms, separate bias sum {bsum:.2f} ms (err {err:.1e})"
        )
    RESULTS["candidates"] = res
    dump()


def amp_step(model, x, target, opt, scaler, cache_enabled: bool = True):
    """One training step; ``cache_enabled=False`` for a graphed network (graph capture needs autocast's
    cast cache off)."""
    from mednext.nn.summary import deep_supervision_loss

    opt.zero_grad(set_to_none=True)
    with torch.autocast(DEV, dtype=AMP_DTYPE, cache_enabled=cache_enabled):
        loss = deep_supervision_loss(model(x), target)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


class _TupleOut(torch.nn.Module):
    """The network with its deep-supervision list returned as a tuple (what graph capture accepts)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def graphed(model, x):
    """``torch.cuda.make_graphed_callables`` on the network's forward and backward, captured under the
    benchmark's autocast (with its cast cache off, as graph capture requires). Loss, GradScaler and AdamW
    stay outside the graph."""
    with torch.autocast(DEV, dtype=AMP_DTYPE, cache_enabled=False):
        return torch.cuda.make_graphed_callables(_TupleOut(model), (x,), num_warmup_iters=3)


@section("steps")
def steps(preset: str, kernel: int, size: int, batch: int, variants: list[str]):
    from mednext.bench.step import build_variants

    torch.backends.cudnn.benchmark = True
    models = build_variants(preset, kernel, 3, 1, 4)
    if any(parse_variant(name)[0] == "v2" for name in variants):  # MedNeXt-v2 Base (k3; MONAI has no v2)
        from mednext import create_mednext

        models["v2"] = create_mednext("v2-base", 1, 4, deep_supervision=True, grad_checkpointing=False)
    res = {}
    torch.manual_seed(1)
    x = torch.randn(batch, 1, size, size, size, device=DEV)
    target = torch.randint(0, 4, (batch, size, size, size), device=DEV)
    from mednext import config

    default_route = config.get().cuda_route
    for name in variants:
        base, overrides = parse_variant(name)  # e.g. ours@norm=native,down=polyphase+ckpt
        set_route(default_route, overrides)
        model = models[base].to(DEV).train()
        mode = "cheap" if "+cheap" in name else ("+ckpt" in name)
        model.set_grad_checkpointing(mode) if hasattr(model, "set_grad_checkpointing") else None
        xi = x.contiguous(memory_format=torch.channels_last_3d) if base == "monai_cl" else x
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=3e-5, eps=1e-4)
        scaler = torch.amp.GradScaler(DEV)
        graph = "+graph" in name
        try:
            t0 = time.time()
            runner = graphed(model, xi) if graph else model
            if "+compile" in name:  # torch.compile, default backend; its first step includes compilation
                runner = model = torch.compile(model)
            amp_step(runner, xi, target, opt, scaler, cache_enabled=not graph)
            sync()
            first = time.time() - t0
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if DEV == "cuda" else 0
            ms = timed(lambda: amp_step(runner, xi, target, opt, scaler, cache_enabled=not graph), repeats=3, warmup=0)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if DEV == "cuda" else float("nan")
            model.eval()
            with torch.no_grad(), torch.autocast(DEV, dtype=AMP_DTYPE):
                inf = timed(lambda: model(xi), repeats=3, warmup=1)
            res[name] = {"train_ms": ms, "infer_ms": inf, "peak_mib": peak, "first_s": first}
            log(
                f"{preset} k{kernel} {size}^3 b{batch} {name}: train {ms:.1f} ms, infer {inf:.1f} ms, peak {peak:,.0f} MiB (first step {first:.1f} s)"
            )
        except Exception as e:  # noqa: BLE001
            log(f"{name}: failed {str(e)[:500]}")
            res[name] = {"error": str(e)[:500]}
        model.cpu()
        opt = scaler = None  # free the optimizer state before the next variant
        if DEV == "cuda":
            torch.cuda.empty_cache()
        RESULTS.setdefault("steps", {})[f"{preset}k{kernel} {size} b{batch}"] = res
        dump()
    set_route(default_route)


@section("profile")
def profile(preset: str, kernel: int, size: int, batch: int, variant: str, out_dir: str):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from mednext import config
    from mednext.bench.step import build_variants

    torch.backends.cudnn.benchmark = True
    variant, overrides = parse_variant(variant)  # e.g. ours@layout=channels_last,depthwise=triton
    set_route(config.get().cuda_route, overrides)
    model = build_variants(preset, kernel, 3, 1, 4)[variant].to(DEV).train()
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)
    x = torch.randn(batch, 1, size, size, size, device=DEV)
    if variant == "monai_cl":
        x = cl(x)
    target = torch.randint(0, 4, (batch, size, size, size), device=DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(DEV)
    for _ in range(2):
        amp_step(model, x, target, opt, scaler)
    sync()
    with tprofile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        amp_step(model, x, target, opt, scaler)
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    log(table[-9000:])
    with open(os.path.join(out_dir, f"profile_{variant}.txt"), "w") as f:
        f.write(table)
        f.write("\n\nby input shape\n")
        f.write(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="cuda_time_total", row_limit=60, max_name_column_width=60
            )
        )


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--sections", nargs="+", default=["correctness", "ops", "steps", "profile"])
    p.add_argument(
        "--variants",
        nargs="+",
        default=[
            "monai",
            "monai_cl",
            "ours_plain",
            "ours",
            "ours@norm=native",
            "ours@down=polyphase",
            "ours+ckpt",
            "ours_plain+ckpt",
        ],
        help="monai, monai_cl, ours, ours_plain, v2 (MedNeXt-v2 Base, ours only), each with optional "
        "@route parts and +ckpt, +cheap, +graph or +compile (torch.compile)",
    )
    p.add_argument("--preset", default="L")
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    global OUT_DIR
    OUT_DIR = args.out
    gpu = torch.cuda.get_device_name(0) if DEV == "cuda" else "none (CPU dry run)"
    log(f"torch {torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, {gpu}")
    RESULTS["env"] = {"torch": torch.__version__, "gpu": gpu, "cudnn": torch.backends.cudnn.version()}
    for name in args.sections:  # in the order given
        if name == "correctness":
            correctness()
        elif name == "route_check":
            route_check(args.preset, args.kernel, 64)
        elif name == "ops":
            op_timings()
        elif name == "candidates":
            candidates()
        elif name == "steps":
            steps(args.preset, args.kernel, args.size, args.batch, args.variants)
        elif name.startswith("profile"):  # profile or profile:VARIANT
            variant = name.split(":")[1] if ":" in name else "monai"
            profile(args.preset, args.kernel, args.size, args.batch, variant, args.out)
        elif name.startswith("also:"):  # also:S:3 runs MONAI and ours (Triton route) for another preset, kernel
            _, preset, kernel = name.split(":")
            steps(preset, int(kernel), args.size, args.batch, ["monai", "ours@layout=channels_last,depthwise=triton"])
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
