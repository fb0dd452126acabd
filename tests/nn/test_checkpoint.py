"""Our checkpoint format (safetensors + JSON config) and the safe reader for pickled files."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from mednext import load_pretrained
from mednext.nn import MedNeXt, create_mednext
from mednext.nn.weights.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    detect_preset,
    file_kind,
    load_checkpoint,
    safe_torch_load,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kwargs) -> MedNeXt:
    args = {"spatial_dims": 3, "width": 4, "strides": [(1, 2, 2), (2, 2, 2)], "kernel_sizes": [3, 5, 5, 5, 3]}
    return MedNeXt(2, 3, **(args | kwargs))


def test_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    torch.manual_seed(0)
    model = tiny(grn=True, deep_supervision=True, norm="layer", expansion_ratios=[2, 3, 4, 3, 2])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_checkpoint(model, tmp_path / "sub" / "run.safetensors", epoch=12, dataset="Dataset001_Demo")
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["run.safetensors"]  # no temp file left
    loaded, info = load_checkpoint(path)
    assert loaded.config == model.config
    assert info["meta"] == {"epoch": 12, "dataset": "Dataset001_Demo"}
    assert info["preset"] == ""
    assert set(info["versions"]) >= {"mednext", "torch", "python", "safetensors"}
    x = torch.randn(2, 2, 8, 16, 16)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    # load_pretrained reads our format too, and keeps the stored config (strides included)
    again = load_pretrained(path)
    assert again.config == model.config and again.load_report.layout == "mednext"


def test_preset_is_recorded():
    assert detect_preset(create_mednext("B", 1, 4, kernel_size=5, spatial_dims=2).config) == "B"
    assert detect_preset(create_mednext("L", 2, 3, deep_supervision=True, grad_checkpointing=False).config) == "L"
    assert detect_preset(create_mednext("M", 1, 4, width=16).config) == ""
    assert detect_preset(tiny().config) == ""


def test_bad_metadata_leaves_no_file(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tiny(), target, bad=object())
    assert list(tmp_path.iterdir()) == []


def test_damaged_and_foreign_files_name_the_path(tmp_path):
    path = save_checkpoint(tiny(), tmp_path / "model.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_checkpoint(cut)
    # a safetensors file without our metadata cannot say how to build the model
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"stem.weight": torch.zeros(4, 2, 1, 1, 1)}, str(foreign))
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors.*not a mednext checkpoint"):
        load_checkpoint(foreign)
    # a damaged config field
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"]["config"] = "{not json"
    raw = json.dumps(header).encode()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len :])
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*'config'"):
        load_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_checkpoint(tmp_path / "absent.safetensors")
    other = tmp_path / "weights.txt"
    other.write_text("hello world")
    with pytest.raises(CheckpointError, match=r"weights\.txt.*neither a safetensors"):
        file_kind(other)


class CreatesFileWhenUnpickled:
    """Unpickling calls open(path, 'w'): proof that code from the file ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["torch-zip", "pickle"])
def test_code_executing_pickle_is_refused(tmp_path, container):
    # Control: an ordinary unpickler really does create the file, so the crafted pickle is live.
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(str(control)))).close()
    assert control.exists()

    marker = tmp_path / "pwned_marker"
    payload = {"state_dict": tiny().state_dict(), "extra": CreatesFileWhenUnpickled(str(marker))}
    path = tmp_path / "evil.model"
    if container == "torch-zip":
        torch.save(payload, path)
    else:  # a plain pickle of tensors would itself need torch's own byte loader; keep to plain data
        with path.open("wb") as fh:
            pickle.dump({"epoch": 1, "extra": payload["extra"]}, fh, protocol=2)
    assert file_kind(path) == container
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.model.*io\.open|evil\.model.*builtins\.open"):
        load_pretrained(path)
    with pytest.raises(UnsafeCheckpointError, match="never executes pickled code"):
        safe_torch_load(path)
    assert not marker.exists()


def test_plain_data_pickles_load(tmp_path):
    path = tmp_path / "history.pt"
    torch.save({"w": torch.arange(3), "loss": [np.float64(0.25), np.float32(0.5)], "hist": np.zeros(2)}, path)
    data = safe_torch_load(path)
    assert torch.equal(data["w"], torch.arange(3))
    assert data["loss"] == [0.25, 0.5] and data["hist"].tolist() == [0.0, 0.0]


def test_numpy_1_era_pickles_load(tmp_path):
    # nnU-Net v1 checkpoints were written under numpy 1.x, which names its scalar constructor
    # numpy.core.multiarray.scalar (numpy 2 writes numpy._core...): both are allowed.
    path = tmp_path / "old_numpy.model"
    torch.save({"loss": np.float64(0.25), "w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    data = safe_torch_load(path)
    assert data["loss"] == 0.25 and torch.equal(data["w"], torch.ones(2))
