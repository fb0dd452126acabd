"""Two commits of mednext timed against each other: `mednext benchmark` ratios, rounds alternating.

Each round runs ``mednext benchmark ... --repeats 1`` once with each commit's sources (the order
alternates from round to round; the benchmark itself runs every variant in a fresh process on the
CPU), so both commits see the same machine state, and prints the ratios to MONAI of every round
and their medians. Used to show that a change leaves speed unchanged (or by how much it moves it).

    python benchmarks/ab_commits.py OLD_REV NEW_REV --rounds 3 -- --model S --kernel 3 --patch 64 --batch 2

``--plain-step`` times instead a plain training step and inference forward of
``create_mednext(PRESET)`` in each commit's fresh process (one untimed step, the median of
``--steps`` timed ones; ``--threads`` torch threads): no MONAI, one network, less noise per round.

    python benchmarks/ab_commits.py OLD_REV NEW_REV --plain-step --rounds 10 --preset S --patch 64

The commits are checked out as detached git worktrees under ``--checkouts`` (default
``mednext_work/ab``, ignored by git) and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout(rev: str, folder: Path) -> Path:
    if folder.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), rev], check=True)
    return folder


def parse_table(text: str) -> dict[str, tuple[float, float]]:
    """Variant label -> (training-step ratio to MONAI, inference ratio to MONAI) from the printed table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and re.fullmatch(r"[\d.]+", cells[2] or "x") and re.fullmatch(r"[\d.]+", cells[5] or "x"):
            rows[cells[0]] = (float(cells[2]), float(cells[5]))
    return rows


PLAIN_STEP = """
import statistics, sys, time, torch
from mednext import create_mednext
preset, patch, batch, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = create_mednext(preset, 1, 4, kernel_size=3, deep_supervision=True).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(batch, 1, patch, patch, patch)
target = torch.randint(0, 4, (batch, patch, patch, patch))
def step():
    opt.zero_grad(set_to_none=True)
    loss = 0
    for out in model(x):
        t = torch.nn.functional.interpolate(target[:, None].float(), size=out.shape[2:])[:, 0].long()
        loss = loss + torch.nn.functional.cross_entropy(out, t)
    loss.backward()
    opt.step()
def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
step()
train = statistics.median(timed(step) for _ in range(steps))
model.eval()
with torch.no_grad():
    model(x)
    infer = statistics.median(timed(lambda: model(x)) for _ in range(steps))
print(train, infer)
"""


def run_plain_step(source: Path, args: argparse.Namespace) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(source / "src")}
    cmd = [sys.executable, "-c", PLAIN_STEP, args.preset, str(args.patch), str(args.batch), str(args.steps)]
    proc = subprocess.run([*cmd, str(args.threads)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the plain step failed in {source}:\n{proc.stderr[-3000:]}")
    train, infer = (float(v) for v in proc.stdout.split()[-2:])
    return train, infer


def run_once(source: Path, bench_args: list[str]) -> dict[str, tuple[float, float]]:
    env = {**os.environ, "PYTHONPATH": str(source / "src")}
    cmd = [sys.executable, "-m", "mednext", "benchmark", *bench_args, "--repeats", "1", "--no-memory"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {source}:\n{proc.stderr[-3000:]}")
    rows = parse_table(proc.stdout)
    if not rows:
        raise RuntimeError(f"no result table in the output of {' '.join(cmd)}:\n{proc.stdout[-2000:]}")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="the commit to compare against (e.g. a tag or hash)")
    p.add_argument("new", help="the commit under test (e.g. HEAD)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkouts", type=Path, default=ROOT / "mednext_work" / "ab")
    p.add_argument("--plain-step", action="store_true", help="time create_mednext's step, not mednext benchmark")
    p.add_argument("--preset", default="S", help="--plain-step: the preset (default S)")
    p.add_argument("--patch", type=int, default=64, help="--plain-step: cubic patch size (default 64)")
    p.add_argument("--batch", type=int, default=2, help="--plain-step: batch size (default 2)")
    p.add_argument("--steps", type=int, default=4, help="--plain-step: timed steps per process (default 4)")
    p.add_argument("--threads", type=int, default=2, help="--plain-step: torch threads (default 2)")
    args = p.parse_args(argv[:split])
    bench_args = argv[split + 1 :]
    folders = {name: checkout(rev, args.checkouts / name) for name, rev in (("old", args.old), ("new", args.new))}
    if args.plain_step:
        try:
            return plain_step_rounds(args, folders)
        finally:
            for folder in folders.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False)
    results: dict[str, list[dict[str, tuple[float, float]]]] = {"old": [], "new": []}
    try:
        for rnd in range(args.rounds):
            order = ("old", "new") if rnd % 2 == 0 else ("new", "old")
            for name in order:
                results[name].append(run_once(folders[name], bench_args))
                rows = results[name][-1]
                print(
                    f"round {rnd + 1} {name}: " + ", ".join(f"{k} {t:.2f}/{i:.2f}" for k, (t, i) in rows.items()),
                    flush=True,
                )
    finally:
        for folder in folders.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False)
    print(f"\nmednext benchmark {' '.join(bench_args)}; {args.rounds} alternating rounds")
    print(f"old = {args.old}, new = {args.new}; ratios to MONAI's MedNeXt (as shipped), median over rounds\n")
    print("| variant | train x MONAI, old | train x MONAI, new | inference x MONAI, old | inference x MONAI, new |")
    print("|---|---|---|---|---|")
    for label in results["old"][0]:
        med = {
            (name, axis): statistics.median(r[label][axis] for r in results[name] if label in r)
            for name in results
            for axis in (0, 1)
        }
        print(f"| {label} | {med['old', 0]:.2f} | {med['new', 0]:.2f} | {med['old', 1]:.2f} | {med['new', 1]:.2f} |")
    return 0


def plain_step_rounds(args: argparse.Namespace, folders: dict[str, Path]) -> int:
    times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for rnd in range(args.rounds):
        for name in ("old", "new") if rnd % 2 == 0 else ("new", "old"):
            times[name].append(run_plain_step(folders[name], args))
            print(f"round {rnd + 1} {name}: train {times[name][-1][0]:.3f} s, inference {times[name][-1][1]:.3f} s")
    print(
        f"\ncreate_mednext({args.preset!r}) k3, {args.patch}^3, batch {args.batch}, {args.threads} threads; "
        f"{args.rounds} alternating rounds, median of {args.steps} steps per process; old = {args.old}, new = {args.new}\n"
    )
    print("| | old s (median of rounds) | new s | new / old | new / old, per-round median |")
    print("|---|---|---|---|---|")
    for axis, label in ((0, "training step"), (1, "inference forward")):
        old = statistics.median(t[axis] for t in times["old"])
        new = statistics.median(t[axis] for t in times["new"])
        paired = statistics.median(n[axis] / o[axis] for o, n in zip(times["old"], times["new"]))
        print(f"| {label} | {old:.3f} | {new:.3f} | {new / old:.2f} | {paired:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
