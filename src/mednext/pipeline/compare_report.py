"""The report of ``mednext compare`` in words and pictures: ``compare.md`` (the tables a paper would
print and the verdict in words) and the plots, each a function of the report that
:func:`mednext.pipeline.compare.build_report` computes (what ``compare.json`` holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mednext.files import atomic_write

METRICS = ("dice", "nsd")
OVERALL = "mean over classes"
INFERENCE_CASES = 3  # validation cases per fold whose prediction is timed


def count(n: int, word: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def overall(per_class: dict[str, dict[str, float | None]], metric: str) -> float | None:
    """The mean of ``metric`` over the classes scored in one case (None if none is)."""
    values = [v[metric] for v in per_class.values() if v[metric] is not None]
    return float(np.mean(values)) if values else None


# ----------------------------------------------------------------------------- words and tables


def _pts(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def verdict_sentence(report: dict[str, Any], model: str, metric: str = "dice") -> str:
    """``"MedNeXt-S k3 against nnU-Net 3d_fullres (Dice): better on liver (+2.1 Dice, 95% CI 0.8 to 3.4,
    p=0.004), not distinguishable on spleen (...)"``."""
    labels = {m["spec"]: m["label"] for m in report["models"]}
    name = "Dice" if metric == "dice" else "NSD"
    parts = []
    for row in report["comparisons"]:
        if row["model"] != model or row["metric"] != metric:
            continue
        where = "overall" if row["class"] == OVERALL else f"on {row['class']}"
        if row["n"] == 0:
            parts.append(f"no scores {where}")
            continue
        ci = (
            f", 95% CI {_pts(row['ci_low'])} to {_pts(row['ci_high'])}"
            if row["ci_low"] is not None
            else ", no interval"
        )
        parts.append(
            f"{row['verdict']} {where} ({_pts(row['mean_difference'], True)} {name}{ci}, p={_p(row['p_value'])}, "
            f"n={row['n']})"
        )
    return f"{labels[model]} against {labels[report['baseline']]} ({name}): " + "; ".join(parts) + "."


def markdown(report: dict[str, Any]) -> str:
    """``compare.md``: the scores, the paired differences, the costs and the verdict in words."""
    labels = {m["spec"]: m["label"] for m in report["models"]}
    specs = [m["spec"] for m in report["models"]]
    n_cases = len(report["cases"])
    source = report["case_source"].removesuffix("s") if n_cases == 1 else report["case_source"]
    budget = report["budget"]
    length = count(budget["epochs"], "epoch") if budget["epochs"] is not None else f"{budget['hours']:g} h"
    lines = [
        f"# Comparison on {report['dataset']}",
        "",
        f"{len(specs)} models, {'folds' if len(report['folds']) > 1 else 'fold'} "
        f"{' '.join(map(str, report['folds']))} ({n_cases} {source}), "
        f"{length} of training per model and fold. Scores in points (0-100); differences are model minus "
        f"{labels[report['baseline']]}, with a 95% bootstrap interval, the Wilcoxon signed-rank p-value and "
        "wins/ties/losses over cases.",
        "",
        "## Verdict",
        "",
    ]
    for spec in specs:
        if spec != report["baseline"]:
            lines += [f"- {verdict_sentence(report, spec, m)}" for m in METRICS]
    for metric in METRICS:
        title = "Dice" if metric == "dice" else f"NSD ({report['statistics']['nsd_tolerance_mm']:g} mm)"
        lines += ["", f"## {title}", "", "| class | " + " | ".join(labels[s] for s in specs) + " |"]
        lines.append("|---" * (len(specs) + 1) + "|")
        for c in [*report["classes"], OVERALL]:
            cells = []
            for s in specs:
                row = report["means"][s][metric][c]
                sd = f" ± {_pts(row['sd'])}" if row["sd"] is not None else ""
                cells.append(f"{_pts(row['mean'])}{sd}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines += ["", "| model | class | difference | 95% CI | p | wins/ties/losses |", "|---|---|---|---|---|---|"]
        for row in report["comparisons"]:
            if row["metric"] != metric:
                continue
            ci = f"{_pts(row['ci_low'])} to {_pts(row['ci_high'])}" if row["ci_low"] is not None else "-"
            lines.append(
                f"| {labels[row['model']]} | {row['class']} | {_pts(row['mean_difference'], True)} | {ci} | "
                f"{_p(row['p_value'])} | {row['wins']}/{row['ties']}/{row['losses']} |"
            )
    lines += [
        "",
        "## Cost",
        "",
        "| model | parameters | epochs per fold | s per epoch | training h per fold | peak memory (GB) | "
        "inference s per case |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in specs:
        c = report["costs"][s]
        epochs = sorted({e for e in c["epochs_per_fold"] if e is not None})
        lines.append(
            f"| {labels[s]} | {_num(c['parameters'], ',')} | {'/'.join(map(str, epochs)) or '-'} | "
            f"{_num(c['time_per_epoch_s'], '.2f')} | {_num(_div(c['train_s_per_fold'], 3600), '.3f')} | "
            f"{_num(_div(c['peak_memory_mb'], 1024), '.2f')} | {_num(c['inference_s_per_case'], '.2f')} |"
        )
    kinds = sorted({str(report["costs"][s]["peak_memory_kind"]) for s in specs})
    lines += [
        "",
        f"Peak memory: {'; '.join(kinds)}. Inference: the engine's sliding-window prediction with mirroring of "
        f"up to {INFERENCE_CASES} validation cases per fold, preprocessed case to logits. Costs were measured on "
        f"{', '.join(sorted({d for s in specs for d in report['costs'][s]['device']}))}.",
        "",
    ]
    return "\n".join(lines)


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _div(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


# ----------------------------------------------------------------------------- plots


def save_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """``paired_dice.png``, ``paired_nsd.png`` (per class: each case's difference to the baseline, the
    mean and its interval) and ``cost_vs_dice.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with plt.style.context("default"):
        for metric in METRICS:
            written.append(_paired_figure(plt, report, metric, out / f"paired_{metric}.png"))
        written.append(_cost_figure(plt, report, out / "cost_vs_dice.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def _paired_figure(plt: Any, report: dict[str, Any], metric: str, path: Path) -> Path:
    labels = {m["spec"]: m["label"] for m in report["models"]}
    others = [m["spec"] for m in report["models"] if m["spec"] != report["baseline"]]
    classes = [*report["classes"], OVERALL]
    fig, axes = plt.subplots(len(others), 1, figsize=(max(5.0, 1.4 * len(classes) + 2), 3.2 * len(others)),
                             squeeze=False)  # fmt: skip
    rng = np.random.default_rng(0)  # horizontal jitter only
    for ax, spec in zip(axes[:, 0], others, strict=True):
        for x, c in enumerate(classes):
            diffs = []
            for case in report["cases"].values():
                a, b = case[spec], case[report["baseline"]]
                va = overall(a, metric) if c == OVERALL else a[c][metric]
                vb = overall(b, metric) if c == OVERALL else b[c][metric]
                if va is not None and vb is not None:
                    diffs.append(100 * (va - vb))
            ax.scatter(x + rng.uniform(-0.15, 0.15, len(diffs)), diffs, s=14, alpha=0.6, color="tab:blue")
            row = next(
                r for r in report["comparisons"] if r["model"] == spec and r["metric"] == metric and r["class"] == c
            )
            if row["mean_difference"] is not None:
                low = row["ci_low"] if row["ci_low"] is not None else row["mean_difference"]
                high = row["ci_high"] if row["ci_high"] is not None else row["mean_difference"]
                mean = 100 * row["mean_difference"]
                ax.errorbar(x + 0.3, mean, yerr=[[mean - 100 * low], [100 * high - mean]], fmt="o", color="black",
                            capsize=4)  # fmt: skip
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(classes)), classes)
        ax.set_ylabel(f"{'Dice' if metric == 'dice' else 'NSD'} difference (points)")
        ax.set_title(f"{labels[spec]} minus {labels[report['baseline']]} per case (dots); mean and 95% CI (black)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _cost_figure(plt: Any, report: dict[str, Any], path: Path) -> Path:
    fig, (ax_train, ax_infer) = plt.subplots(1, 2, figsize=(10, 4))
    for m in report["models"]:
        costs = report["costs"][m["spec"]]
        dice = report["means"][m["spec"]]["dice"][OVERALL]["mean"]
        if dice is None:
            continue
        for ax, value in ((ax_train, costs["train_s_per_fold"]), (ax_infer, costs["inference_s_per_case"])):
            if value is not None:
                ax.scatter([value], [100 * dice], s=40)
                ax.annotate(m["label"], (value, 100 * dice), textcoords="offset points", xytext=(5, 5))
    ax_train.set_xlabel("training seconds per fold")
    ax_infer.set_xlabel("inference seconds per case")
    for ax in (ax_train, ax_infer):
        ax.set_ylabel("mean Dice over classes (points)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
