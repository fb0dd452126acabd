"""The fast depthwise kernels equal PyTorch's convolutions, values and gradients, in float64."""

import pytest
import torch
import torch.nn.functional as F

from mednext.nn.kernels.cpu import depthwise_conv, depthwise_conv_strided, depthwise_conv_transpose


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last_3d if t.ndim == 5 else torch.channels_last)


def _grads(fn, x, w, b):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, w.grad, b.grad


CASES = [
    ((2, 3, 9, 7, 8), (3, 3, 3), (1, 1, 1)),
    ((1, 4, 6, 10, 5), (5, 5, 5), (2, 2, 2)),
    ((2, 3, 8, 6, 6), (1, 3, 3), (1, 2, 2)),
    ((2, 5, 12, 9), (3, 3), (2, 3)),
    ((1, 2, 7, 11), (7, 5), (1, 1)),
]


@pytest.mark.parametrize(("shape", "kernel", "stride"), CASES)
def test_fast_depthwise_ops_match_pytorch(shape, kernel, stride):
    torch.manual_seed(sum(shape))
    c, dims = shape[1], len(shape) - 2
    conv = F.conv3d if dims == 3 else F.conv2d
    conv_t = F.conv_transpose3d if dims == 3 else F.conv_transpose2d
    pad = tuple(k // 2 for k in kernel)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(c, 1, *kernel, dtype=torch.float64)
    b = torch.randn(c, dtype=torch.float64)
    pairs = [
        (lambda x, w, b: depthwise_conv_strided(_cl(x), w, b, stride),
         lambda x, w, b: conv(x, w, b, stride=stride, padding=pad, groups=c)),
        (lambda x, w, b: depthwise_conv_transpose(_cl(x), w, b, stride),
         lambda x, w, b: conv_t(x, w, b, stride=stride, padding=pad, groups=c)),
    ]  # fmt: skip
    if all(s == 1 for s in stride):
        pairs.append((lambda x, w, b: depthwise_conv(_cl(x), w, b), pairs[0][1]))
    for fast, ref in pairs:
        for got, want in zip(_grads(fast, x, w, b), _grads(ref, x, w, b), strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 8), (3, 4, 9, 10)])
def test_channel_group_norm_matches_pytorch_float64(shape):
    from mednext.nn.kernels.cpu import channel_group_norm

    torch.manual_seed(shape[1])
    c = shape[1]
    x, w, b = torch.randn(shape, dtype=torch.float64) * 3 + 2, torch.randn(c, dtype=torch.float64), torch.randn(c)
    b = b.double()
    got = _grads(lambda x, w, b: channel_group_norm(_cl(x), w, b, 1e-5), x, w, b)
    want = _grads(lambda x, w, b: F.group_norm(x, c, w, b, 1e-5), x, w, b)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_channel_group_norm_float32_is_accurate_on_large_volumes():
    """PyTorch's own channels-last kernel loses ~1e-4 here; ours stays near float32 rounding."""
    from mednext.nn.kernels.cpu import channel_group_norm

    torch.manual_seed(0)
    x = torch.randn(1, 4, 48, 48, 48) * 2 + 5
    w, b = torch.randn(4), torch.randn(4)
    ref = F.group_norm(x.double(), 4, w.double(), b.double(), 1e-5)
    got = channel_group_norm(_cl(x), w, b, 1e-5)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 5e-6
