"""Plots: prefix-set statistics of a vocabulary, and metric curves across runs (the curves are
``prefixlm.study.figures``).

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

from prefixlm.core import atomic, cli, errors
from prefixlm.study import figures

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


def metrics_main(args) -> int:
    written, table = figures.write_metrics_figures(args.run_dirs, args.output, args.smoothing)
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
