"""Keeping freed memory in the process (mednext.memory): nesting, and where the network uses it."""

import json
import subprocess
import sys

import pytest
import torch

from mednext import create_mednext, memory

# Run in a fresh process: what glibc does with a large allocation depends on the heap's history, and
# earlier tests in this process leave free chunks in the heap that later allocations reuse.
_NESTED = """
import json, resource, torch
from mednext import memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"fresh": faults()}
with memory.reuse_freed_memory():
    with memory.reuse_freed_memory():
        faults()  # the heap grows to hold the block
    out["after_inner"] = faults()
out["after_outer"] = faults()
print(json.dumps(out))
"""


@pytest.mark.skipif(memory._glibc() is None, reason="glibc only")
def test_nested_blocks_keep_the_outer_setting():
    proc = subprocess.run([sys.executable, "-c", _NESTED], capture_output=True, text=True, check=True)
    faults = json.loads(proc.stdout.strip().splitlines()[-1])
    assert faults["fresh"] > 4 * 10_000  # glibc's defaults: each 64 MiB block mapped and zeroed afresh
    assert faults["after_inner"] < 4 * 1_000  # the inner block's end left the setting on
    # the outer block's end returned the memory: the next blocks are faulted in again
    assert faults["after_outer"] > 10_000


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
