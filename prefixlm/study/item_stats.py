"""Paired comparisons of two runs scored on the same evaluation items (numpy only).

Why paired: the in-loop evaluation scores the same documents in every run and writes one line per
document (``RUN_DIR/eval/step_XXXXXXXX.jsonl``). Two ~100M models differ by a point or two while
each accuracy alone has a stderr of about a point; but most items are answered alike by both
runs, so the per-item difference cancels item difficulty and its interval is several times
narrower than two independent error bars suggest.

- Δacc: mean over items of correct(arm) - correct(baseline). Its 95% interval is the percentile
  interval of a paired bootstrap over items (``paired_bootstrap``: the same resampled items for
  both runs); beside it McNemar's exact two-sided p on the discordant pairs (``mcnemar_exact``).
- bpb: bits per byte of the gold continuation, -log2 p(gold) / bytes per document and averaged
  over documents, exactly as ``prefixlm.evaluation.results.bpb_metrics`` logs ``<task>/bpb`` (OLMES's
  continuous metric; lower is better; it moves before accuracy does). Δbpb is the mean of the
  per-document differences, bootstrapped the same way.
- ``compare`` averages the per-item differences over the seed pairs it is given before
  bootstrapping: an item-level interval. The report uses it for ONE seed pair only; with several,
  run-to-run variance must enter the interval (prefixlm.study.seed_stats).
- ``answer_baselines`` / ``majority_split``: chance, the majority-answer baseline, and how much of
  a Δacc comes from items whose gold answer is the majority answer (a change of answer
  preference, not of knowledge, shows up there).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing

import numpy as np

RESAMPLES = 2000


def finite_mean(x_N) -> float:
    x_N = np.asarray(x_N, dtype=np.float64)
    x_N = x_N[np.isfinite(x_N)]
    return float(x_N.mean()) if len(x_N) else math.nan


class Interval(typing.NamedTuple):
    """A point estimate with its 95% interval."""
    est: float
    lo: float
    hi: float


def bootstrap_means(diff_N, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """float64 [resamples]: the mean of ``diff_N`` over resamplings of its items with
    replacement, drawn in chunks of ~4M indices so memory stays small at 10k items."""
    diff_N = np.asarray(diff_N, dtype=np.float64)
    n = len(diff_N)
    chunk = max(1, 2**22 // n)
    means_R = []
    for start in range(0, resamples, chunk):
        idx_RxN = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        means_R.append(diff_N[idx_RxN].mean(1))
    return np.concatenate(means_R)


def paired_bootstrap(diff_N, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of per-item paired differences, with the 2.5/97.5 percentiles of that mean over
    ``resamples`` resamplings of the items with replacement.

    Resampling the differences (not each run's scores apart) keeps both runs on the same
    resampled items, which is what makes the interval paired. It covers the choice of items
    only: run-to-run variance needs several seeds (prefixlm.study.seed_stats).
    """
    diff_N = np.asarray(diff_N, dtype=np.float64)
    if len(diff_N) == 0:
        return Interval(math.nan, math.nan, math.nan)
    means_R = bootstrap_means(diff_N, resamples, np.random.default_rng(seed))
    lo, hi = np.percentile(means_R, [2.5, 97.5])
    return Interval(float(diff_N.mean()), float(lo), float(hi))


def mcnemar_exact(arm_correct_N, base_correct_N) -> tuple[float, int, int]:
    """(two-sided p, b, c): b items only the arm gets right, c only the baseline. Under no
    difference each discordant item is a fair coin, so p = P(Binomial(b+c, 1/2) as extreme);
    the sum is in exact integers (binomial coefficients built up one ratio at a time)."""
    arm, base = np.asarray(arm_correct_N) > 0.5, np.asarray(base_correct_N) > 0.5
    b, c = int((arm & ~base).sum()), int((~arm & base).sum())
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0, b, c
    term, tail = 1, 1
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n), b, c


def mean_stderr(x_N) -> tuple[float, float]:
    """Mean and its standard error (sample sd / sqrt(n), lm-eval's ``mean_stderr``)."""
    x_N = np.asarray(x_N, dtype=np.float64)
    se = float(x_N.std(ddof=1) / math.sqrt(len(x_N))) if len(x_N) > 1 else math.nan
    return float(x_N.mean()), se


@dataclasses.dataclass
class Items:
    """One run's scored documents of one task, sorted by doc_id."""
    doc_id_N: np.ndarray
    correct_N: np.ndarray
    correct_norm_N: np.ndarray  # nan where the task has no length-normalised accuracy
    bpb_N: np.ndarray  # -log2 p(gold continuation) / its UTF-8 bytes; nan for 0 bytes
    # Multiple choice: the number of choices, the gold choice and the argmax choice; nan where
    # a row lacks the field (per-item files written before gold_index / pred_index existed).
    n_choices_N: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    gold_index_N: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    pred_index_N: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

    def __post_init__(self):
        for name in ("n_choices_N", "gold_index_N", "pred_index_N"):
            if len(getattr(self, name)) != len(self.doc_id_N):
                setattr(self, name, np.full(len(self.doc_id_N), np.nan))

    def take(self, doc_id_M: np.ndarray) -> Items:
        """These items restricted to ``doc_id_M`` (all present), in that order."""
        idx_M = np.searchsorted(self.doc_id_N, doc_id_M)
        return Items(*(getattr(self, f.name)[idx_M] for f in dataclasses.fields(self)))


@dataclasses.dataclass
class Paired:
    """Arm minus baseline over the items common to all the runs compared. With one seed pair
    the intervals are item-level (paired bootstrap) and ``mcnemar`` is set; with several they
    are t-intervals over the seed pairs (prefixlm.study.seed_stats) with ``p`` and ``pair_means``."""
    label: str  # "0 vs 0" for one seed pair, "3 pairs" for a seed-level comparison
    n: int
    acc: Interval
    acc_norm: Interval | None
    bpb: Interval
    mcnemar: tuple[float, int, int] | None  # one seed pair only
    p: dict[str, float] = dataclasses.field(default_factory=dict)  # t-test p per metric
    pair_means: dict[str, tuple] = dataclasses.field(default_factory=dict)


def compare(arm_items: list[Items], base_items: list[Items], label: str,
            resamples: int = RESAMPLES, seed: int = 0) -> Paired:
    """Pair arm_items[k] with base_items[k]; per-item differences are averaged over the k
    pairs and then bootstrapped over items (an item-level interval: see the module doc)."""
    doc_id_M = functools.reduce(np.intersect1d, [it.doc_id_N for it in arm_items + base_items])
    arms = [it.take(doc_id_M) for it in arm_items]
    bases = [it.take(doc_id_M) for it in base_items]

    def interval(field):  # over the items where every run has the metric (finite)
        diff_M = np.mean([getattr(a, field) - getattr(b, field) for a, b in
                          zip(arms, bases, strict=True)], axis=0)
        finite_M = np.isfinite(diff_M)
        return paired_bootstrap(diff_M[finite_M], resamples, seed) if finite_M.any() else None

    return Paired(label, len(doc_id_M), interval("correct_N"), interval("correct_norm_N"),
                  interval("bpb_N"),
                  mcnemar_exact(arms[0].correct_N, bases[0].correct_N) if len(arms) == 1 else None)


def answer_baselines(items: Items) -> tuple[float, float, int | None]:
    """(chance, majority share, majority index): chance is the mean of 1 / n_choices; the
    majority baseline is the share of items whose gold index is the most common one (the
    smallest index on a tie), the accuracy of always giving that answer. nan / None for rows
    written without n_choices / gold_index."""
    chance = finite_mean(1.0 / items.n_choices_N)
    gold_N = items.gold_index_N[np.isfinite(items.gold_index_N)].astype(np.int64)
    if not len(gold_N):
        return chance, math.nan, None
    counts = np.bincount(gold_N - gold_N.min())
    return chance, float(counts.max() / len(gold_N)), int(gold_N.min() + counts.argmax())


def majority_split(arm: Items, base: Items, majority: int | None) -> tuple[float, float, float]:
    """(Δ share of items where the model picks the majority answer, the part of Δacc earned on
    items whose gold is the majority answer, the part earned on the others); the two parts sum
    to Δacc. A model that only learned to prefer the majority answer gains in the first part
    and loses in the second. nan without gold_index / pred_index. Items as from Items.take."""
    if majority is None or not (np.isfinite(arm.pred_index_N).all()
                                and np.isfinite(base.pred_index_N).all()):
        return math.nan, math.nan, math.nan
    gold_is_m_N = base.gold_index_N == majority
    picks_m = [(it.pred_index_N == majority) for it in (arm, base)]
    right = [(it.pred_index_N == it.gold_index_N) for it in (arm, base)]
    return (float(picks_m[0].mean() - picks_m[1].mean()),
            float((right[0] & gold_is_m_N).mean() - (right[1] & gold_is_m_N).mean()),
            float((right[0] & ~gold_is_m_N).mean() - (right[1] & ~gold_is_m_N).mean()))
