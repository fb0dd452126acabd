"""Keeping freed memory in the process (mednext.memory): nesting, and where the network uses it."""

import resource

import pytest
import torch

from mednext import create_mednext, memory


def _faults_of_big_allocations() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(memory._glibc() is None, reason="glibc only")
def test_nested_blocks_keep_the_outer_setting():
    fresh = _faults_of_big_allocations()  # glibc's defaults: every 64 MiB block mapped and zeroed afresh
    assert fresh > 4 * 10_000
    with memory.reuse_freed_memory():
        with memory.reuse_freed_memory():
            _faults_of_big_allocations()  # the heap grows to hold the block
            _faults_of_big_allocations()
        assert _faults_of_big_allocations() < fresh / 2  # the inner block's end left the setting on
    assert _faults_of_big_allocations() > 4 * 10_000  # the outer block's end restored glibc's defaults


def test_cpu_inference_forward_keeps_freed_memory(monkeypatch):
    entered = []
    original = memory.reuse_freed_memory
    monkeypatch.setattr(memory, "reuse_freed_memory", lambda enable=True: entered.append(enable) or original(enable))
    model = create_mednext("S", 1, 2).eval()
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        out = model(x)
    assert entered == [True]
    model(x)  # gradients on: the training step's memory is the trainer's business (mednext train)
    assert entered == [True]
    monkeypatch.setenv("MEDNEXT_KEEP_FREED_MEMORY", "0")
    with torch.no_grad():
        off = model(x)
    assert entered == [True]
    torch.testing.assert_close(off, out, rtol=0, atol=0)  # the allocator changes nothing in the numbers
    model.set_fast_path(False)
    with torch.no_grad():
        model(x)
    assert entered == [True]  # the plain path is left as PyTorch runs it
