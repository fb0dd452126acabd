"""Keeping freed memory in the process (mednext.memory): nesting, and that the network never sets it."""

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


class _RecordingLibc:
    """Stands in for glibc: records every call that would change or trim the process's heap."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, *args) -> int:
        self.calls.append(("mallopt", *args))
        return 1

    def malloc_trim(self, *args) -> int:
        self.calls.append(("malloc_trim", *args))
        return 0


def test_forward_leaves_the_allocator_alone(monkeypatch):
    # The memory policy belongs to the trainer and the predictor: a model's forward, with gradients
    # or without, fast path or plain, changes nothing process-wide.
    libc = _RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    model = create_mednext("S", 1, 2).eval()
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        out = model(x)
    model(x)
    model.set_fast_path(False)
    with torch.no_grad():
        plain = model(x)
    assert libc.calls == []
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)
    with memory.reuse_freed_memory():  # the recorder does see the policy where it is asked for
        pass
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "mallopt", "mallopt", "malloc_trim"]


def test_keeps_freed_memory_follows_the_configuration():
    from mednext import config

    assert memory.keeps_freed_memory(torch.device("cpu")) == config.get().keep_freed_memory
    with config.override(keep_freed_memory=False):
        assert not memory.keeps_freed_memory(torch.device("cpu"))
    with config.override(keep_freed_memory=True):
        assert memory.keeps_freed_memory(torch.device("cpu"))
        assert not memory.keeps_freed_memory(torch.device("meta"))
