"""``mednext plan``: register, check, fingerprint, plan and preprocess a raw nnU-Net v2 dataset."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="fingerprint, plan and preprocess a dataset with the MedNeXt planners",
        description=(
            "Register a raw nnU-Net v2 dataset folder (or use one already registered, by name or id), check "
            "it, extract its fingerprint, plan MedNeXt configurations and preprocess them."
        ),
    )
    p.add_argument("dataset", help="raw dataset folder (DatasetXXX_Name with dataset.json), or a registered name/id")
    p.add_argument("--workdir", default=None, help="working folder (default ./mednext_work)")
    p.add_argument(
        "--recipe",
        choices=("auto", "paper"),
        default="auto",
        help="auto: the engine's spacing and patch, sized for MedNeXt's memory (default); "
        "paper: 1 mm isotropic, 128^3 patch (512^2 in 2D), batch 2",
    )
    p.add_argument("--configs", default="2d,3d_fullres", help="comma-separated configurations (default 2d,3d_fullres)")
    p.add_argument(
        "--memory-gb", type=float, default=8.0, help="GPU memory target of the auto recipe in GB (default 8)"
    )
    p.add_argument("--num-processes", type=int, default=None, help="worker processes (default: up to 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from mednext.pipeline.runner import PlanSettings, plan
    from mednext.pipeline.workdir import use_workdir

    dirs = use_workdir(args.workdir)
    if dirs.describe():
        print(dirs.describe())
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    start = time.perf_counter()
    plans = plan(PlanSettings(args.dataset, args.recipe, configs, args.memory_gb, args.num_processes))
    name = plans["mednext_dataset_name"]
    print(f"\nplanned {name} with recipe {args.recipe} ({plans['plans_name']}) in {time.perf_counter() - start:.0f} s")
    for cfg in configs:
        if cfg not in plans["configurations"]:
            continue
        c = plans["configurations"][cfg]
        strides = c["architecture"]["arch_kwargs"]["strides"]
        print(
            f"  {cfg:10s} patch {c['patch_size']} batch {c['batch_size']} spacing "
            f"{[round(s, 3) for s in c['spacing']]} stage strides {strides}"
        )
    for cfg in plans.get("mednext_skipped", []):
        print(f"  {cfg:10s} skipped: not possible for this dataset")
    print(f"plans: {dirs.preprocessed / name / (plans['plans_name'] + '.json')}")
    return 0
