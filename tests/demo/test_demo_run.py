"""``mednext demo``: the contrast augmentation, the time budget, the CT window, and a shortened run end to end."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mednext import config
from mednext.demo import trainer as demo_trainer
from mednext.demo.run import DemoSettings, dice_table, run_demo, set_ct_window
from mednext.demo.trainer import SOFT_TISSUE_HU, TimeBudgetMixin, simulate_contrast_enhancement
from mednext.pipeline import trainer as pipeline_trainer
from mednext.pipeline.body import body_bbox

LABELS = {"background": 0, "liver": 1, "spleen": 2, "stomach": 3, "aorta": 4, "kidney": 5}
CLASSES = ["liver", "spleen", "stomach", "aorta", "kidney"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- contrast augmentation


def _batch(mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    hu = np.full((3, 1, 6, 8), 40.0, dtype=np.float32)  # soft tissue everywhere
    hu[:, :, 0, :] = -120.0  # fat: never enhanced
    hu[:, :, 5, :] = 600.0  # bone: never enhanced (and clipped by the window)
    seg = np.zeros((3, 1, 6, 8), dtype=np.int64)
    seg[:, :, 1, :] = 1  # liver
    seg[:, :, 2, :] = 2  # spleen
    seg[:, :, 3, :4] = 4  # aorta
    return torch.from_numpy((hu - mean) / std), torch.from_numpy(seg), hu


def test_contrast_enhancement_shifts_each_label_within_its_range() -> None:
    mean, std, window = 33.0, 60.0, (-200.0, 250.0)
    data, seg, hu = _batch(mean, std)
    gen = torch.Generator().manual_seed(0)
    out = simulate_contrast_enhancement(data, seg, LABELS, mean, std, window, probability=1.0, generator=gen)
    out_hu = out.numpy() * std + mean
    assert out.dtype == data.dtype and out.shape == data.shape
    clipped = np.clip(hu, *window)
    np.testing.assert_allclose(out_hu[:, :, 0, :], clipped[:, :, 0, :], atol=1e-3)  # fat unchanged
    np.testing.assert_allclose(out_hu[:, :, 5, :], 250.0, atol=1e-3)  # bone: clipped, not shifted
    for b in range(3):
        for value, top in ((1, demo_trainer.ENHANCEMENT_HU["liver"]), (2, demo_trainer.ENHANCEMENT_HU["spleen"])):
            region = out_hu[b, 0][seg[b, 0].numpy() == value]
            shift = region - 40.0
            assert np.allclose(shift, shift[0], atol=1e-3), "one shift per label and sample"
            assert 0.0 <= shift[0] <= top + 1e-3
        aorta = out_hu[b, 0][seg[b, 0].numpy() == 4]
        assert np.all(aorta <= window[1] + 1e-3) and np.all(aorta >= 40.0 - 1e-3)
    # independent draws: the liver shifts differ between samples
    liver = [float(out_hu[b, 0, 1, 0]) for b in range(3)]
    assert len({round(v, 2) for v in liver}) == 3


def test_contrast_enhancement_probability_zero_only_clips() -> None:
    mean, std, window = 33.0, 60.0, (-200.0, 250.0)
    data, seg, hu = _batch(mean, std)
    out = simulate_contrast_enhancement(data, seg, LABELS, mean, std, window, probability=0.0)
    np.testing.assert_allclose(out.numpy() * std + mean, np.clip(hu, *window), atol=1e-3)


def test_contrast_enhancement_leaves_non_soft_tissue() -> None:
    assert SOFT_TISSUE_HU[0] < 0 < SOFT_TISSUE_HU[1]
    data = torch.full((1, 2, 4, 4), 0.0)
    with pytest.raises(ValueError, match="one CT channel"):
        simulate_contrast_enhancement(data, torch.zeros(1, 1, 4, 4), LABELS, 0.0, 1.0, (-1.0, 1.0))


# ----------------------------------------------------------------------------- time budget


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Logger:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def get_value(self, key: str, step: int) -> float:
        return self.losses[step]


class _Scheduler:
    max_steps = 1000


class _FakeEngine:
    """The engine hooks the budget loop calls; each training step costs 2 s, validation 1 s per epoch."""

    local_rank = 0

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.current_epoch = 0
        self.num_epochs = 1000
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 1
        self.logger = _Logger()
        self.lr_scheduler = _Scheduler()
        self.dataloader_train = iter(range(10**6))
        self.dataloader_val = iter(range(10**6))
        self.events: list[str] = []
        self.device = torch.device("cpu")

    def on_train_start(self) -> None:
        self.events.append("start")

    def on_epoch_start(self) -> None:
        pass

    def on_train_epoch_start(self) -> None:
        assert self.current_epoch < self.lr_scheduler.max_steps, "poly schedule would go past its end"

    def train_step(self, batch: int) -> dict:
        self.clock.now += 2.0
        return {"loss": 1.0 / (1 + batch)}

    def on_train_epoch_end(self, outputs: list) -> None:
        self.logger.losses.append(float(np.mean([o["loss"] for o in outputs])))

    def on_validation_epoch_start(self) -> None:
        pass

    def validation_step(self, batch: int) -> dict:
        self.clock.now += 1.0
        return {}

    def on_validation_epoch_end(self, outputs: list) -> None:
        pass

    def on_epoch_end(self) -> None:
        self.current_epoch += 1

    def on_train_end(self) -> None:
        self.events.append("end")


class _BudgetedFake(TimeBudgetMixin, _FakeEngine):
    show_progress = False


@pytest.mark.parametrize(
    ("budget", "cap", "epochs", "last"),
    [(110.0, None, 10, 5), (34.0, None, 3, 5), (40.0, None, 4, 3), (5.0, None, 1, 5), (110.0, 4, 4, 5)],
)
def test_time_budget_sets_epochs_and_schedule(
    monkeypatch, budget: float, cap: int | None, epochs: int, last: int
) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    t = _BudgetedFake(clock)
    t.budget_s, t.max_epochs = budget, cap
    t.run_training()
    # 11 s per epoch: floor(budget / 11) epochs (at least the first), never more than the cap
    assert t.current_epoch == epochs
    assert t.events == ["start", "end"]
    assert len(t.budget_log) == epochs
    assert t.budget_log[0]["planned_epochs"] == (min(cap, int(budget // 11)) if cap else max(1, int(budget // 11)))
    assert clock.now <= max(budget, 11.0)
    # 7 s left after 3 epochs of 11 s: a last epoch of 3 iterations (2 s each) + validation (1 s) fits
    assert [e["iterations"] for e in t.budget_log] == [5] * (epochs - 1) + [last]
    assert t.iterations_done == 5 * (epochs - 1) + last
    if epochs > 1:
        assert t.lr_scheduler.max_steps == epochs


def test_a_resumed_run_counts_its_logged_epochs_against_the_budget(monkeypatch) -> None:
    # the pipeline's budget (mednext compare --hours): three epochs of 11 s were trained before the interruption
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    t = _BudgetedFake(clock)
    t.current_epoch, t.budget_s, t.max_epochs = 3, 110.0, None
    t.logger.get_checkpoint = lambda: {"epoch_start_timestamps": [0.0, 11.0, 22.0],
                                       "epoch_end_timestamps": [11.0, 22.0, 33.0]}  # fmt: skip
    t.run_training()
    assert t.budget_spent_before == 33.0
    assert t.current_epoch == 10  # 3 before + floor((110 - 33) / 11) after
    assert t.budget_log[-1]["elapsed_s"] == pytest.approx(110.0)


@pytest.mark.parametrize(("device", "env", "kept"), [("cpu", None, True), ("cpu", "0", False), ("cuda", None, False)])
def test_time_budget_keeps_freed_memory_on_the_cpu(monkeypatch, device: str, env: str | None, kept: bool) -> None:
    # like `mednext train`: the budgeted loop (MedNeXt and the engine's U-Net alike) runs inside
    # mednext.memory.reuse_freed_memory on the CPU, around the steps only
    config.set_keep_freed_memory(env is None)  # as MEDNEXT_KEEP_FREED_MEMORY unset or =0
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    t = _BudgetedFake(clock)
    t.budget_s, t.max_epochs, t.device = 30.0, None, torch.device(device)
    original = pipeline_trainer.reuse_freed_memory

    @contextlib.contextmanager
    def recording(enable: bool = True):
        t.events.append(f"keep={enable}")
        with original(enable):
            yield
        t.events.append("released")

    monkeypatch.setattr(pipeline_trainer, "reuse_freed_memory", recording)
    t.run_training()
    assert t.events == ["start", f"keep={kept}", "released", "end"]


# ----------------------------------------------------------------------------- the demo trainer's data


def test_demo_trainer_limits_rotation_and_turns_mirroring_off() -> None:
    import math
    from types import SimpleNamespace

    cls = demo_trainer.demo_trainer_class("S", 3)
    assert cls.__name__ == "MedNeXtTrainer_Sk3_demo" and cls.preset == "S" and cls.kernel_size == 3
    assert demo_trainer.demo_trainer_class("b", 5).__name__ == "MedNeXtTrainer_Bk5_demo"
    t = object.__new__(cls)
    t.print_to_log_file = lambda *args, **kwargs: None
    t.configuration_manager = SimpleNamespace(patch_size=[112, 128])
    rotation, dummy_2d, initial, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    # the engine would rotate a near-square 2D patch by up to 180 degrees and mirror both axes
    assert rotation == pytest.approx((-math.radians(15), math.radians(15)))
    assert mirror is None and t.inference_allowed_mirroring_axes is None and dummy_2d is False
    assert all(p >= q for p, q in zip(initial, (112, 128), strict=True))  # the crop covers the rotated patch
    t.rotation_degrees, t.mirror_axes = 200.0, (1,)  # never wider than the engine's own range
    rotation, _, _, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert rotation == pytest.approx((-math.pi, math.pi)) and mirror == (1,)


def test_demo_trainer_optimizer_and_batch_size_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    cls = demo_trainer.demo_trainer_class("S", 3)
    t = object.__new__(cls)
    t.network = torch.nn.Linear(3, 2)
    t.initial_lr, t.weight_decay, t.adam_eps, t.num_epochs = 1e-3, 3e-5, 1e-4, 19
    optimizer, schedule = t.configure_optimizers()  # the reference recipe
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 1e-3
    t.optimizer_name = "sgd"  # the engine's recipe
    optimizer, schedule = t.configure_optimizers()
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD) and group["lr"] == 1e-2
    assert group["momentum"] == 0.99 and group["nesterov"] and group["weight_decay"] == 3e-5
    assert schedule.max_steps == 19
    t.optimizer_name = "adam"
    with pytest.raises(ValueError, match="optimizer_name 'adam'"):
        t.configure_optimizers()

    def pipeline_initialize(self) -> None:  # the parts of MedNeXtTrainer.initialize the demo builds on
        self.batch_size = self.configuration_manager.batch_size

    monkeypatch.setattr(pipeline_trainer.MedNeXtTrainer, "initialize", pipeline_initialize)
    t.configuration_manager = SimpleNamespace(batch_size=5)
    t.initialize()
    assert t.batch_size == 5 and t.oversample_foreground_percent == t.foreground_share
    t.batch_size_override = 12
    t.initialize()
    assert t.batch_size == 12


def test_unknown_trainer_override_is_refused(tmp_path: Path) -> None:
    from mednext.demo.run import train_mednext

    settings = DemoSettings(out=tmp_path, trainer_overrides={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="trainer override 'learning_rate': choose from"):
        train_mednext(settings, "Dataset990_MedNeXtDemo", torch.device("cpu"), 60.0)


def test_enhanced_dataset_class_shifts_each_organ_alike_in_every_slice() -> None:
    from types import SimpleNamespace

    mean, std = 40.0, 50.0
    hu = np.full((1, 4, 6, 8), 40.0, dtype=np.float32)
    hu[:, :, 0, :] = -120.0  # fat
    seg = np.zeros((1, 4, 6, 8), dtype=np.int16)
    seg[:, :, 1:3, :] = 1  # liver in every slice
    seg[:, :, 3:5, :4] = 4  # aorta

    class Base:
        def load_case(self, identifier: str) -> tuple:
            return (hu - mean) / std, seg, None, {"case": identifier}

    trainer = SimpleNamespace(
        plans_manager=SimpleNamespace(
            foreground_intensity_properties_per_channel={
                "0": {"mean": mean, "std": std, "percentile_00_5": -200.0, "percentile_99_5": 250.0}
            }
        ),
        dataset_json={"labels": LABELS},
        enhancement_probability=1.0,
    )
    cls = demo_trainer.enhanced_dataset_class(Base, trainer)
    torch.manual_seed(3)
    for _ in range(5):
        data, seg_out, prev, props = cls().load_case("c")
        out = data * std + mean
        assert data.shape == hu.shape and seg_out is seg and prev is None and props == {"case": "c"}
        liver, aorta = out[seg == 1], out[seg == 4]
        # one shift per organ for the whole volume, within the organ's range
        assert np.ptp(liver) < 1e-3 and np.ptp(aorta) < 1e-3
        assert 40.0 <= liver[0] <= 40.0 + demo_trainer.ENHANCEMENT_HU["liver"] + 1e-3
        assert 40.0 <= aorta[0] <= 250.0 + 1e-3
        np.testing.assert_allclose(out[:, :, 0, :], -120.0, atol=1e-3)  # fat untouched


# ----------------------------------------------------------------------------- plans and table


def test_set_ct_window_rewrites_clip_range_and_keeps_fingerprint(tmp_path: Path) -> None:
    plans = {
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 32.9, "std": 59.5, "percentile_00_5": -171.0, "percentile_99_5": 79.0}
        }
    }
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans))
    set_ct_window(path, (-200, 250))
    new = json.loads(path.read_text())
    props = new["foreground_intensity_properties_per_channel"]["0"]
    assert (props["percentile_00_5"], props["percentile_99_5"]) == (-200.0, 250.0)
    assert (props["mean"], props["std"]) == (32.9, 59.5)
    assert new["mednext_fingerprint_window"] == {"0": [-171.0, 79.0]}
    set_ct_window(path, (-100, 300))  # a second call keeps the original fingerprint window
    assert json.loads(path.read_text())["mednext_fingerprint_window"] == {"0": [-171.0, 79.0]}
    with pytest.raises(ValueError, match="lower bound"):
        set_ct_window(path, (100, 100))


def test_dice_table_side_by_side() -> None:
    text = dice_table({"A": {"liver": 0.9, "kidney": None}, "B": {"liver": 0.5, "kidney": 0.0}})
    lines = text.splitlines()
    assert lines[0].split() == ["class", "A", "B"]
    assert lines[1].split() == ["liver", "0.900", "0.500"]
    assert lines[2].split() == ["kidney", "-", "0.000"]
    assert lines[3].split() == ["mean", "0.900", "0.250"]


# ----------------------------------------------------------------------------- end to end


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


@pytest.mark.slow
def test_shortened_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import matplotlib.image as mpimg
    import SimpleITK as sitk

    out = tmp_path / "demo"
    settings = DemoSettings(
        out=out, minutes=1.0, device="cpu", iters_per_epoch=2, val_iters=1, max_epochs=1, tta=False, compare="nnunet"
    )
    metrics = run_demo(settings)
    printed = capsys.readouterr().out

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert list(on_disk["dice"]) == CLASSES
    assert list(on_disk["nnunet"]["dice"]) == CLASSES
    assert on_disk["training"]["epochs"] == 1 and on_disk["training"]["iterations"] == 2
    assert len(on_disk["training"]["budget_log"]) == 1
    assert on_disk["model"]["configuration"] == "2d"
    assert on_disk["model"]["ct_window_hu"] == [-200.0, 250.0]
    assert on_disk["model"]["crop_body"] is True
    assert on_disk["model"]["fov_padding_voxels"] == 40

    # the segmentation is on the held-out series' exact grid and its Dice values are what metrics.json says
    raw = out / "work" / "nnUNet_raw" / "Dataset990_MedNeXtDemo"
    image = sitk.ReadImage(str(raw / "imagesTs" / "demo_heldout_0000.nii.gz"))
    ref_img = sitk.ReadImage(str(raw / "labelsTs" / "demo_heldout.nii.gz"))
    for key, seg_path in (("dice", out / "segmentation.nii.gz"), ("nnunet", out / "segmentation_nnunet.nii.gz")):
        seg_img = sitk.ReadImage(str(seg_path))
        assert seg_img.GetSize() == image.GetSize() == (512, 512, 20)
        assert np.allclose(seg_img.GetSpacing(), image.GetSpacing())
        assert np.allclose(seg_img.GetOrigin(), image.GetOrigin())
        assert np.allclose(seg_img.GetDirection(), image.GetDirection())
        seg, ref = sitk.GetArrayFromImage(seg_img), sitk.GetArrayFromImage(ref_img)
        assert set(np.unique(seg).tolist()) <= set(LABELS.values())
        # both models predicted inside the box around the patient's body only (the default body crop)
        box = body_bbox(sitk.GetArrayFromImage(image), image.GetSpacing()[::-1])
        assert box[2][1] - box[2][0] < 512  # the arms or the air beside the body are cut off
        outside = np.ones(seg.shape, bool)
        outside[tuple(slice(a, b) for a, b in box)] = False
        assert not seg[outside].any()
        dice = on_disk["dice"] if key == "dice" else on_disk["nnunet"]["dice"]
        for name in CLASSES:
            expected = _dice(seg == LABELS[name], ref == LABELS[name])
            if expected is None:
                assert dice[name] is None
            else:
                assert dice[name] == pytest.approx(expected, abs=1e-4)
    # the held-out slab holds no kidney: its score is null unless kidney was predicted, then 0
    kidney_predicted = on_disk["voxels"]["kidney"]["prediction"]
    assert on_disk["voxels"]["kidney"]["reference"] == 0
    assert on_disk["dice"]["kidney"] == (0.0 if kidney_predicted else None)

    for name in ("overlay_axial.png", "overlay_coronal.png", "training_curve.png"):
        picture = mpimg.imread(out / name)
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300, name
        assert float(picture[..., :3].std()) > 0.01, f"{name} is blank"

    results = Path(on_disk["files"]["results_folder"])
    assert (results / "checkpoint_final.pth").is_file()
    # the default is 2.5D: two slices on either side as channels, recorded for prediction; no mirroring
    assert on_disk["model"]["context_slices"] == 2
    plans = json.loads((results.parent / "plans.json").read_text())
    assert plans["configurations"]["2d"]["mednext_context_slices"] == 2
    checkpoint = torch.load(results / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["network_weights"]["stem.weight"].shape[1] == 5
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    log = json.loads((results / "training_log.json").read_text())
    assert log["trainer"] == "MedNeXtTrainer_Sk3_demo" and len(log["epochs"]) == 1

    header = next(line for line in printed.splitlines() if line.startswith("class"))
    assert "MedNeXt-S k3" in header and "nnU-Net 2d" in header

    # --compare nnunet is mednext compare's machinery on one case and one fold: its report, same scores
    report = json.loads((out / "compare" / "compare.json").read_text())
    assert [m["spec"] for m in report["models"]] == ["mednext:S:k3:2d", "nnunet:2d"]
    assert report["baseline"] == "nnunet:2d" and report["folds"] == ["all"]
    assert list(report["cases"]) == [on_disk["case"]] and report["case_source"] == "held-out cases"
    for spec, dice in (("mednext:S:k3:2d", on_disk["dice"]), ("nnunet:2d", on_disk["nnunet"]["dice"])):
        scored = report["cases"][on_disk["case"]][spec]
        assert {name: scored[name]["dice"] for name in CLASSES} == pytest.approx(dice, abs=1e-4)
        assert report["costs"][spec]["parameters"] > 0 and report["costs"][spec]["peak_memory_mb"] > 0
    assert all(row["n"] <= 1 and row["verdict"] == "not distinguishable" for row in report["comparisons"])
    assert "MedNeXt-S k3 2d against nnU-Net 2d (Dice)" in (out / "compare" / "compare.md").read_text()
    engine = json.loads((out / "compare" / "runs" / "nnunet_2d" / "fold_all.json").read_text())
    assert engine["trained_in_this_comparison"] is True and engine["epochs"] == 1
    for name in CLASSES:
        assert any(line.split()[:1] == [name] for line in printed.splitlines()), name


def test_demo_trials_variant_syntax() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "demo_trials.py"
    spec = importlib.util.spec_from_file_location("demo_trials", path)
    trials = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trials)
    name, options = trials.parse_variant("nw:ct_window=(-171,79),enhance=False,optimizer_name=sgd,epochs=8")
    assert name == "nw"
    assert options == {"ct_window": (-171, 79), "enhance": False, "optimizer_name": "sgd", "epochs": 8}
    assert trials.parse_variant("base") == ("base", {})
    with pytest.raises(ValueError, match="unknown key 'lr'"):
        trials.parse_variant("x:lr=1")
    with pytest.raises(ValueError, match="not key=value"):
        trials.parse_variant("x:enhance")
    settings = trials._settings(Path("/tmp/x"), "cpu", 19, {"rotation_degrees": 180, "epochs": 8, "context_slices": 0})
    assert settings.max_epochs == 8 and settings.context_slices == 0
    assert settings.trainer_overrides == {"rotation_degrees": 180}


def test_padded_dataset_class_pads_with_air_and_shifts_foreground_locations() -> None:
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    data = rng.normal(size=(1, 4, 10, 12)).astype(np.float32)
    seg = np.zeros((1, 4, 10, 12), np.int8)
    seg[0, 1, 3:5, 6:9] = 2
    locations = {1: np.zeros((0, 4), np.int64), 2: np.argwhere(seg == 2)}

    class Base:
        def load_case(self, identifier):
            return data, seg, None, {"class_locations": locations, "spacing": [3.0, 3.0, 3.0]}

    props = {"percentile_00_5": -200.0, "mean": 40.0, "std": 60.0}
    trainer = SimpleNamespace(
        plans_manager=SimpleNamespace(foreground_intensity_properties_per_channel={"0": props}), fov_padding=5
    )
    cls = demo_trainer.padded_dataset_class(Base, trainer)
    air = (-200.0 - 40.0) / 60.0
    shapes = set()
    for _ in range(20):
        d, s, _, p = cls().load_case("x")
        assert d.shape[:2] == (1, 4) and s.shape == d.shape
        assert 10 <= d.shape[2] <= 20 and 12 <= d.shape[3] <= 22
        shapes.add(d.shape)
        where = p["class_locations"][2]
        assert len(where) == 6 and (s[tuple(where.T)] == 2).all()  # shifted with the image
        y0, x0 = (where[:, 2].min() - 3, where[:, 3].min() - 6)
        np.testing.assert_array_equal(d[:, :, y0 : y0 + 10, x0 : x0 + 12], data)
        border = np.ones(d.shape, bool)
        border[:, :, y0 : y0 + 10, x0 : x0 + 12] = False
        assert np.allclose(d[border], air) and not s[border].any()
        assert locations[2][:, 2].min() == 3 and locations[2][:, 3].min() == 6  # the originals are untouched
    assert len(shapes) > 1  # the padding is random
