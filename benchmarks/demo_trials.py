"""Recipe trials for ``mednext demo``: the demo's training with changed settings, each repeated, at a
fixed number of iterations, scored on the held-out patient.

A GPU runs the iterations that the demo's default budget buys on a small CPU in far less time, so
recipe questions can be answered with several repeats each. Only the hardware differs from the demo: the data, plans, trainer, predictor and scoring are the demo's
own (:func:`mednext.demo.run.prepare_data`, :func:`~mednext.demo.run.train_mednext`,
:func:`mednext.pipeline.predictor.predict`, :func:`~mednext.demo.run.score`).

    python benchmarks/demo_trials.py --out DIR [--device cuda] [--epochs 19] [--repeats 2] [--parallel 4] \
        --variant base --variant rot180:rotation_degrees=180 --variant sgd:optimizer_name='sgd' \
        --variant b12:batch_size_override=12,epochs=8

A variant is ``NAME[:key=value,...]``. Keys: ``epochs`` (this variant's number of 25-iteration epochs),
fields of :class:`~mednext.demo.run.DemoSettings` (``context_slices``, ``enhance``, ``ct_window``,
``model``, ``kernel``) and the demo trainer's overridable attributes
(:data:`~mednext.demo.run.TRAINER_OVERRIDES`). Values are Python literals. The data are prepared and
preprocessed once in ``DIR/base``; each trial runs in its own process on a copy (``DIR/<variant>-<i>``)
and writes ``result.json`` there. The table of all trials goes to ``DIR/trials.md`` and
``DIR/trials.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from mednext.files import atomic_write_text, resolve_device

ENGINE_DIRS = ("nnUNet_raw", "nnUNet_preprocessed")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: literal})``."""
    from mednext.demo.run import TRAINER_OVERRIDES, DemoSettings

    name, _, rest = text.partition(":")
    if not name or "/" in name:
        raise ValueError(f"variant {text!r}: give NAME[:key=value,...]")
    settings_keys = {f.name for f in fields(DemoSettings)}
    options: dict[str, Any] = {}
    for item in filter(None, _split_top_level(rest)):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {text!r}: {item!r} is not key=value")
        if key not in settings_keys | TRAINER_OVERRIDES | {"epochs"}:
            raise ValueError(f"variant {text!r}: unknown key {key!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word, e.g. optimizer_name=sgd
    return name, options


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets (``ct_window=(-200,250)`` stays whole)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _settings(out: Path, device: str, epochs: int, options: dict[str, Any]) -> Any:
    from mednext.demo.run import TRAINER_OVERRIDES, DemoSettings

    overrides = {k: v for k, v in options.items() if k in TRAINER_OVERRIDES}
    plain = {k: v for k, v in options.items() if k not in TRAINER_OVERRIDES and k != "epochs"}
    if "ct_window" in plain and plain["ct_window"] is not None:
        plain["ct_window"] = tuple(plain["ct_window"])
    return DemoSettings(
        out=out, device=device, max_epochs=int(options.get("epochs", epochs)), minutes=1e6, show_progress=False,
        trainer_overrides=overrides, **plain,
    )  # fmt: skip


def prepare(base: Path, device: str, options: dict[str, Any]) -> dict[str, Any]:
    """Raw dataset, plans and preprocessing in ``base`` (the settings that affect preprocessing come from
    ``options``: only ``ct_window``); returns what a trial needs to find them."""
    from mednext.demo.run import prepare_data
    from mednext.pipeline.workdir import use_workdir

    dirs = use_workdir(base)
    settings = _settings(base, device, 1, {k: v for k, v in options.items() if k == "ct_window"})
    info, plans, _ = prepare_data(settings, dirs.raw, time.perf_counter(), {})
    return {
        "dataset": plans["mednext_dataset_name"],
        "image": str(info.heldout_image.relative_to(base)),
        "label": str(info.heldout_label.relative_to(base)),
        "dataset_json": str((info.dataset_dir / "dataset.json").relative_to(base)),
    }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One trial (in its own process: the engine reads its folders from the environment at import)."""
    import torch

    workdir = Path(spec["workdir"])
    from mednext.pipeline.workdir import use_workdir

    use_workdir(workdir)
    from mednext.demo.run import score, train_mednext
    from mednext.pipeline.predictor import predict

    torch.set_num_threads(int(spec["threads"]))
    device = resolve_device(spec["device"])
    settings = _settings(workdir, spec["device"], spec["epochs"], spec["options"])
    start = time.perf_counter()
    trainer = train_mednext(settings, spec["dataset"], device, 1e9)
    train_s = time.perf_counter() - start
    base = Path(spec["base"])
    seg = workdir / "segmentation.nii.gz"
    t = time.perf_counter()
    predict(
        workdir / spec["image"], seg, dataset=spec["dataset"], configuration="2d", folds=["all"],
        model=settings.model, kernel=settings.kernel, plans="MedNeXtPlans", device=spec["device"], tta=True,
        workdir=workdir, log=lambda m: None, crop_body=settings.crop_body,
    )  # fmt: skip
    predict_s = time.perf_counter() - t
    dice, _, voxels = score(seg, base / spec["label"], base / spec["dataset_json"])
    iterations = int(getattr(trainer, "iterations_done", 0))
    result = {
        "variant": spec["variant"],
        "repeat": spec["repeat"],
        "options": spec["options"],
        "dice": dice,
        "voxels": voxels,
        "iterations": iterations,
        "batch_size": int(trainer.batch_size),
        "train_s": round(train_s, 1),
        "predict_s": round(predict_s, 1),
        "final_pseudo_dice": [round(float(v), 4) for v in trainer.logger.get_checkpoint().get("mean_fg_dice", [])][-1:],
    }
    atomic_write_text(workdir / "result.json", json.dumps(result, indent=1))
    return result


def _launch(spec: dict[str, Any], log: Path, workers: int) -> subprocess.Popen:
    env = dict(os.environ)
    for var in ENGINE_DIRS + ("nnUNet_results",):
        env.pop(var, None)
    env["nnUNet_n_proc_DA"] = str(workers)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-u", __file__, "--one", json.dumps(spec)], stdout=f, stderr=subprocess.STDOUT, env=env
        )


def summarise(results: list[dict[str, Any]], classes: list[str]) -> str:
    """A Markdown table: one row per variant, each class as mean (min-max) over its repeats."""
    import numpy as np

    rows = ["| variant | runs | iterations | " + " | ".join(classes) + " | mean of liver and spleen |"]
    rows.append("|" + "---|" * (len(classes) + 4))
    order: list[str] = []
    for r in results:
        order += [r["variant"]] if r["variant"] not in order else []
    for name in order:
        group = [r for r in results if r["variant"] == name]
        cells = []
        for c in classes + ["_ls"]:
            if c == "_ls":
                vals = [np.mean([r["dice"].get("liver") or 0.0, r["dice"].get("spleen") or 0.0]) for r in group]
            else:
                vals = [r["dice"].get(c) for r in group]
                vals = [v for v in vals if v is not None]
            cells.append(f"{np.mean(vals):.3f} ({min(vals):.2f}-{max(vals):.2f})" if vals else "-")
        its = sorted({r["iterations"] for r in group})
        rows.append(f"| {name} | {len(group)} | {'/'.join(map(str, its))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--epochs", type=int, default=19, help="epochs of 25 iterations per trial (the CPU demo: ~19)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4, help="trials at a time")
    ap.add_argument("--workers", type=int, default=3, help="augmentation worker processes per trial")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    ap.add_argument("--variant", action="append", default=[], help="NAME[:key=value,...] (repeatable)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds: start no trial after this")
    ap.add_argument("--summary", type=Path, default=None, help="folder for trials.md/json (default: --out)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(json.loads(args.one))
        return 0
    if args.out is None:
        ap.error("--out is required")
    variants = [parse_variant(v) for v in (args.variant or ["base"])]
    windows = {json.dumps(o.get("ct_window", "default")) for _, o in variants}
    if len(windows) > 1:
        raise SystemExit("ct_window changes preprocessing: all variants of one invocation must share it")
    start = time.perf_counter()
    out = args.out.absolute()
    base = out / "base"
    info = prepare(base, args.device, {k: v for k, v in variants[0][1].items() if k == "ct_window"})
    print(f"[{time.perf_counter() - start:5.0f} s] data prepared in {base}", flush=True)
    specs = []
    for repeat in range(args.repeats):  # round-robin: every variant gets its first run before any its second
        for name, options in variants:
            workdir = out / f"{name}-{repeat}"
            specs.append(
                {**info, "variant": name, "repeat": repeat, "options": options, "workdir": str(workdir),
                 "base": str(base), "device": args.device, "epochs": args.epochs, "threads": args.threads}
            )  # fmt: skip
    running: list[tuple[dict, subprocess.Popen]] = []
    results: list[dict[str, Any]] = []
    pending = list(specs)
    while pending or running:
        late = args.deadline is not None and time.perf_counter() - start > args.deadline
        while pending and len(running) < args.parallel and not late:
            spec = pending.pop(0)
            workdir = Path(spec["workdir"])
            shutil.rmtree(workdir, ignore_errors=True)
            for sub in ENGINE_DIRS:
                shutil.copytree(base / sub, workdir / sub)
            running.append((spec, _launch(spec, workdir / "log.txt", args.workers)))
        if late:
            pending.clear()
        time.sleep(2)
        for spec, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((spec, proc))
            path = Path(spec["workdir"]) / "result.json"
            if proc.returncode == 0 and path.exists():
                r = json.loads(path.read_text())
                results.append(r)
                write_summary(
                    args.summary or out, results, base / info["dataset_json"], args, time.perf_counter() - start
                )
                d = r["dice"]
                print(
                    f"[{time.perf_counter() - start:5.0f} s] {spec['variant']}-{spec['repeat']}: "
                    f"{r['iterations']} it, train {r['train_s']:.0f} s; liver {d.get('liver')}, "
                    f"spleen {d.get('spleen')}, stomach {d.get('stomach')}, aorta {d.get('aorta')}",
                    flush=True,
                )
            else:
                tail = (Path(spec["workdir"]) / "log.txt").read_text()[-3000:]
                print(f"{spec['variant']}-{spec['repeat']} failed (exit {proc.returncode}):\n{tail}", flush=True)
    table = write_summary(args.summary or out, results, base / info["dataset_json"], args, time.perf_counter() - start)
    print(table)
    return 0


def write_summary(folder: Path, results: list[dict[str, Any]], dataset_json: Path, args: Any, seconds: float) -> str:
    """``trials.json`` and ``trials.md`` in ``folder`` (rewritten after every finished trial)."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = [c for c in json.loads(dataset_json.read_text())["labels"] if c != "background"]
    table = summarise(sorted(results, key=lambda r: r["repeat"]), classes) if results else "(no trial finished)"
    atomic_write_text(folder / "trials.json", json.dumps(results, indent=1))
    atomic_write_text(
        folder / "trials.md",
        f"device {args.device}, {args.epochs} epochs of 25 iterations unless the variant says otherwise, "
        f"{seconds:.0f} s in all\n\n{table}\n",
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
