"""Plots: prefix-set statistics of a vocabulary, and metric curves across runs.

    python -m prefixlm.plots prefix-counts --tokenizer llama3 --output DIR
    python -m prefixlm.plots targets --word " personality" --output DIR
    python -m prefixlm.plots metrics RUN_DIR... --output DIR

``prefix-counts`` is the seed's ``plot_prefix_counts.py``: a histogram of |P(s)| over the
vocabulary (PNG) and a markdown table of how many tokens have prefixes, percentiles, the largest
sets and worked examples, so one can see how much smoothing mass each objective has to spread.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from prefixlm.core import atomic, cli, errors, schemas

EXAMPLES = (" personality", " strawberry", "ing", " the", " understanding", "2026")


def _printable(b: bytes) -> str:
    if len(b) > 8 and len(set(b)) == 1:  # runs of spaces/dashes read better as a count
        return f"{len(b)} x {bytes([b[0]]).decode('latin-1')!r}"
    return repr(b.decode("utf-8", errors="backslashreplace"))


def prefix_count_stats(tok, index) -> dict:
    """Summary numbers of |P(s)| over the non-special tokens of a vocabulary."""
    regular = np.array([b is not None for b in tok.token_bytes])
    counts = index.counts_V[regular]
    pct = {p: float(np.percentile(counts, p)) for p in (50, 90, 99)}
    largest = np.argsort(-index.counts_V, kind="stable")[:5]
    examples = {}
    for word in EXAMPLES:
        ids = tok.encode(word)
        if len(ids) == 1:
            examples[word] = [tok.token_bytes[i] for i in index.prefixes_of(ids[0])]
    return {
        "vocab_size": tok.vocab_size,
        "regular_tokens": int(regular.sum()),
        "special_tokens": int((~regular).sum()),
        "with_prefixes": int((counts > 0).sum()),
        "mean": float(counts.mean()),
        "percentiles": pct,
        "max": int(counts.max()),
        "largest": [(int(i), tok.token_bytes[i], int(index.counts_V[i])) for i in largest],
        "examples": examples,
        "histogram": np.bincount(counts).tolist(),
    }


def prefix_count_table(stats: dict) -> str:
    p = stats["percentiles"]
    lines = [
        "| quantity | value |", "|---|---|",
        f"| vocabulary (regular + special) | {stats['regular_tokens']:,} + "
        f"{stats['special_tokens']:,} |",
        f"| tokens with a nonempty P(s) | {stats['with_prefixes']:,} "
        f"({stats['with_prefixes'] / stats['regular_tokens']:.1%}) |",
        f"| mean \\|P(s)\\| | {stats['mean']:.2f} |",
        f"| p50 / p90 / p99 / max | {p[50]:g} / {p[90]:g} / {p[99]:g} / {stats['max']} |",
        "",
        "| largest sets: id | token bytes | \\|P(s)\\| |",
        "|---|---|---|",
    ]
    lines += [f"| {i} | {_printable(b)} | {n} |" for i, b, n in stats["largest"]]
    lines += ["", "| token | P(s) |", "|---|---|"]
    for word, pref in stats["examples"].items():
        lines.append(f"| {word!r} | {', '.join(_printable(b) for b in pref) or '(none)'} |")
    return "\n".join(lines) + "\n"


def plot_prefix_counts(stats: dict, path: pathlib.Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    hist = np.asarray(stats["histogram"])
    fig = Figure(figsize=(12, 4.2))
    ax, ax_log = fig.subplots(1, 2)
    sizes = np.arange(len(hist))
    shown = sizes <= 20
    ax.bar(sizes[shown], hist[shown], color="#3b6ea8")
    ax.set(xlabel="|P(s)|: number of strict-prefix tokens", ylabel="tokens",
           title="Prefix-set sizes (|P(s)| <= 20)", xticks=sizes[shown][::2])
    nz = hist > 0
    ax_log.scatter(sizes[nz], hist[nz], s=12, color="#a83b3b")
    ax_log.set(yscale="log", xlabel="|P(s)|", ylabel="tokens (log scale)",
               title=f"Full range (max {stats['max']})")
    p = stats["percentiles"]
    fig.suptitle(
        f"{stats['with_prefixes']:,} of {stats['regular_tokens']:,} tokens have prefixes; "
        f"p50 {p[50]:g}, p90 {p[90]:g}, p99 {p[99]:g}"
    )
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=120)


def prefix_counts_main(args) -> int:
    from prefixlm.vocab import prefixes, tokenizer

    tok = tokenizer.load(args.tokenizer)
    stats = prefix_count_stats(tok, prefixes.build(tok.token_bytes))
    (out := pathlib.Path(args.output)).mkdir(parents=True, exist_ok=True)
    plot_prefix_counts(stats, out / "prefix_counts.png")
    table = prefix_count_table(stats)
    (out / "prefix_counts.md").write_text(table)
    serialisable = {k: v for k, v in stats.items() if k not in ("largest", "examples")}
    (out / "prefix_counts.json").write_text(json.dumps(serialisable, indent=1))
    print(table)
    print(f"wrote {out / 'prefix_counts.png'}, {out / 'prefix_counts.md'}")
    return 0


def target_rows(tok, gold_id: int, runs=None, **kwargs) -> tuple[list[int], dict]:
    """q restricted to the gold token and its prefixes, for each objective; plus the support.

    ``runs`` is a sequence of (label, name, eps); default the seed's seven runs.
    """
    from prefixlm import objectives
    from prefixlm.objectives import families
    from prefixlm.vocab import prefixes

    runs = families.SEVEN_RUNS if runs is None else runs
    index = prefixes.build(tok.token_bytes)
    support = index.prefixes_of(gold_id) + [gold_id]
    rows = {}
    for label, name, eps in runs:
        obj = objectives.build(name, tok.token_bytes, eps=eps, index=index, **kwargs)
        rows[label] = np.asarray(obj.target([gold_id]))[0, support]
    return support, rows


def plot_targets(tok, word: str, path: pathlib.Path, **kwargs) -> None:
    """Bar charts of the seven target distributions over the gold token's prefixes."""
    from matplotlib.figure import Figure

    ids = tok.encode(word)
    if len(ids) != 1:
        raise errors.ConfigError(f"{word!r} is {len(ids)} tokens {ids}; pick a word that is one token "
                         "(a leading space often helps: ' personality')")
    support, rows = target_rows(tok, ids[0], **kwargs)
    labels = [_printable(tok.token_bytes[i]) for i in support]
    fig = Figure(figsize=(2.6 * len(rows), 3.8))
    axes = fig.subplots(1, len(rows), sharey=True)
    for ax, (label, q) in zip(axes, rows.items(), strict=True):
        ax.barh(range(len(q)), q, color=["#3b6ea8"] * (len(q) - 1) + ["#a83b3b"])  # gold red
        ax.set_title(label, fontsize=9)
        ax.set(xlim=(0, 1), xlabel="q")
        for y, v in enumerate(q):
            if v > 0:
                ax.text(min(v + 0.02, 0.7), y, f"{v:.3f}", va="center", fontsize=7)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    fig.suptitle(f"Target distributions for gold token {word!r} (red) over its prefixes P(s)")
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)


def targets_main(args) -> int:
    from prefixlm.vocab import tokenizer

    (out := pathlib.Path(args.output)).mkdir(parents=True, exist_ok=True)
    path = out / f"targets_{args.word.strip() or 'space'}.png"
    plot_targets(tokenizer.load(args.tokenizer), args.word, path, prefix_set=args.prefix_set)
    print(f"wrote {path}")
    return 0


# ---- metrics: curves and final results across training runs (python -m prefixlm.plots metrics) --
# Reads RUN_DIR/metrics.jsonl as train.py writes it (one JSON object per log line; restarts append,
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


def metrics_main(args) -> int:
    runs = {}
    for d in args.run_dirs:  # labelled by the directory's name, its path when names repeat
        name = pathlib.Path(d).resolve().name
        runs[str(pathlib.Path(d)) if name in runs else name] = load_metrics(d)
    (out := pathlib.Path(args.output)).mkdir(parents=True, exist_ok=True)
    written = [out / "training.png"]
    plot_training_curves(runs, written[0], smoothing=args.smoothing)
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
    print(table)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m prefixlm.plots",
        description="Plots for prefixlm: vocabulary prefix statistics and run metrics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("prefix-counts", help="histogram and table of |P(s)| over a vocabulary")
    pc.add_argument("--tokenizer", default="llama3",
                    help="'llama3' (offline, from llama-models) or an HF hub id / local dir")
    pc.add_argument("--output", required=True, help="directory for the PNG, .md and .json")
    pc.set_defaults(func=prefix_counts_main)
    tg = sub.add_parser("targets", help="the seven target distributions for one gold token")
    tg.add_argument("--word", default=" personality", help="text that is a single token")
    tg.add_argument("--tokenizer", default="llama3")
    tg.add_argument("--prefix-set", default="proper", choices=("proper", "with_gold"))
    tg.add_argument("--output", required=True, help="directory for the PNG")
    tg.set_defaults(func=targets_main)
    mt = sub.add_parser(
        "metrics", help="loss/NLL/accuracy curves across runs and a final-results table",
        description="Reads RUN_DIR/metrics.jsonl of each run and writes training.png (training "
        "loss, gold NLL, validation loss/NLL vs tokens), tasks.png (each task's acc/acc_norm, "
        "±1 stderr bands), tasks_bpb.png (gold bits per byte), <group>.png for task groups "
        "such as charbench (with the majority-answer baseline), and final_results.md. One line "
        "per run, labelled by the run directory's name.")
    mt.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training workdirs")
    mt.add_argument("--output", required=True, help="directory for the PNGs and the table")
    mt.add_argument("--smoothing", type=float, default=0.9,
                    help="EMA weight for the noisy training curves, 0 = raw (default 0.9)")
    mt.set_defaults(func=metrics_main)
    return parser


@cli.command
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
