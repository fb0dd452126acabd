"""A cohort of CT scans: ``mednext predict`` against the engine's own predictor, same network and weights.

Cases: ``--cases`` crops of the demo's training CT (TotalSegmentator ``example_ct.nii.gz``, 3 mm),
``--depth`` axial slices each starting two slices apart, every second one mirrored left-right, so
that no two cases are the same. Model: a seeded MedNeXt (``--preset``, ``--kernel``, patch
``--patch``) in an nnU-Net v2 results folder (:func:`mednext.bench.predict.setup_benchmark`),
the plans' spacing that of the CT (so resampling is the identity) and CT normalisation.

Variants, each in a fresh process, run one after the other on the same input folder:

- ``engine``: nnU-Net v2's ``nnUNetPredictor.predict_from_files`` as a user runs it
  (``nnUNetv2_predict``'s defaults: 3 preprocessing and 3 export processes), holding our network
  with the results folder's weights (``manual_initialization``);
- ``ours``: ``mednext predict`` (:func:`mednext.pipeline.predictor.predict`) with its defaults:
  two tiles per forward; reading and writing overlapped with the network on a GPU, one stage
  after the other on the CPU;
- ``ours_overlapped``: the same with the stages overlapped on any device;
- ``ours_sequential``: the same with the stages one after the other on any device.

Time: wall seconds of the whole cohort inside the process (model loading included). Peak memory:
the largest sum of the resident sets of the process and all its children, sampled every 0.2 s.
Agreement: the segmentations of each variant against the engine's, voxel by voxel.

    python benchmarks/predict_cohort.py --out docs/predict-cohort.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = {
    "engine": "nnUNetPredictor.predict_from_files (engine defaults: 3 + 3 worker processes), our network",
    "ours": "mednext predict (defaults)",
    "ours_overlapped": "mednext predict, reading and writing overlapped with the network",
    "ours_sequential": "mednext predict, stages one after the other",
}


def make_cohort(folder: Path, cases: int, depth: int) -> list[str]:
    import SimpleITK as sitk

    from mednext.bench.predict import example_ct

    image, _ = example_ct(z_range=None)
    slices = image.GetSize()[2]
    if depth > slices:
        raise SystemExit(f"--depth {depth} is more than the CT's {slices} slices")
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(cases):
        start = (2 * i) % (slices - depth + 1)
        crop = image[:, :, start : start + depth]
        if i % 2:
            crop = sitk.Flip(crop, [True, False, False])
        name = f"ct{i:03d}"
        sitk.WriteImage(crop, str(folder / f"{name}_0000.nii.gz"))
        names.append(name)
    return names


def _tree_rss_bytes(pid: int) -> int:
    """The resident sets of ``pid`` and its descendants, summed (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def run_variant(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Start a fresh process for ``variant``; return its time, the tree's peak memory and its output folder."""
    out = Path(spec["work"]) / f"out-{variant}"
    code = "import json,sys; sys.path.insert(0, sys.argv[3]); import predict_cohort as m; m._worker(sys.argv[1], json.loads(sys.argv[2]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, variant, json.dumps({**spec, "out": str(out)}), str(Path(__file__).parent)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
    )  # fmt: skip
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{stderr[-3000:]}")
    reply = json.loads(stdout.strip().splitlines()[-1])
    return {**reply, "peak_mib": peak[0] / 2**20, "out": str(out)}


def _worker(variant: str, spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from mednext.bench.predict import CONFIGURATION, DATASET, PredictSetup

    setup = PredictSetup.from_json(spec["setup"])
    out = Path(spec["out"])
    start = time.perf_counter()
    device = torch.device(spec["device"])
    if variant == "engine":
        import contextlib
        import io

        from mednext.bench.predict import engine_predictor

        predictor = engine_predictor(setup, spec["tta"], "ours", spec["device"])
        with contextlib.redirect_stdout(io.StringIO()):
            predictor.predict_from_files(
                spec["cases"], str(out), save_probabilities=False, overwrite=True,
                num_processes_preprocessing=3, num_processes_segmentation_export=3,
            )  # fmt: skip
    else:
        from mednext.pipeline.predictor import predict

        overlap = {"ours": None, "ours_overlapped": True}.get(variant, False)
        predict(
            spec["cases"], out, DATASET, configuration=CONFIGURATION, workdir=setup.workdir, device=device,
            tta=spec["tta"], log=lambda _: None, overlap=overlap, progress_bar=False,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"seconds": seconds, "gpu_peak_mib": gpu}))


def agreement(reference: Path, other: Path, names: list[str]) -> dict[str, Any]:
    import SimpleITK as sitk

    same_cases, differing, total = 0, 0, 0
    for name in names:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / f"{name}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(other / f"{name}.nii.gz")))
        if a.shape != b.shape:
            raise RuntimeError(f"{name}: shapes differ, {a.shape} and {b.shape}")
        diff = int(np.count_nonzero(a != b))
        same_cases += diff == 0
        differing += diff
        total += a.size
    return {"identical_cases": same_cases, "cases": len(names), "differing_voxels": differing, "voxels": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--depth", type=int, default=64, help="axial slices per case (3 mm)")
    parser.add_argument("--preset", default="S")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64))
    parser.add_argument("--tta", action="store_true", help="mirroring on (default off)")
    parser.add_argument(
        "--variants", nargs="+", choices=tuple(VARIANTS), default=["engine", "ours", "ours_sequential"],
        help="what to run (the first is the reference of the ratios)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="write the table to this Markdown file")
    args = parser.parse_args()

    from mednext.bench.predict import example_ct, setup_benchmark

    work = Path(tempfile.mkdtemp(prefix="mednext-cohort-"))
    image, label = example_ct()
    setup = setup_benchmark(work, image, label, preset=args.preset, kernel_size=args.kernel, patch=args.patch)
    cases_dir = work / "cohort"
    names = make_cohort(cases_dir, args.cases, args.depth)
    spec = {
        "setup": setup.to_json(),
        "cases": str(cases_dir),
        "tta": args.tta,
        "threads": args.threads,
        "device": args.device,
        "work": str(work),
    }
    variants = list(args.variants)
    results = {}
    for variant in variants:
        results[variant] = run_variant(variant, spec)
        print(
            f"{variant}: {results[variant]['seconds']:.1f} s, peak {results[variant]['peak_mib']:.0f} MiB", flush=True
        )
    for variant in variants[1:]:
        results[variant]["agreement"] = agreement(
            Path(results[variants[0]]["out"]), Path(results[variant]["out"]), names
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}"
    )
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        machine = f"{cpu}, {os.cpu_count()} cores, torch {__import__('torch').__version__}"
    except (OSError, StopIteration):
        pass
    if args.device.startswith("cuda"):
        import torch

        machine = f"{torch.cuda.get_device_name(0)}; {machine}"
    engine = results[variants[0]]
    lines = [
        f"Cohort of {args.cases} CT crops ({args.depth} x 101 x 122 voxels of 3 mm), MedNeXt-{args.preset} "
        f"k{args.kernel}, patch {'x'.join(map(str, args.patch))}, TTA {'on' if args.tta else 'off'}, "
        f"{args.threads} torch threads, device {args.device}. Machine: {machine}. Peak memory: resident sets of "
        "the process tree" + ("; GPU: torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "") + ".",
        "",
        f"| variant | time (s) | time / {variants[0]} | peak memory (MiB) | memory / {variants[0]} | "
        f"cases identical to {variants[0]} | voxels differing |",
        "|---|---|---|---|---|---|---|",
    ]
    gpu = args.device.startswith("cuda")
    for variant in variants:
        r = results[variant]
        agree = r.get("agreement")
        same = f"{agree['identical_cases']}/{agree['cases']}" if agree else "(reference)"
        voxels = f"{agree['differing_voxels']} of {agree['voxels']}" if agree else ""
        gpu_note = f" (GPU {r['gpu_peak_mib']:.0f})" if gpu else ""
        lines.append(
            f"| {VARIANTS[variant]} | {r['seconds']:.1f} | {r['seconds'] / engine['seconds']:.2f} | "
            f"{r['peak_mib']:.0f}{gpu_note} | "
            f"{r['peak_mib'] / engine['peak_mib']:.2f} | {same} | {voxels} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        from mednext.files import atomic_write_text

        command = "python benchmarks/predict_cohort.py " + " ".join(sys.argv[1:])
        atomic_write_text(args.out, f"Command: `{command}`\n\n{table}")


if __name__ == "__main__":
    main()
