"""`mednext summary`: MACs against the reference README, the table, memory, and the command."""

import pytest

from mednext.cli import main
from mednext.nn import MedNeXt
from mednext.nn.summary import model_summary, summarize, training_step_memory

# Reference README GFLOPs column = G multiply-accumulates of one 128^3 forward pass.
REFERENCE_GMACS = {
    ("S", 3): 130,
    ("S", 5): 169,
    ("B", 3): 170,
    ("B", 5): 208,
    ("M", 3): 248,
    ("M", 5): 308,
    ("L", 3): 500,
    ("L", 5): 564,
}


@pytest.mark.parametrize(("preset", "kernel"), list(REFERENCE_GMACS))
def test_macs_within_5_percent_of_reference(preset, kernel):
    s = model_summary(preset, kernel_size=kernel)
    assert abs(s.total_macs / 1e9 / REFERENCE_GMACS[(preset, kernel)] - 1) < 0.05


def test_table_rows_add_up():
    s = model_summary("S", input_size=(64, 64, 64))
    names = [r.name for r in s.rows]
    assert names[:3] == ["stem", "enc_block_0", "down_0"] and names[-1] == "out_4"
    assert sum(r.parameters for r in s.rows) == s.total_parameters == 5_554_836
    assert sum(r.macs for r in s.rows) == s.total_macs
    row = {r.name: r for r in s.rows}
    assert row["bottleneck"].resolution == (4, 4, 4) and row["bottleneck"].channels == 512
    assert row["enc_block_2"].blocks == 2
    # Convs on the N-voxel grids scale with the voxel count (64^3 is 1/8 of 128^3); the up blocks'
    # 1x1 convs run on the (2N-1)^3 grid before padding, so they grow a little faster.
    big = {r.name: r.macs for r in model_summary("S").rows}
    assert all(big[r.name] == 8 * r.macs for r in s.rows if not r.name.startswith("up_"))
    assert all(big[r.name] > 8 * r.macs for r in s.rows if r.name.startswith("up_"))
    assert "5,554,836" in s.format()


def test_summary_of_anisotropic_custom_model():
    model = MedNeXt(1, 2, strides=[(1, 2, 2), 2], width=8, spatial_dims=3)
    s = summarize(model, (8, 32, 32))
    assert {r.name: r.resolution for r in s.rows}["bottleneck"] == (4, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        summarize(model, (7, 32, 32))


@pytest.mark.slow
def test_training_step_memory_drops_with_checkpointing():
    model = MedNeXt(1, 3, width=8, strides=[2, 2], deep_supervision=True)
    plain = training_step_memory(model, 1, (64, 64, 64))
    model.set_grad_checkpointing(True)
    ckpt = training_step_memory(model, 1, (64, 64, 64))
    assert plain["peak_mib"] > 200  # activations of a 64^3 patch at width 8 and 16, several hundred MiB
    assert ckpt["peak_mib"] < 0.85 * plain["peak_mib"]
    assert ckpt["grad_checkpointing"] and not plain["grad_checkpointing"]


def test_cli_summary_prints_table(capsys):
    assert main(["summary", "--model", "b", "--kernel", "5", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "10,959,860" in out and "dec_block_0" in out


def test_cli_summary_errors(capsys):
    assert main(["summary", "--model", "XL"]) == 2
    assert "valid presets are S, B, M, L" in capsys.readouterr().err
    assert main(["summary", "--size", "100"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_saved_activations_counted_on_meta_equal_a_real_forward():
    import torch

    from mednext.nn.summary import saved_activation_bytes

    torch.manual_seed(0)
    model = MedNeXt(1, 3, width=8, strides=[2, 2], deep_supervision=True, grn={"where": "all", "norm": "sum"})
    model.train().set_fast_path(False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model(torch.randn(2, 1, 16, 24, 16))
    assert len(outputs) == 3
    assert saved_activation_bytes(model, 2, (16, 24, 16)) == sum(saved.values()) > 2 * 16 * 24 * 16 * 8 * 4


def test_cli_summary_of_v2(capsys):
    args = ["summary", "--model", "v2-base", "--classes", "3", "--no-deep-supervision", "--size", "64", "--json"]
    assert main(args) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["total_parameters"] == 61_969_507
    assert out["saved_activations"]["bytes"] > 0 and out["saved_activations"]["batch"] == 2
    # v2-base's convolutions are L k3's; only GRN (not counted) differs
    assert (
        out["total_macs"] == model_summary("L", num_classes=3, input_size=(64,) * 3, deep_supervision=False).total_macs
    )
