"""Full-volume prediction benchmark and the CPU sliding window of `mednext predict` (small volumes)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nnunetv2")
pytest.importorskip("monai")
sitk = pytest.importorskip("SimpleITK")

from mednext.bench.predict import (  # noqa: E402
    agreement,
    count_tiles,
    run_predict_benchmark,
    run_variant,
    setup_benchmark,
    write_markdown,
)

TINY = {"width": 8, "block_counts": 1}  # S's layout (4 stages, k3), narrow and shallow


def _ct(shape_zyx=(24, 40, 44), seed=0):
    """A CT-like volume (HU): air around a soft-tissue body with a brighter organ."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape_zyx)
    body = ((y - shape_zyx[1] / 2) / (shape_zyx[1] / 2.4)) ** 2 + ((x - shape_zyx[2] / 2) / (shape_zyx[2] / 2.4)) ** 2
    array = np.where(body < 1, 40.0, -1000.0) + rng.normal(0, 20, shape_zyx)
    array[(body < 0.2) & (z > 4)] += 60
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((3.0, 3.0, 3.0))
    return image


@pytest.fixture()
def setup(tmp_path, monkeypatch, one_thread):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    return setup_benchmark(tmp_path / "bench", _ct(), None, patch=(16, 32, 32), num_classes=3, model_overrides=TINY)


@pytest.mark.slow
def test_benchmark_agreement_on_a_tiny_ct(tmp_path, monkeypatch, one_thread):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    image = _ct()
    result = run_predict_benchmark(
        image, None, patch=(16, 32, 32), repeats=1, warmup=False, threads=1, variants=("engine_monai", "ours"),
        memory=True, num_classes=3, workdir=tmp_path / "w", model_overrides=TINY, log=lambda _: None,
    )  # fmt: skip
    assert result.tiles == count_tiles((24, 40, 44), (16, 32, 32)) == 2 * 2 * 2
    assert result.parity < 1e-5
    assert set(result.seconds) == {"engine_monai", "ours"} and all(
        len(t) == 1 and t[0] > 0 for t in result.seconds.values()
    )
    assert all(m > 0 for m in result.peak_mib.values())
    n = 24 * 40 * 44
    a = result.agreement["ours"]
    assert a.voxels == n
    # The same weights in both networks; what differs is float32 rounding, seen through the
    # engine's float16 sums: a few float16 steps of a probability, almost never the argmax.
    assert a.max_abs_prob_diff < 5e-2
    assert a.voxels_prob_diff_over_1e4 < 0.01 * n
    assert a.voxels_argmax_differ <= 0.001 * n
    # The networks alone, through float32 sums: float32 rounding only.
    f = result.float32
    assert f.voxels == n and f.max_abs_prob_diff < 1e-5 and f.voxels_argmax_differ == 0
    md = tmp_path / "bench.md"
    write_markdown(md, result, "test machine", "mednext benchmark --task predict")
    text = md.read_text()
    assert "Full-volume prediction" in text and "mednext predict (ours)" in text and "test machine" in text


def test_agreement_counts_differences(setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_variant(setup, "ours", a, False, save_probabilities=True)
    run_variant(setup, "ours", b, False, save_probabilities=True)
    same = agreement(a, b)
    assert same.max_abs_prob_diff == 0 and same.voxels_argmax_differ == 0 and same.voxels == 24 * 40 * 44
    with np.load(b / "ct.npz") as f:
        probs = f["probabilities"].copy()
    probs[:, 3, 5, 7] = [0.0, 0.0, 1.0]  # one voxel changed
    np.savez_compressed(b / "ct.npz", probabilities=probs)
    one = agreement(a, b)
    assert one.voxels_prob_diff_over_1e4 == 1 and one.max_abs_prob_diff > 0.1


def test_tile_batch_below_one_is_refused(tmp_path, capsys):
    from mednext.cli import main

    args = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--dataset", "1", "--tile-batch", "0"]
    assert main(args) == 2
    assert "--tile-batch 0 must be at least 1" in capsys.readouterr().err
