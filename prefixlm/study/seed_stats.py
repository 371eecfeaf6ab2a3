"""Seed-level inference for the study report: intervals over seed pairs, Holm's correction.

Why seeds are the unit of replication: two runs of one config with different seeds differ by
more than the choice of evaluation items explains (init and data order move a small model's
bits per byte and accuracy on every item at once). A bootstrap over items sees none of that, so
with several seeds it calls seed noise an effect (issue 16 measured 36 false claims in 60 null
arms with 3 seeds). Every interval and test of a several-seed report is therefore built here,
over the S seed pairs (arm seed i against baseline seed i).

The method: a t-interval (and two-sided t-test) over the S per-seed-pair paired means,
d_s = mean over the common items of (arm_s - base_s), with S - 1 degrees of freedom. Chosen over
a hierarchical bootstrap (seeds, then items within seed) because:
- each d_s already carries both sources of variance: Var(d_s) = the run-to-run variance of the
  two runs + the item-sampling variance of the paired difference, and the sample variance of
  d_1..d_S estimates exactly that sum; nothing is counted twice or left out;
- at S = 2 or 3, a bootstrap over seeds has only 3 or 10 distinct resamples and its percentile
  interval can never reach past the extreme pair means: it undercovers badly. The t-interval is
  exact for normal d_s, and a d_s is a mean over hundreds of items plus a run-level shift, so
  nearly normal; its width at S = 2 (t = 12.7) says honestly how little two seeds show;
- it applies unchanged to per-run scalars such as the final val/nll, which have no items;
- it costs no resampling, so the suite can simulate thousands of studies in seconds.
With one seed pair there is no run-to-run variance to estimate: the report then shows the
item-level interval (prefixlm.study.item_stats) and makes no claim.

**No evidence from ties.** A sample variance of the S pair means can come out near zero by
chance (or exactly zero, for re-used or fabricated runs), and the t statistic then explodes:
three identical pair means of 0.0125 gave p = 1.9e-32. Two rules stop that:
- where the pair means are means over items, the seed-level variance is floored at what item
  sampling alone gives one pair mean (``item_var``: the variance of the per-item paired
  differences / items, averaged over the pairs): seeds can add variance, never remove the
  items'. Identical pair means then claim only what the items show;
- where there are no items (a logged scalar such as val/nll), pair means whose sd is below
  ``TIE_RTOL`` x their largest magnitude (float32 resolution: the runs agree to rounding) are a
  tie: no test (p nan, untested), so no claim; all-zero pair means keep p = 1.

Holm's step-down procedure controls the family-wise error rate over a family of tests at
``alpha`` without assuming they are independent (CharBench bpb, accuracy and val/nll move
together; arms share the baseline runs). prefixlm.study.endpoints says which family.

``power`` / ``detectable_effect`` / ``seeds_needed`` give the power of this very test (noncentral
t with S - 1 degrees of freedom at a two-sided level alpha / m, Holm's first step over a family
of m): what a null result could have detected, and how many seeds a stated effect needs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

from prefixlm.study import item_stats
from prefixlm.study.item_stats import Interval, Items, Paired, bootstrap_means

ALPHA = 0.05  # the family-wise level of the report's primary tests (every arm x endpoint)
TIE_RTOL = 2.0**-20  # pair means agreeing to this relative sd are a tie (no items: no test)
POWER = 0.8  # the power "What this study could detect" quotes


@dataclasses.dataclass
class SeedTest:
    """An arm-minus-baseline difference over S seed pairs: estimate, 95% t-interval, p."""
    interval: Interval
    p: float
    pairs: int
    pair_means: tuple[float, ...]  # d_1..d_S, what the interval is over


def t_tests(d_RxS, item_var_R=None, level: float = 0.95
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean_R, half-width_R, two-sided p_R) of the one-sample t-test of mean 0 on each row of
    d_RxS (S >= 2 seed pairs); vectorised over R so simulations need no loop. The variance of a
    pair mean is floored at ``item_var_R`` (what item sampling alone gives it; nan or None: no
    items). A row whose spread is a tie (module doc) gets p 1 when its mean is 0, else p nan
    (untested) and a nan half-width."""
    d_RxS = np.asarray(d_RxS, dtype=np.float64)
    s = d_RxS.shape[-1]
    if s < 2:
        raise ValueError(f"a t-test over seed pairs needs at least 2 pairs, got {s}")
    mean_R = d_RxS.mean(-1)
    var_R = d_RxS.var(-1, ddof=1)
    tie_R = np.sqrt(var_R) <= TIE_RTOL * np.abs(d_RxS).max(-1)
    if item_var_R is not None:
        floor_R = np.broadcast_to(np.asarray(item_var_R, dtype=np.float64), var_R.shape)
        has_items_R = np.isfinite(floor_R) & (floor_R > 0)
        var_R = np.where(has_items_R, np.fmax(var_R, floor_R), var_R)
        tie_R &= ~has_items_R
    se_R = np.sqrt(var_R / s)
    half_R = np.where(tie_R & (mean_R != 0), np.nan, stats.t.ppf(0.5 + level / 2, s - 1) * se_R)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_R = 2 * stats.t.sf(np.abs(mean_R) / se_R, s - 1)
    p_R = np.where(tie_R, np.where(mean_R == 0, 1.0, np.nan), p_R)
    return mean_R, half_R, p_R


def seed_test(pair_means, item_var=None) -> SeedTest | None:
    """The t-interval and p over the per-seed-pair means (variance floored at ``item_var``, the
    item-sampling variance of one pair mean, when they are means over items); None for fewer
    than 2 finite pairs."""
    d_S = np.asarray([d for d in pair_means if np.isfinite(d)], dtype=np.float64)
    if len(d_S) < 2:
        return None
    mean, half, p = (float(x[0]) for x in t_tests(d_S[None], item_var))
    return SeedTest(Interval(mean, mean - half, mean + half), p, len(d_S), tuple(d_S))


def item_var_of_mean(diff_by_task: list[np.ndarray]) -> float:
    """The item-sampling variance of a composite pair mean (the mean over tasks of each task's
    mean per-item difference): sum over tasks of var(diff) / items, over tasks squared."""
    diffs = [np.asarray(d, np.float64) for d in diff_by_task]
    if not diffs or any(len(d) < 2 for d in diffs):
        return math.nan
    return float(sum(d.var(ddof=1) / len(d) for d in diffs) / len(diffs) ** 2)


def holm(p_RxK, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """(Holm-adjusted p, rejected) for each row's K p-values (vectorised over rows).

    Step-down: sort ascending, the k-th smallest (k = 0..K-1) is scaled by K - k, adjusted
    p-values are the running maximum of those (capped at 1), and an endpoint is rejected when
    its adjusted p is <= alpha. nan p-values (endpoints that could not be tested) stay nan and
    are not counted in K."""
    p_RxK = np.atleast_2d(np.asarray(p_RxK, dtype=np.float64))
    adjusted = np.full_like(p_RxK, np.nan)
    for r, p_K in enumerate(p_RxK):
        tested = np.flatnonzero(np.isfinite(p_K))
        order = tested[np.argsort(p_K[tested], kind="stable")]
        scaled = p_K[order] * (len(order) - np.arange(len(order)))
        adjusted[r, order] = np.minimum(1.0, np.maximum.accumulate(scaled)) if len(order) else []
    with np.errstate(invalid="ignore"):
        return adjusted, adjusted <= alpha


def holm_rows(p_RxK, alpha: float = ALPHA) -> np.ndarray:
    """Rejected-or-not of Holm over many rows at once (the simulation's fast path): the same
    decisions as ``holm``, by sorting every row together (nan sorts last and is not counted)."""
    p_RxK = np.asarray(p_RxK, dtype=np.float64)
    k_R = np.isfinite(p_RxK).sum(-1, keepdims=True)
    order_RxK = np.argsort(p_RxK, axis=-1, kind="stable")
    scale_RxK = k_R - np.arange(p_RxK.shape[-1])
    sorted_RxK = np.take_along_axis(p_RxK, order_RxK, -1) * scale_RxK
    sorted_RxK = np.where(scale_RxK > 0, sorted_RxK, np.inf)
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(np.nan_to_num(sorted_RxK, nan=np.inf),
                                                            axis=-1))
    rejected = np.empty_like(p_RxK, dtype=bool)
    np.put_along_axis(rejected, order_RxK, adjusted_sorted <= alpha, -1)
    return rejected


def power(effect, sd, seeds: int, family: int, alpha: float = ALPHA):
    """The chance that the report's test (t over ``seeds`` pair means of sd ``sd``, two-sided
    at alpha / family: Holm's first step, all other hypotheses null) rejects for a true
    ``effect``; vectorised over numpy arguments. The noncentral t's tail is integrated over
    the chi-square of the variance estimate on 4,096 quantile midpoints (scipy's nct returns
    nan at 1 df and large noncentrality); within 1e-4 of scipy's nct where that is finite."""
    df = seeds - 1
    crit = stats.t.ppf(1 - alpha / (2 * family), df)
    ncp = np.abs(np.asarray(effect, dtype=np.float64)) / (
        np.asarray(sd, dtype=np.float64) / np.sqrt(seeds))
    scale_Q = np.sqrt(stats.chi2.ppf((np.arange(4096) + 0.5) / 4096, df) / df)
    ncp = ncp[..., None]
    return (stats.norm.sf(crit * scale_Q - ncp) + stats.norm.cdf(-crit * scale_Q - ncp)).mean(-1)


def detectable_effect(sd: float, seeds: int, family: int, target: float = POWER,
                      alpha: float = ALPHA) -> float:
    """The smallest true effect the report's test finds with probability ``target``."""
    from scipy import optimize

    if not (np.isfinite(sd) and sd > 0 and seeds >= 2):
        return math.nan
    hi = sd
    while power(hi, sd, seeds, family, alpha) < target:
        hi *= 2
    return float(optimize.brentq(lambda e: float(power(e, sd, seeds, family, alpha)) - target,
                                 0.0, hi, xtol=sd * 1e-9))


def seeds_needed(effect: float, sd: float, family: int, target: float = POWER,
                 alpha: float = ALPHA, most: int = 1000) -> int | None:
    """The fewest seeds per arm whose test finds ``effect`` with probability ``target`` (None
    beyond ``most``)."""
    for seeds in range(2, most + 1):
        if power(effect, sd, seeds, family, alpha) >= target:
            return seeds
    return None


def stratified_bootstrap(diff_by_task: list[np.ndarray], resamples: int,
                         seed: int = 0) -> Interval:
    """The mean over tasks of each task's mean paired difference, with a 95% percentile
    interval from resampling items within each task (tasks are fixed, items are sampled): the
    item-level interval of a composite endpoint such as mean CharBench bpb for ONE seed pair."""
    diffs = [np.asarray(d, np.float64) for d in diff_by_task if len(d)]
    if not diffs:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means_R = np.mean([bootstrap_means(d, resamples, rng) for d in diffs], axis=0)
    lo, hi = np.percentile(means_R, [2.5, 97.5])
    return Interval(float(np.mean([d.mean() for d in diffs])), float(lo), float(hi))


def compare_task(pairs: list[tuple[Items, Items]], resamples: int = item_stats.RESAMPLES,
                 seed: int = 0) -> Paired:
    """One task of one arm, over its aligned seed pairs (study.aligned_items): with one pair the
    item-level paired bootstrap and McNemar (prefixlm.study.item_stats); with several, for each metric
    the t-interval and p over the per-pair mean differences."""
    if len(pairs) == 1:
        (arm, base), = pairs
        return item_stats.compare([arm], [base], "1 pair", resamples, seed)
    tests = {}
    for metric, field in (("acc", "correct_N"), ("acc_norm", "correct_norm_N"),
                          ("bpb", "bpb_N")):
        diffs = [getattr(a, field) - getattr(b, field) for a, b in pairs]
        diffs = [d[np.isfinite(d)] for d in diffs]
        item_var = np.mean([item_var_of_mean([d]) for d in diffs])
        tests[metric] = seed_test([item_stats.finite_mean(d) for d in diffs], item_var)
    nan = Interval(math.nan, math.nan, math.nan)
    return Paired(f"{len(pairs)} pairs", len(pairs[0][0].doc_id_N),
                  tests["acc"].interval if tests["acc"] else nan,
                  tests["acc_norm"].interval if tests["acc_norm"] else None,
                  tests["bpb"].interval if tests["bpb"] else nan, None,
                  p={m: t.p for m, t in tests.items() if t},
                  pair_means={m: t.pair_means for m, t in tests.items() if t})
