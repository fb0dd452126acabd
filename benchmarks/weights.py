"""Measurements behind docs/weights.md: layout parity, export accuracy, an UpKern report, 2D->3D inflation.

    python benchmarks/weights.py parity      # worst output difference per layout (MONAI both ways, reference, own)
    python benchmarks/weights.py export      # ONNX / TorchScript vs PyTorch, 2D and 3D, two input sizes
    python benchmarks/weights.py upkern      # the UpKern report of a B k3 -> k5 conversion (3D)
    python benchmarks/weights.py inflation   # 2D-pretrained + inflated vs from-scratch 3D on a synthetic task

Each prints a markdown table. CPU, one thread; random weights, float32, relative error =
max |ours - theirs| / max |theirs| over all outputs (deep-supervision heads included).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mednext.nn import (
    MedNeXt,
    create_mednext,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
    to_monai,
    to_reference_state_dict,
    upkern,
)
from mednext.nn.weights import inflate_2d_to_3d

SIZES = {3: (32, 16, 16), 2: (32, 64)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def all_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.train()  # deep supervision returns every head; GroupNorm has no running statistics
    with torch.no_grad():
        y = model(x)
    return list(y) if isinstance(y, (list, tuple)) else [y]


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))


def parity() -> None:
    from monai.networks.nets.mednext import MedNeXt as MonaiMedNeXt
    from monai.networks.nets.mednext import create_mednext as monai_create

    paths = ["plain", "fast"] if hasattr(MedNeXt, "set_fast_path") else ["default"]
    print(
        "| preset | k | dims | MONAI -> mednext " + " | ".join(paths) + " | mednext -> MONAI | reference | own file |"
    )
    print("|---|---|---|" + "---|" * (len(paths) + 3))
    worst: dict[str, float] = {}
    for preset, k, dims in itertools.product("SBML", (3, 5), (2, 3)):
        torch.manual_seed(0)
        theirs = monai_create(
            preset, spatial_dims=dims, in_channels=2, out_channels=3, kernel_size=k, deep_supervision=True
        )
        randomise_norms(theirs)
        x = torch.randn(1, 2, *SIZES[dims])
        expected = all_outputs(theirs, x)
        ours = load_pretrained(theirs.state_dict())
        row = {}
        for path in paths:
            if path != "default":
                ours.set_fast_path(path == "fast")
            row[f"monai->{path}"] = max(rel(a, b) for a, b in zip(all_outputs(ours, x), expected))
        if paths != ["default"]:
            ours.set_fast_path(False)
        ours_out = all_outputs(ours, x)
        kwargs, sd = to_monai(ours)
        back = MonaiMedNeXt(**kwargs)
        back.load_state_dict(sd, strict=True)
        row["mednext->monai"] = max(rel(a, b) for a, b in zip(all_outputs(back, x), ours_out))
        # reference layout: our model with the reference's down-block ratios, saved as a .model dict
        reference = create_mednext(preset, 2, 3, kernel_size=k, spatial_dims=dims, deep_supervision=True)
        randomise_norms(reference, 1)
        if hasattr(reference, "set_fast_path"):
            reference.set_fast_path(False)
        with tempfile.TemporaryDirectory() as tmp:
            ref_file = Path(tmp) / "model_final_checkpoint.model"
            sd = {f"module.{k_}": v for k_, v in to_reference_state_dict(reference).items()}
            torch.save({"state_dict": sd, "epoch": 1}, ref_file)
            from_ref = load_pretrained(ref_file)
            own = save_checkpoint(reference, Path(tmp) / "own.safetensors")
            from_own, _ = load_checkpoint(own)
        ref_out = all_outputs(reference, x)
        for name, model in (("reference", from_ref), ("own", from_own)):
            if hasattr(model, "set_fast_path"):
                model.set_fast_path(False)
            row[name] = max(rel(a, b) for a, b in zip(all_outputs(model, x), ref_out))
        for key, value in row.items():
            worst[key] = max(worst.get(key, 0.0), value)
        print(f"| {preset} | {k} | {dims}D | " + " | ".join(f"{v:.1e}" for v in row.values()) + " |", flush=True)
    print("\nworst: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def export() -> None:
    from mednext.nn import export_model, run_exported

    cases = {
        "2D S k3, 1 channel": (create_mednext("S", 1, 3, spatial_dims=2), [(1, 1, 64, 64), (2, 1, 96, 48)]),
        "2D S k3, 2 channels": (create_mednext("S", 2, 3, spatial_dims=2), [(1, 2, 64, 64), (2, 2, 96, 48)]),
        "3D S k3, 2 channels": (create_mednext("S", 2, 3), [(1, 2, 32, 32, 32), (2, 2, 48, 32, 16)]),
        "3D B k5, 2 channels": (create_mednext("B", 2, 3, kernel_size=5), [(1, 2, 32, 32, 32), (1, 2, 16, 48, 32)]),
    }
    print("| model | format | input | relative difference |\n|---|---|---|---|")
    for name, (model, shapes) in cases.items():
        randomise_norms(model)
        model.eval()
        for fmt in ("onnx", "torchscript"):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    path = export_model(model, Path(tmp) / f"m.{fmt}", fmt)
                except Exception as err:  # report and go on: a failing case is a result too
                    print(f"| {name} | {fmt} | - | export failed: {str(err).splitlines()[0][:90]} |")
                    continue
                for shape in shapes:
                    x = torch.randn(*shape)
                    with torch.no_grad():
                        expected = model(x)
                    try:
                        result = f"{rel(run_exported(path, fmt, x), expected):.1e}"
                    except Exception as err:  # an exported file the runtime rejects
                        result = f"run failed: {str(err).splitlines()[0][:90]}"
                    print(f"| {name} | {fmt} | {shape} | {result} |", flush=True)


def upkern_report() -> None:
    torch.manual_seed(0)
    source = create_mednext("B", 1, 4, kernel_size=3, deep_supervision=True)
    target = create_mednext("B", 1, 4, kernel_size=5, deep_supervision=True)
    report = upkern(target, source)
    print(report.summary())
    numel = {k: v.numel() for k, v in target.state_dict().items()}
    copied = sum(numel[k] for k in report.copied)
    interpolated = sum(numel[k] for k, _, _ in report.interpolated)
    print(f"\nparameters: {copied:,} copied, {interpolated:,} interpolated, of {sum(numel.values()):,}")


# ----------------------------------------------------------------------------- inflation


def synthetic_volumes(
    count: int, seed: int, shape: tuple[int, int, int] = (16, 32, 32)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy volumes with one ball (class 1, brighter) and one box (class 2, darker) each."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = shape
    zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    images, labels = [], []
    for _ in range(count):
        label = torch.zeros(shape, dtype=torch.long)
        c = [torch.randint(4, s - 4, (1,), generator=g).item() for s in shape]
        r = 3 + 3 * torch.rand(1, generator=g).item()
        label[((zz - c[0]) ** 2 + ((yy - c[1]) / 1.5) ** 2 + ((xx - c[2]) / 1.5) ** 2) <= r**2] = 1
        lo = [torch.randint(0, s - 8, (1,), generator=g).item() for s in shape]
        size = [torch.randint(3, 7, (1,), generator=g).item() for _ in shape]
        box = (slice(lo[0], lo[0] + size[0]), slice(lo[1], lo[1] + 2 * size[1]), slice(lo[2], lo[2] + 2 * size[2]))
        label[box] = 2
        image = torch.randn(shape, generator=g) * 0.8 + 1.0 * (label == 1) - 1.0 * (label == 2)
        images.append(image[None])
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


def dice(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(images).argmax(1)
    scores = []
    for c in (1, 2):
        p, t = pred == c, labels == c
        scores.append(float(2 * (p & t).sum() / (p.sum() + t.sum()).clamp_min(1)))
    return sum(scores) / len(scores)


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, seed: int,
          evaluate=None, every: int = 0) -> list[tuple[int, float]]:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=3e-5)
    curve = [(0, evaluate(model))] if evaluate else []
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(images), (batch,), generator=g)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if evaluate and every and step % every == 0:
            curve.append((step, evaluate(model)))
    return curve


def inflation(steps_2d: int = 300, steps_3d: int = 120, every: int = 20, seeds: int = 3) -> None:
    train_x, train_y = synthetic_volumes(24, seed=1)
    test_x, test_y = synthetic_volumes(8, seed=2)
    slices_x = train_x.permute(0, 2, 1, 3, 4).reshape(-1, 1, 32, 32)  # every axial slice a 2D case
    slices_y = train_y.reshape(-1, 32, 32)
    arch = {"width": 8, "block_counts": 1, "kernel_sizes": 3, "expansion_ratios": 2}
    curves: dict[str, list[list[tuple[int, float]]]] = {"scratch": [], "spread": [], "centre": []}
    started = time.time()
    for seed in range(seeds):
        torch.manual_seed(100 + seed)
        flat = MedNeXt(1, 3, spatial_dims=2, strides=[(2, 2), (2, 2)], **arch)
        train(flat, slices_x, slices_y, steps_2d, batch=16, seed=seed)
        for name in curves:
            torch.manual_seed(200 + seed)  # the same fresh 3D initialisation for all three
            deep = MedNeXt(1, 3, spatial_dims=3, strides=[(1, 2, 2), (2, 2, 2)], **arch)
            if name != "scratch":
                inflate_2d_to_3d(deep, flat, mode=name)
            curves[name].append(
                train(
                    deep,
                    train_x,
                    train_y,
                    steps_3d,
                    batch=2,
                    seed=seed,
                    evaluate=lambda m: dice(m, test_x, test_y),
                    every=every,
                )  # fmt: skip
            )
    steps = [s for s, _ in curves["scratch"][0]]
    print(f"mean foreground Dice on 8 held-out volumes, mean of {seeds} seeds ({time.time() - started:.0f} s):\n")
    print("| 3D steps | " + " | ".join(map(str, steps)) + " |")
    print("|---|" + "---|" * len(steps))
    for name, runs in curves.items():
        means = [sum(run[i][1] for run in runs) / len(runs) for i in range(len(steps))]
        label = "from scratch" if name == "scratch" else f"2D ({steps_2d} steps) + inflation '{name}'"
        print(f"| {label} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("parity", "export", "upkern", "inflation"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"parity": parity, "export": export, "upkern": upkern_report, "inflation": inflation}[args.what]()


if __name__ == "__main__":
    main()
