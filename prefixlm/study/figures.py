"""The study's figures: metric curves across runs (``python -m prefixlm.plots metrics``), the
report's forest plot of paired differences and its per-task curves. All are written atomically
(prefixlm.core.atomic), like REPORT.md; numpy and matplotlib only, never JAX."""

from __future__ import annotations

import pathlib

import numpy as np

from prefixlm.core import atomic, schemas


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
    """Per-task acc and bpb over training for every run (plot_task_curves)."""
    metrics = {}
    for r in runs:  # labelled by directory name, the whole path when two names repeat
        metrics[str(r.path) if r.path.name in metrics else r.path.name] = r.metrics
    tasks = eval_tasks(metrics)
    written = []
    for name, keys, ylabel, title in (
            ("curves_acc.png", ACC_METRICS, "accuracy", "Accuracy vs tokens"),
            ("curves_bpb.png", BPB_METRICS, "bits per byte",
             "Bits per byte of the gold continuation vs tokens (lower is better)")):
        shown = [t for t in tasks if any(f"{t}/{k}" in row for rows in metrics.values()
                                         for row in rows for k in keys)]
        if shown:
            plot_task_curves(metrics, shown, out / name, title, keys, ylabel)
            written.append(out / name)
    return written


# ---- metrics: curves and final results across training runs (python -m prefixlm.plots metrics) --
# Reads RUN_DIR/metrics.jsonl as training writes it (one JSON object per log line; restarts append,
# so a repeated step keeps its last record) and plots against tokens seen, which is comparable
# across runs with different batch sizes; step is the fallback when a run logs no "tokens".

TRAIN_KEYS = (("loss", "training loss (own objective)"),
              ("nll", "training gold-token NLL"),
              ("val/loss", "validation loss (own objective)"),
              ("val/nll", "validation gold-token NLL"))
ACC_METRICS = ("acc", "acc_norm")
BPB_METRICS = ("bpb",)  # gold-continuation bits per byte: continuous, moves before accuracy
TASK_METRICS = ACC_METRICS + BPB_METRICS


def load_metrics(run_dir) -> list[dict]:
    """Records of RUN_DIR/metrics.jsonl, one per step (the last one written wins), by step."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass training workdirs (python -m "
                                "prefixlm.main --workdir DIR writes DIR/metrics.jsonl)")
    by_step: dict = {}
    for rec in schemas.read_jsonl(path, schemas.METRICS_ROW):  # the one reader: a torn last
        by_step.setdefault(rec["step"], {}).update(rec)           # line dropped, others checked
    return [by_step[k] for k in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, x_label) over the records that have a finite ``key``; x is tokens (or step)."""
    xk = "tokens" if any("tokens" in r for r in records) else "step"
    pts = [(r[xk], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and xk in r and np.isfinite(r[key])]
    x, y = np.asarray(pts, dtype=np.float64).reshape(-1, 2).T
    return x, y, xk


def ema(y: np.ndarray, smoothing: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing slider)."""
    out, acc, w = np.empty_like(y), 0.0, 0.0
    for i, v in enumerate(y):
        acc, w = smoothing * acc + (1 - smoothing) * v, smoothing * w + (1 - smoothing)
        out[i] = acc / w
    return out


def eval_tasks(runs: dict[str, list[dict]]) -> list[str]:
    """Task names with an accuracy or bpb in any run (``<task>/acc|bpb`` keys), groups first."""
    names = {k.split("/")[0] for recs in runs.values() for r in recs for k in r
             if "/" in k and k.split("/", 1)[1] in TASK_METRICS and not k.startswith("val/")}
    top = sorted(n for n in names if not any(n != m and n.startswith(m + "_") for m in names))
    return top + sorted(names - set(top))


def _fmt_tokens(x, _pos=None) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def plot_training_curves(runs: dict[str, list[dict]], path: pathlib.Path,
                         smoothing: float = 0.9) -> None:
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, backend left alone
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, TRAIN_KEYS, strict=True):
        xlabel, drawn = "tokens", False
        for i, (name, recs) in enumerate(runs.items()):
            x, y, xlabel = series(recs, key)
            if not len(x):
                continue
            c = colors[i % len(colors)]
            if key.startswith("val/"):
                ax.plot(x, y, "o-", color=c, ms=3, lw=1.5, label=name)
            else:  # training losses are noisy: raw faint, smoothed bold
                ax.plot(x, y, color=c, alpha=0.2, lw=0.8)
                ax.plot(x, ema(y, smoothing), color=c, lw=1.8, label=name)
            drawn = True
        ax.set(title=title + ("" if key.startswith("val/") else f" (EMA {smoothing:g})"),
               xlabel=xlabel, ylabel="nats / token")
        ax.xaxis.set_major_formatter(FuncFormatter(_fmt_tokens))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
            _clip_start(ax, runs, key, smoothing)
        else:
            ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.suptitle("Own-objective losses are not comparable across objectives (smoothing adds "
                 "entropy): compare runs on the gold-token NLL", fontsize=11)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=120)


def _clip_start(ax, runs, key, smoothing) -> None:
    """Keep the y range on the interesting part: the first few % of training dwarf the rest."""
    tails = []
    for recs in runs.values():
        _, y, _ = series(recs, key)
        if len(y) >= 10:
            ys = y if key.startswith("val/") else ema(y, smoothing)
            tails.append(ys[len(ys) // 10:])
    if tails:
        lo, hi = min(float(t.min()) for t in tails), max(float(t.max()) for t in tails)
        pad = 0.05 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def plot_task_curves(runs: dict[str, list[dict]], tasks: list[str], path: pathlib.Path,
                     title: str, metrics=ACC_METRICS, ylabel: str = "accuracy") -> None:
    """A panel per task, a colour per run, a line style per metric (``metrics``: keys after
    ``<task>/``); ±1 stderr bands where ``<task>/<metric>_stderr`` is logged."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    ncol = min(3, max(1, len(tasks)))
    nrow = -(-len(tasks) // ncol)
    fig = Figure(figsize=(5 * ncol, 3.6 * nrow + 0.9))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"acc": "o-", "acc_norm": "s--", "bpb": "o-"}
    seen_metrics, any_majority = set(), False
    for ax, task in zip(axes.flat, tasks, strict=False):
        xlabel = "tokens"
        for i, recs in enumerate(runs.values()):
            c = colors[i % len(colors)]
            for metric in metrics:
                x, y, xlabel = series(recs, f"{task}/{metric}")
                if not len(x):
                    continue
                seen_metrics.add(metric)
                _, err, _ = series(recs, f"{task}/{metric}_stderr")
                ax.plot(x, y, styles[metric], color=c, ms=3, lw=1.4,
                        alpha=0.7 if metric == "acc_norm" else 1.0)
                if len(err) == len(y):
                    ax.fill_between(x, y - err, y + err, color=c, alpha=0.12)
        majorities = [series(recs, f"{task}/majority")[1] for recs in runs.values()]
        majorities = [m[-1] for m in majorities if len(m) and "acc" in metrics]
        if majorities:
            any_majority = True
            ax.axhline(float(majorities[0]), color="gray", ls=":", lw=1.2)
            ax.annotate(f"majority {majorities[0]:.3f}", (0.01, float(majorities[0])), fontsize=7,
                        xycoords=("axes fraction", "data"), va="bottom", color="gray")
        ax.set(title=task, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_formatter(FuncFormatter(_fmt_tokens))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    # One legend for the figure: a colour per run, a line style per metric.
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2, label=name)
               for i, name in enumerate(runs)]
    handles += [Line2D([], [], color="black", ls=styles[m][1:], marker=styles[m][0], ms=3,
                       label=m) for m in metrics if m in seen_metrics]
    if any_majority:
        handles.append(Line2D([], [], color="gray", ls=":", label="majority-answer baseline"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)
    fig.suptitle(title + " (bands: ±1 standard error)", fontsize=11)
    fig.tight_layout(rect=(0, 0.9 / (3.6 * nrow + 0.9), 1, 1))
    atomic.save_figure(fig, path, dpi=120)


def final_results_table(runs: dict[str, list[dict]], tasks: list[str]) -> str:
    """Markdown: a row per task metric, a column per run; the last logged value ± stderr."""
    names = list(runs)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def last(recs, key):
        _, v, _ = series(recs, key)
        return v[-1] if len(v) else None

    tokens = [max((r.get("tokens", r.get("step", 0)) for r in recs), default=0)
              for recs in runs.values()]
    lines.append("| tokens | " + " | ".join(_fmt_tokens(t) for t in tokens) + " |")
    for key in ("val/nll", "val/loss"):
        vals = ["" if (v := last(recs, key)) is None else f"{v:.4f}" for recs in runs.values()]
        if any(vals):
            lines.append(f"| {key} | " + " | ".join(vals) + " |")
    majority = {}
    for t in tasks:
        for m in TASK_METRICS:
            cells = []
            for recs in runs.values():
                v, se = last(recs, f"{t}/{m}"), last(recs, f"{t}/{m}_stderr")
                cells.append("" if v is None else f"{v:.4f}" if se is None
                             else f"{v:.4f} ± {se:.4f}")
            if any(cells):
                lines.append(f"| {t} {m} | " + " | ".join(cells) + " |")
        maj = [v for recs in runs.values() if (v := last(recs, f"{t}/majority")) is not None]
        if maj:
            majority[t] = maj[0]
    if majority:
        lines += ["", "Majority-answer baselines (always the most frequent gold answer): "
                  + ", ".join(f"{t} {v:.4f}" for t, v in majority.items())]
    return "\n".join(lines) + "\n"


def write_metrics_figures(run_dirs, output, smoothing: float = 0.9) -> tuple[list[pathlib.Path], str]:
    """training.png, tasks.png, tasks_bpb.png, <group>.png and final_results.md of the runs in
    ``output``; returns the paths written and the final-results table."""
    runs = {}
    for d in run_dirs:  # labelled by the directory's name, its path when names repeat
        name = pathlib.Path(d).resolve().name
        runs[str(pathlib.Path(d)) if name in runs else name] = load_metrics(d)
    (out := pathlib.Path(output)).mkdir(parents=True, exist_ok=True)
    written = [out / "training.png"]
    plot_training_curves(runs, written[0], smoothing=smoothing)
    tasks = eval_tasks(runs)
    top = [t for t in tasks if not any(t != g and t.startswith(g + "_") for g in tasks)]
    if top:
        written.append(out / "tasks.png")
        plot_task_curves(runs, top, written[-1], "Downstream accuracy vs tokens")
    with_bpb = [t for t in top if any(f"{t}/bpb" in r for recs in runs.values() for r in recs)]
    if with_bpb:
        written.append(out / "tasks_bpb.png")
        plot_task_curves(runs, with_bpb, written[-1], "Bits per byte of the gold continuation "
                         "vs tokens (lower is better)", BPB_METRICS, "bits per byte")
    for group in top:
        subs = [t for t in tasks if t.startswith(group + "_")]
        if subs:
            written.append(out / f"{group}.png")
            plot_task_curves(runs, [group] + subs, written[-1], f"{group} by task type")
    written.append(out / "final_results.md")
    written[-1].write_text(table := final_results_table(runs, tasks))
    return written, table
