"""The study report's figures: the forest plot of paired differences and the per-task curves.
Both are written atomically (prefixlm.core.atomic), like REPORT.md."""

from __future__ import annotations

import pathlib

import numpy as np

from prefixlm import plots
from prefixlm.core import atomic


def plot_forest(results, arms: list[str], tasks: list[str], base: str,
                path: pathlib.Path, methods: dict[str, str]) -> None:
    """Paired differences to the baseline with 95% intervals: a row per task, a colour per arm;
    Δacc (points, higher is better) left, Δbpb (lower is better) right. Each arm's legend entry
    names its own interval method (``methods[arm]``): arms with one seed pair have item-level
    intervals, the others t-intervals over seed pairs, and one report can hold both."""
    import matplotlib
    from matplotlib.figure import Figure

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    legend_rows = (len(arms) + 1) // 2  # two entries a row, each naming its arm's method
    height = 1.6 + 0.32 * len(tasks) * max(1, len(arms)) + 0.2 * legend_rows
    fig = Figure(figsize=(11, height))
    axes = fig.subplots(1, 2, sharey=True)
    step = 0.8 / max(1, len(arms))
    for j, (ax, metric, scale, xlabel) in enumerate(zip(
            axes, ("acc", "bpb"), (100.0, 1.0),
            ("Δ accuracy, points (arm − baseline; > 0 better)",
             "Δ bits per byte (arm − baseline; < 0 better)"), strict=True)):
        for i, arm in enumerate(arms):
            pts = [(t, getattr(results[arm, t], metric)) for t in tasks if (arm, t) in results]
            if not pts:
                continue
            y_T = np.array([tasks.index(t) for t, _ in pts]) + 0.4 - (i + 0.5) * step
            est_T, lo_T, hi_T = (np.array([iv[k] for _, iv in pts]) * scale for k in range(3))
            ax.errorbar(est_T, y_T, xerr=[est_T - lo_T, hi_T - est_T], fmt="o", ms=4,
                        capsize=3, color=colors[i % len(colors)], label=f"{arm} ({methods[arm]})" if j == 0 else None)
        ax.axvline(0, color="gray", lw=1)
        ax.set(xlabel=xlabel, yticks=range(len(tasks)), ylim=(len(tasks) - 0.5, -0.5))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticklabels(tasks)
    fig.legend(loc="lower center", ncol=min(len(arms), 2), fontsize=8, frameon=False)
    fig.suptitle(f"Paired difference to {base}, exploratory (95% intervals; each arm's method "
                 "in its legend entry)", fontsize=11)
    fig.tight_layout(rect=(0, (0.15 + 0.2 * legend_rows) / height, 1, 1))
    atomic.save_figure(fig, path, dpi=120)


def plot_curves(runs: list, out: pathlib.Path) -> list[pathlib.Path]:
    """Per-task acc and bpb over training for every run (plots.plot_task_curves)."""
    metrics = {}
    for r in runs:  # labelled by directory name, the whole path when two names repeat
        metrics[str(r.path) if r.path.name in metrics else r.path.name] = r.metrics
    tasks = plots.eval_tasks(metrics)
    written = []
    for name, keys, ylabel, title in (
            ("curves_acc.png", plots.ACC_METRICS, "accuracy", "Accuracy vs tokens"),
            ("curves_bpb.png", plots.BPB_METRICS, "bits per byte",
             "Bits per byte of the gold continuation vs tokens (lower is better)")):
        shown = [t for t in tasks if any(f"{t}/{k}" in row for rows in metrics.values()
                                         for row in rows for k in keys)]
        if shown:
            plots.plot_task_curves(metrics, shown, out / name, title, keys, ylabel)
            written.append(out / name)
    return written
