"""Full-volume prediction: ``mednext predict`` against the engine's stock predictor running MONAI's MedNeXt.

One 3D CT volume (by default the demo's cached TotalSegmentator example CT) is segmented by

- ``ours``: :func:`mednext.pipeline.predictor.predict`, what ``mednext predict`` runs, with our
  MedNeXt and its default fast path, read from an nnU-Net v2 results folder;
- ``engine_monai``: nnU-Net v2's ``nnUNetPredictor`` as shipped, driven through its own
  ``predict_from_files_sequential``, holding MONAI's ``MedNeXt`` with the same weights
  (ours expressed in MONAI's layout by :func:`mednext.nn.to_monai`, outputs compared on a
  random patch before anything is timed);
- ``engine_ours`` (optional): the same stock predictor holding our network, which separates what
  the network gains from what the predictor around it gains;
- ``ours_1tile`` (optional): ``mednext predict`` with one tile per forward (the effect of batching).

All read the same image file and the same plans (spacing, patch, normalisation), with tile step
0.5, Gaussian weighting, mirroring on or off, one tile per forward of the engine, the same device
and the same torch threads. Times are wall seconds of one whole prediction (read, preprocess,
sliding window, export of the segmentation), interleaved round by round; peak memory is the rise
of the peak resident set of a fresh process during one prediction; agreement compares the saved
probabilities and segmentations of one run of each.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mednext.bench import monai_name, require_monai
from mednext.demo.data import ExampleFiles, fetch_example_scans
from mednext.files import atomic_write, atomic_write_json, atomic_write_text
from mednext.nn import MedNeXt, create_mednext, safe_torch_load, to_monai
from mednext.nn.summary import peak_rss_rise
from mednext.pipeline.predictor import MedNeXtPredictor, predict
from mednext.pipeline.workdir import use_workdir

VARIANTS = ("engine_monai", "engine_ours", "ours_1tile", "ours")
LABELS = {
    "engine_monai": f"nnUNetPredictor (stock) + {monai_name()} MedNeXt",
    "engine_ours": "nnUNetPredictor (stock) + our MedNeXt",
    "ours_1tile": "mednext predict, 1 tile per forward",
    "ours": "mednext predict (ours)",
}
DATASET = "Dataset987_PredictBench"
TRAINER = "MedNeXtTrainer_Sk3"
PLANS = "MedNeXtPlans"
CONFIGURATION = "3d_fullres"
CASE = "ct"


@dataclass
class PredictSetup:
    """Everything one prediction needs, all on disk so that a fresh process can rebuild it."""

    workdir: Path
    results_folder: Path
    image: Path  # the case, ``<CASE>_0000.nii.gz``
    monai_kwargs: dict[str, Any]
    monai_weights: Path
    shape_zyx: tuple[int, ...]
    spacing_zyx: tuple[float, ...]
    patch: tuple[int, ...]
    num_classes: int
    parity: float  # max |ours - MONAI| / max |MONAI| of one patch forward

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir), "results_folder": str(self.results_folder), "image": str(self.image),
            "monai_kwargs": self.monai_kwargs, "monai_weights": str(self.monai_weights),
            "shape_zyx": list(self.shape_zyx), "spacing_zyx": list(self.spacing_zyx), "patch": list(self.patch),
            "num_classes": self.num_classes, "parity": self.parity,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PredictSetup:
        return cls(
            workdir=Path(d["workdir"]), results_folder=Path(d["results_folder"]), image=Path(d["image"]),
            monai_kwargs=d["monai_kwargs"], monai_weights=Path(d["monai_weights"]),
            shape_zyx=tuple(d["shape_zyx"]), spacing_zyx=tuple(d["spacing_zyx"]), patch=tuple(d["patch"]),
            num_classes=d["num_classes"], parity=d["parity"],
        )  # fmt: skip


# ----------------------------------------------------------------------------- the case and the plans


def example_ct(z_range: tuple[int, int] | None = (48, 112), cache_dir: str | os.PathLike | None = None) -> Any:
    """The demo's training CT (TotalSegmentator ``example_ct.nii.gz``, 122 x 101 x 112 voxels of 3 mm),
    optionally cut to the axial slices ``z_range`` (default: the upper 64, abdomen to lower chest),
    and the matching crop of its label map (for the intensity statistics of the plans)."""
    import SimpleITK as sitk

    files = ExampleFiles(fetch_example_scans(cache_dir, quiet=True))
    image = sitk.ReadImage(str(files.train_image))
    label = sitk.ReadImage(str(files.train_label))
    if z_range is not None:
        lo, hi = z_range
        depth = image.GetSize()[2]
        if not 0 <= lo < hi <= depth:
            raise ValueError(f"z range {lo}:{hi} is outside the CT's {depth} slices")
        image, label = image[:, :, lo:hi], label[:, :, lo:hi]
    return image, label


def _intensity_properties(image: np.ndarray, label: np.ndarray | None) -> dict[str, float]:
    """What nnU-Net's fingerprint stores for CT normalisation: statistics of the labelled voxels
    (all voxels above -500 HU when there is no label)."""
    mask = label > 0 if label is not None and (label > 0).any() else image > -500
    values = image[mask].astype(np.float64)
    p = np.percentile(values, [0.5, 50, 99.5])
    return {
        "max": float(values.max()), "mean": float(values.mean()), "median": float(p[1]),
        "min": float(values.min()), "percentile_00_5": float(p[0]), "percentile_99_5": float(p[2]),
        "std": float(values.std()),
    }  # fmt: skip


def make_plans(
    spacing_zyx: Sequence[float],
    patch: Sequence[int],
    shape_zyx: Sequence[int],
    arch_kwargs: dict[str, Any],
    intensity: dict[str, float],
) -> dict[str, Any]:
    """An nnU-Net v2 plans dict with one 3d_fullres configuration that names our MedNeXt; CT
    normalisation, the engine's default resampling functions (third order for images, first
    order for probabilities)."""
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": f"{PLANS}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [int(p) for p in patch],
        "median_image_size_in_voxels": [float(s) for s in shape_zyx],
        "spacing": [float(s) for s in spacing_zyx],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {
            "network_class_name": "mednext.nn.MedNeXt",
            "arch_kwargs": arch_kwargs,
            "_kw_requires_import": [],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": DATASET,
        "plans_name": PLANS,
        "original_median_spacing_after_transp": [float(s) for s in spacing_zyx],
        "original_median_shape_after_transp": [int(s) for s in shape_zyx],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "MedNeXtPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": intensity},
    }


def setup_benchmark(
    workdir: str | os.PathLike,
    image: Any,
    label: Any = None,
    preset: str = "S",
    kernel_size: int = 3,
    patch: Sequence[int] = (64, 64, 64),
    num_classes: int = 6,
    seed: int = 0,
    model_overrides: dict[str, Any] | None = None,
) -> PredictSetup:
    """Write the case, a results folder with a fresh (seeded) MedNeXt, and the same weights in
    MONAI's layout; check that both networks agree on a random patch.

    ``image``/``label`` are SimpleITK images; the plan's spacing is the image's (the engine's
    resampling is then the identity), its patch ``patch`` in nnU-Net's (z, y, x) order.
    """
    import SimpleITK as sitk

    monai_network = require_monai().MedNeXt
    workdir = Path(workdir)
    folders = use_workdir(workdir)
    inputs = workdir / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    image_path = inputs / f"{CASE}_0000.nii.gz"
    sitk.WriteImage(image, str(image_path))
    array = sitk.GetArrayFromImage(image)
    spacing_zyx = tuple(float(s) for s in reversed(image.GetSpacing()))
    shape_zyx = tuple(int(s) for s in array.shape)

    torch.manual_seed(seed)
    ours = create_mednext(preset, 1, num_classes, kernel_size=kernel_size, **(model_overrides or {})).eval()
    monai_kwargs, monai_sd = to_monai(ours)
    monai = monai_network(**monai_kwargs).eval()
    monai.load_state_dict(monai_sd)
    torch.manual_seed(seed + 1)
    x = torch.randn(1, 1, *patch)
    with torch.inference_mode():
        ref = monai(x)
        parity = float((ours(x) - ref).abs().max() / ref.abs().max())
    if parity > 1e-4:
        raise RuntimeError(f"our network and MONAI's differ by {parity:.1e} relative on a random patch")

    arch = {k: v for k, v in ours.config.items() if k not in ("in_channels", "num_classes")}
    label_array = sitk.GetArrayFromImage(label) if label is not None else None
    plans = make_plans(spacing_zyx, patch, shape_zyx, arch, _intensity_properties(array, label_array))
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"class_{i}": i for i in range(1, num_classes)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    folder = folders.results / DATASET / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "plans.json", plans, indent=1)
    atomic_write_json(folder / "dataset.json", dataset_json, indent=1)
    checkpoint = {
        "network_weights": ours.state_dict(),
        "trainer_name": TRAINER,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    atomic_write(folder / "fold_0" / "checkpoint_final.pth", lambda tmp: torch.save(checkpoint, tmp))
    monai_weights = workdir / "monai_mednext.pt"
    atomic_write(monai_weights, lambda tmp: torch.save(monai.state_dict(), tmp))
    return PredictSetup(
        workdir=workdir, results_folder=folder, image=image_path, monai_kwargs=monai_kwargs,
        monai_weights=monai_weights, shape_zyx=shape_zyx, spacing_zyx=spacing_zyx,
        patch=tuple(int(p) for p in patch), num_classes=num_classes, parity=parity,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the predictors


def predict_ours(
    setup: PredictSetup, out_dir: Path, tta: bool, save_probabilities: bool = False, tile_batch: int = 2
) -> None:
    """``mednext predict -i <image> -o <out_dir> --dataset ... --device cpu [--no-tta]``."""
    predict(
        setup.image, out_dir, dataset=DATASET, configuration=CONFIGURATION, workdir=setup.workdir,
        device="cpu", tta=tta, step_size=0.5, save_probabilities=save_probabilities, log=lambda _: None,
        tile_batch=tile_batch,
    )  # fmt: skip


def engine_predictor(setup: PredictSetup, tta: bool, network: str = "monai", device: str = "cpu") -> Any:
    """The engine's stock ``nnUNetPredictor`` holding MONAI's MedNeXt (``network='monai'``) or ours
    (``'ours'``), weights read from disk with ``weights_only=True``; on CUDA with the engine's
    default of keeping everything on the GPU."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((setup.results_folder / "plans.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((setup.results_folder / "dataset.json").read_text(encoding="utf-8"))
    if network == "monai":
        net = require_monai().MedNeXt(**setup.monai_kwargs)
        weights = safe_torch_load(setup.monai_weights)
    else:
        arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
        net = MedNeXt(in_channels=1, num_classes=setup.num_classes, **arch)
        weights = safe_torch_load(setup.results_folder / "fold_0" / "checkpoint_final.pth")["network_weights"]
    net.load_state_dict(weights)
    torch_device = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
            perform_everything_on_device=torch_device.type == "cuda", device=torch_device, verbose=False,
            allow_tqdm=False,
        )  # fmt: skip
    manager = PlansManager(plans)
    predictor.manual_initialization(
        net.eval(), manager, manager.get_configuration(CONFIGURATION), [weights], dataset_json, TRAINER, (0, 1, 2)
    )
    return predictor


def predict_engine(
    setup: PredictSetup, out_dir: Path, tta: bool, network: str = "monai", save_probabilities: bool = False
) -> None:
    """The engine's stock ``nnUNetPredictor.predict_from_files_sequential`` with MONAI's MedNeXt
    (``network='monai'``) or ours (``'ours'``), on the CPU."""
    predictor = engine_predictor(setup, tta, network)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its device settings per case
        predictor.predict_from_files_sequential(
            [[str(setup.image)]], [str(out_dir / CASE)], save_probabilities=save_probabilities, overwrite=True
        )


def run_variant(
    setup: PredictSetup, variant: str, out_dir: Path, tta: bool, save_probabilities: bool = False, tile_batch: int = 2
) -> None:
    if variant == "ours":
        predict_ours(setup, out_dir, tta, save_probabilities, tile_batch)
    elif variant == "ours_1tile":
        predict_ours(setup, out_dir, tta, save_probabilities, 1)
    elif variant == "engine_monai":
        predict_engine(setup, out_dir, tta, "monai", save_probabilities)
    elif variant == "engine_ours":
        predict_engine(setup, out_dir, tta, "ours", save_probabilities)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


# ----------------------------------------------------------------------------- one process per variant

_REPLY = "@@mednext-benchmark "


def _worker() -> None:
    """Serve timed predictions of one variant: the first stdin line is the spec, every further line a
    request ``{"out": ..., "save_probabilities": ...}``; replies go to stdout after a marker."""
    spec = json.loads(sys.stdin.readline())
    torch.set_num_threads(spec["threads"])
    setup = PredictSetup.from_json(spec["setup"])
    for line in sys.stdin:
        request = json.loads(line)
        t0 = time.perf_counter()
        run_variant(
            setup, spec["variant"], Path(request["out"]), spec["tta"], request["save_probabilities"], spec["tile_batch"]
        )
        seconds = time.perf_counter() - t0
        print(_REPLY + json.dumps({"seconds": seconds}), flush=True)


class VariantProcess:
    """A fresh Python process that runs one variant on request, so that nothing one predictor does to
    its process (allocator settings, caches, thread pools) reaches the other's timings."""

    def __init__(self, setup: PredictSetup, variant: str, tta: bool, threads: int, tile_batch: int = 2):
        self.variant = variant
        code = "from mednext.bench.predict import _worker; _worker()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        spec = {"setup": setup.to_json(), "variant": variant, "tta": tta, "threads": threads, "tile_batch": tile_batch}
        self._send(spec)

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def run(self, out_dir: Path, save_probabilities: bool = False) -> float:
        self._send({"out": str(out_dir), "save_probabilities": save_probabilities})
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return float(json.loads(line[len(_REPLY) :])["seconds"])
        code = self.proc.wait()
        raise RuntimeError(f"the {self.variant} prediction process ended (exit code {code}); see its stderr above")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()


# ----------------------------------------------------------------------------- agreement and memory


@dataclass
class Agreement:
    """One variant's saved output against the reference variant's."""

    max_abs_prob_diff: float
    voxels_prob_diff_over_1e4: int  # voxels where some class probability differs by more than 1e-4
    voxels_argmax_differ: int
    voxels: int


def agreement(reference_dir: Path, other_dir: Path) -> Agreement:
    """Compare ``<CASE>.npz`` probabilities and the ``<CASE>.nii.gz`` segmentations of two runs."""
    import SimpleITK as sitk

    with np.load(reference_dir / f"{CASE}.npz", allow_pickle=False) as f:
        p_ref = f["probabilities"].astype(np.float64)
    with np.load(other_dir / f"{CASE}.npz", allow_pickle=False) as f:
        p_other = f["probabilities"].astype(np.float64)
    if p_ref.shape != p_other.shape:
        raise ValueError(f"probability shapes differ: {p_ref.shape} vs {p_other.shape}")
    diff = np.abs(p_ref - p_other).max(axis=0)
    seg_ref = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_dir / f"{CASE}.nii.gz")))
    seg_other = sitk.GetArrayFromImage(sitk.ReadImage(str(other_dir / f"{CASE}.nii.gz")))
    return Agreement(
        max_abs_prob_diff=float(diff.max()),
        voxels_prob_diff_over_1e4=int((diff > 1e-4).sum()),
        voxels_argmax_differ=int((seg_ref != seg_other).sum()),
        voxels=int(seg_ref.size),
    )


def float32_agreement(setup: PredictSetup, tta: bool, tile_batch: int = 2) -> Agreement:
    """Our network against MONAI's through the same sliding window with float32 sums (the engine
    sums in float16): what differs between the two networks alone, on the preprocessed case."""
    dataset_json = json.loads((setup.results_folder / "dataset.json").read_text(encoding="utf-8"))
    engines = [engine_predictor(setup, tta, "monai"), engine_predictor(setup, tta, "ours")]
    predictor = engines[0]
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):
        data, _, _ = preprocessor.run_case(
            [str(setup.image)], None, predictor.plans_manager, predictor.configuration_manager, dataset_json
        )
    data = torch.from_numpy(data)
    probs = []
    for stock, batch in zip(engines, (1, tile_batch)):
        window = MedNeXtPredictor.from_predictor(stock, batch, torch.float32)
        probs.append(torch.softmax(window.predict_sliding_window_return_logits(data), 0))
    diff = (probs[0] - probs[1]).abs().amax(0)
    return Agreement(
        max_abs_prob_diff=float(diff.max()),
        voxels_prob_diff_over_1e4=int((diff > 1e-4).sum()),
        voxels_argmax_differ=int((probs[0].argmax(0) != probs[1].argmax(0)).sum()),
        voxels=int(diff.numel()),
    )


def _memory_worker(spec: dict[str, Any]) -> float:
    """Peak-RSS rise (MiB) of one whole prediction of one variant, in a fresh process."""
    torch.set_num_threads(spec["threads"])
    setup = PredictSetup.from_json(spec["setup"])
    out = Path(spec["out"])
    return (
        peak_rss_rise(lambda: run_variant(setup, spec["variant"], out, spec["tta"], False, spec["tile_batch"])) / 2**20
    )


def measure_memory(setup: PredictSetup, variant: str, tta: bool, threads: int, tile_batch: int = 2) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"mem-{variant}-", dir=setup.workdir))
    spec = {
        "setup": setup.to_json(), "variant": variant, "tta": tta, "threads": threads, "out": str(out),
        "tile_batch": tile_batch,
    }  # fmt: skip
    code = (
        "import json,sys; from mednext.bench.predict import _memory_worker; "
        "print(_memory_worker(json.loads(sys.argv[1])))"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {variant} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class PredictBenchmarkResult:
    preset: str
    kernel_size: int
    shape_zyx: tuple[int, ...]
    spacing_zyx: tuple[float, ...]
    patch: tuple[int, ...]
    tiles: int
    tta: bool
    threads: int
    repeats: int
    parity: float
    seconds: dict[str, list[float]] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, Agreement] = field(default_factory=dict)  # against engine_monai
    float32: Agreement | None = None  # the two networks through float32 sums (float32_agreement)
    load: list[str] = field(default_factory=list)  # `uptime`-style load averages during the run

    def median(self, variant: str) -> float:
        return statistics.median(self.seconds[variant])

    def table(self) -> str:
        base = self.median("engine_monai")
        lines = [
            "| variant | seconds (median) | all rounds | x engine+MONAI | peak MiB | max abs prob. diff "
            "| voxels > 1e-4 | argmax differs |",
            "|" + "---|" * 8,
        ]
        for v in VARIANTS:
            if v not in self.seconds:
                continue
            a = self.agreement.get(v)
            agree = (
                f"{a.max_abs_prob_diff:.1e} | {a.voxels_prob_diff_over_1e4:,} of {a.voxels:,} | "
                f"{a.voxels_argmax_differ:,}"
                if a is not None
                else "reference | | "
            )
            lines.append(
                f"| {LABELS[v]} | {self.median(v):.2f} | {', '.join(f'{t:.1f}' for t in self.seconds[v])} | "
                f"{self.median(v) / base:.2f} | {self.peak_mib.get(v, float('nan')):,.0f} | {agree} |"
            )
        return "\n".join(lines)


def count_tiles(shape: Sequence[int], patch: Sequence[int], step: float = 0.5) -> int:
    """Sliding-window tiles the engine uses for an image of ``shape`` (padded to the patch if smaller)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(s, p) for s, p in zip(shape, patch)]
    return int(np.prod([len(s) for s in compute_steps_for_sliding_window(padded, patch, step)]))


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])
    except OSError:
        return "n/a"


def run_predict_benchmark(
    image: Any = None,
    label: Any = None,
    preset: str = "S",
    kernel_size: int = 3,
    patch: Sequence[int] = (64, 64, 64),
    tta: bool = False,
    repeats: int = 3,
    warmup: bool = True,
    threads: int | None = None,
    variants: Sequence[str] = ("engine_monai", "ours"),
    memory: bool = True,
    num_classes: int = 6,
    tile_batch: int = 2,
    workdir: str | os.PathLike | None = None,
    model_overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> PredictBenchmarkResult:
    """Time whole predictions of ``image`` (default: :func:`example_ct`) by each variant, each in its
    own process, interleaved round by round; compare their probabilities with the stock engine +
    MONAI run; optionally measure each variant's peak memory in a fresh process."""
    if "engine_monai" not in variants:
        raise ValueError("the variant 'engine_monai' is the reference column; include it")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    if image is None:
        image, label = example_ct()
    own_workdir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="mednext-predict-bench-")) if own_workdir else Path(workdir)
    workers: dict[str, VariantProcess] = {}
    try:
        setup = setup_benchmark(root, image, label, preset, kernel_size, patch, num_classes, 0, model_overrides)
        log(f"parity (max |ours - MONAI| / max |MONAI| on one patch): {setup.parity:.1e}")
        result = PredictBenchmarkResult(
            preset=preset, kernel_size=kernel_size, shape_zyx=setup.shape_zyx, spacing_zyx=setup.spacing_zyx,
            patch=setup.patch, tiles=count_tiles(setup.shape_zyx, setup.patch), tta=tta,
            threads=threads, repeats=repeats, parity=setup.parity,
        )  # fmt: skip
        log(f"case {setup.shape_zyx} (z, y, x) at {setup.spacing_zyx} mm, patch {setup.patch}, {result.tiles} tiles")
        workers = {v: VariantProcess(setup, v, tta, threads, tile_batch) for v in variants}
        # One untimed run of each with probabilities saved: the agreement check, and a warm-up.
        outputs = {v: root / f"agree-{v}" for v in variants}
        for v in variants:
            log(f"{v}: agreement run {workers[v].run(outputs[v], save_probabilities=True):.1f} s")
        for v in variants:
            if v != "engine_monai":
                result.agreement[v] = agreement(outputs["engine_monai"], outputs[v])
                a = result.agreement[v]
                log(
                    f"{v} vs engine_monai: max abs prob. diff {a.max_abs_prob_diff:.1e}, "
                    f"{a.voxels_prob_diff_over_1e4} voxels > 1e-4, {a.voxels_argmax_differ} argmax differ"
                )
        result.float32 = float32_agreement(setup, tta, tile_batch)
        a = result.float32
        log(
            f"networks through float32 sums: max abs prob. diff {a.max_abs_prob_diff:.1e}, "
            f"{a.voxels_prob_diff_over_1e4} voxels > 1e-4, {a.voxels_argmax_differ} argmax differ"
        )
        if warmup:  # a second untimed round: the first one also paid for imports and first-call set-up
            for v in variants:
                workers[v].run(root / f"warm-{v}")
        for rnd in range(repeats):
            result.load.append(_load())
            for v in variants:
                out = root / f"round{rnd}-{v}"
                result.seconds.setdefault(v, []).append(workers[v].run(out))
                shutil.rmtree(out, ignore_errors=True)
            log(
                f"round {rnd + 1}/{repeats} (load {result.load[-1]}): "
                + ", ".join(f"{v} {result.seconds[v][-1]:.1f}s" for v in variants)
            )
        result.load.append(_load())
        for w in workers.values():
            w.close()
        workers = {}
        if memory:
            for v in variants:
                result.peak_mib[v] = measure_memory(setup, v, tta, threads, tile_batch)
                log(f"{v}: peak RSS rise {result.peak_mib[v]:,.0f} MiB")
        return result
    finally:
        for w in workers.values():
            w.close()
        if own_workdir:
            shutil.rmtree(root, ignore_errors=True)


def write_markdown(path: str | os.PathLike, result: PredictBenchmarkResult, machine: str, command: str) -> None:
    """Append one full-volume prediction result to a Markdown file, atomically."""
    target = Path(path)
    old = target.read_text(encoding="utf-8") if target.exists() else "# Benchmarks\n"
    shape = "x".join(map(str, result.shape_zyx))
    spacing = "x".join(f"{s:g}" for s in result.spacing_zyx)
    patch = "x".join(map(str, result.patch))
    a = result.agreement.get("ours")
    section = (
        f"\n## Full-volume prediction: MedNeXt-{result.preset} k{result.kernel_size} 3D, CT {shape} (z, y, x) "
        f"at {spacing} mm, patch {patch}, mirroring {'on' if result.tta else 'off'}, cpu\n\n"
        f"- machine: {machine}\n- command: `{command}`\n"
        f"- {result.tiles} tiles (step 0.5, Gaussian weighting), one tile per engine forward"
        f"{', 8 mirrored forwards each' if result.tta else ''}; a time is one whole prediction (read, "
        "preprocess, sliding window, export of the segmentation); median of "
        f"{result.repeats} interleaved rounds after an agreement run and a warm-up round; load average "
        f"(1/5/15 min) at the start of each round and at the end: {'; '.join(result.load)}\n"
        f"- network parity on one random patch: {result.parity:.1e} relative; peak memory is the peak-RSS "
        "rise of a fresh process during one prediction; agreement is against the stock engine + MONAI run"
        + (
            f"\n- ours / stock engine + MONAI: **{result.median('ours') / result.median('engine_monai'):.2f}x** "
            f"; max abs probability difference {a.max_abs_prob_diff:.1e}, "
            f"{a.voxels_argmax_differ} voxels with a different argmax"
            if a is not None
            else ""
        )
        + (
            f"\n- the two networks alone (MONAI's and ours through the same sliding window, float32 sums): "
            f"max abs probability difference {result.float32.max_abs_prob_diff:.1e}, "
            f"{result.float32.voxels_prob_diff_over_1e4} voxels > 1e-4, "
            f"{result.float32.voxels_argmax_differ} with a different argmax"
            if result.float32 is not None
            else ""
        )
        + f"\n\n{result.table()}\n"
    )
    atomic_write_text(target, old.rstrip("\n") + "\n" + section)
