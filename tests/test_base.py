"""The base modules: switches (`mednext.config`) and whole-or-nothing writes (`mednext.files`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from mednext import config
from mednext.errors import ConfigError
from mednext.files import atomic_write, atomic_write_json, atomic_write_text, resolve_device

# ----------------------------------------------------------------------------- config


def test_environment_is_parsed_into_settings(tmp_path):
    settings = config.from_environment(
        {
            "MEDNEXT_FAST_PATH": "0",
            "MEDNEXT_FUSED_BLOCKS": "off",
            "MEDNEXT_KEEP_FREED_MEMORY": "false",
            "MEDNEXT_CUDA_ROUTE": "channels_last",
            "MEDNEXT_CACHE": str(tmp_path),
        }
    )
    assert (settings.fast_path, settings.fused_blocks, settings.keep_freed_memory) == (False, False, False)
    assert settings.cuda_route == config.CudaRoute(layout="channels_last")
    assert settings.cache_dir == tmp_path
    defaults = config.from_environment({"XDG_CACHE_HOME": str(tmp_path)})
    assert (defaults.fast_path, defaults.fused_blocks, defaults.keep_freed_memory) == (True, True, True)
    assert defaults.cache_dir == tmp_path / "mednext"


@pytest.mark.parametrize(
    ("name", "value"),
    [("MEDNEXT_FAST_PATH", "maybe"), ("MEDNEXT_CUDA_ROUTE", "fastest"), ("MEDNEXT_FUSED_BLOCKS", "2")],
)
def test_a_bad_value_names_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        config.from_environment({name: value})


def test_the_environment_is_read_once(monkeypatch):
    monkeypatch.delenv("MEDNEXT_FUSED_BLOCKS", raising=False)
    assert config.reload().fused_blocks is True
    monkeypatch.setenv("MEDNEXT_FUSED_BLOCKS", "0")
    assert config.get().fused_blocks is True  # read once: a later change is not seen
    assert config.reload().fused_blocks is False


def test_setters_and_a_scoped_override():
    config.set_fast_path(False)
    assert config.get().fast_path is False
    with config.override(fast_path=True, cuda_route={"norm": "triton"}) as inside:
        assert inside.fast_path is True and config.get().cuda_route.norm == "triton"
        config.set_fused_blocks(False)  # a setter inside the block ends with it
    assert config.get().fast_path is False and config.get().fused_blocks is True
    assert config.get().cuda_route.norm == "manual"
    config.set_cuda_route("triton", norm="triton")
    assert config.get().cuda_route == config.CudaRoute(layout="channels_last", depthwise="triton", norm="triton")
    with pytest.raises(ConfigError, match="cuda_route.norm"):
        config.set_cuda_route(norm="fastest")


def test_override_restores_after_an_error():
    before = config.get()
    with pytest.raises(RuntimeError), config.override(keep_freed_memory=False):
        raise RuntimeError
    assert config.get() == before


# ----------------------------------------------------------------------------- files


def test_atomic_write_replaces_whole_files(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "a.txt", "first\n")
    assert target.read_text() == "first\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    atomic_write_json(target, {"b": [1, 2]})
    assert target.read_text() == '{\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pth"
    target.write_bytes(b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_torch_save_through_atomic_write(tmp_path):
    path = atomic_write(tmp_path / "t.pt", lambda tmp: torch.save({"w": torch.ones(2)}, tmp))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="use cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
