"""Plots: prefix-set statistics of a vocabulary, and metric curves across runs.

    python -m prefixlm.plots prefix-counts --tokenizer llama3 --output DIR
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
        "| quantity | value |",
        "|---|---|",
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = np.asarray(stats["histogram"])
    fig, (ax, ax_log) = plt.subplots(1, 2, figsize=(12, 4.2))
    sizes = np.arange(len(hist))
    shown = sizes <= 20
    ax.bar(sizes[shown], hist[shown], color="#3b6ea8")
    ax.set_xlabel("|P(s)|: number of strict-prefix tokens")
    ax.set_ylabel("tokens")
    ax.set_title("Prefix-set sizes (|P(s)| <= 20)")
    ax.set_xticks(sizes[shown][::2])
    nz = hist > 0
    ax_log.scatter(sizes[nz], hist[nz], s=12, color="#a83b3b")
    ax_log.set_yscale("log")
    ax_log.set_xlabel("|P(s)|")
    ax_log.set_ylabel("tokens (log scale)")
    ax_log.set_title(f"Full range (max {stats['max']})")
    p = stats["percentiles"]
    fig.suptitle(
        f"{stats['with_prefixes']:,} of {stats['regular_tokens']:,} tokens have prefixes; "
        f"p50 {p[50]:g}, p90 {p[90]:g}, p99 {p[99]:g}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prefix_counts_main(args) -> int:
    from prefixlm import prefixes, tokenizer

    tok = tokenizer.load(args.tokenizer)
    index = prefixes.build(tok.token_bytes)
    stats = prefix_count_stats(tok, index)
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    plot_prefix_counts(stats, out / "prefix_counts.png")
    table = prefix_count_table(stats)
    (out / "prefix_counts.md").write_text(table)
    serialisable = {k: v for k, v in stats.items() if k not in ("largest", "examples")}
    (out / "prefix_counts.json").write_text(json.dumps(serialisable, indent=1))
    print(table)
    print(f"wrote {out / 'prefix_counts.png'}, {out / 'prefix_counts.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prefixlm.plots",
        description="Plots for prefixlm: vocabulary prefix statistics and run metrics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("prefix-counts", help="histogram and table of |P(s)| over a vocabulary")
    pc.add_argument("--tokenizer", default="llama3",
                    help="'llama3' (offline, from llama-models) or an HF hub id / local dir")
    pc.add_argument("--output", required=True, help="directory for the PNG, .md and .json")
    pc.set_defaults(func=prefix_counts_main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
