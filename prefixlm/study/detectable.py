"""What a study could detect, and how many seeds a stated effect needs (numpy/scipy only).

A null verdict ("no primary endpoint differs") means little without its size: with three seeds
and Holm over 18 tests, a 0.04 bpb CharBench gain at seed sd 0.005 is missed two times in three.
So REPORT.md's section "What this study could detect" gives, per primary endpoint, the minimum
detectable effect at 80% power of the report's own test (prefixlm.study.seed_stats.detectable_effect:
t over S seed pairs at alpha / m, m the report's family), from

- the **measured seed-level sd** of a pair mean: the sample variances of each arm's pair means,
  pooled over the arms (weighted by their S - 1 degrees of freedom). Pooling is right here and
  not in the tests (prefixlm.study.endpoints): a planning number should be stable, and an arm whose
  variance differs shows in its own interval;
- floored, like the tests, at the **item-sampling variance** of a pair mean (from the per-item
  differences and the item counts shown);
- the **seed count**: the most seed pairs any arm used for the endpoint.

``plan`` is the other direction (``python -m prefixlm.report --plan``): from a pilot, the seeds
per arm a stated effect needs. The pilot is either several arms with two or more seeds each
(the sd of their seed-pair differences, as above), or one arm's seeds alone, such as the
baseline's: then a pair mean's variance is taken as twice the variance of one run's value over
seeds (two independent runs on the same items; runs paired by seed share init and data order,
which can only make the real pair differences less variable, so the plan errs on more seeds).
A sd from 2-4 seeds is itself uncertain, so the plan also gives the seeds needed at the sd's
upper 80% confidence bound (chi-square on its degrees of freedom).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

from prefixlm.study import endpoints, seed_stats

UPPER = 0.8  # the one-sided confidence of the pilot sd's upper bound


@dataclasses.dataclass
class PilotSd:
    """The sd of one pair mean for an endpoint, with its degrees of freedom and where from."""
    sd: float
    df: int
    item_sd: float  # what item sampling alone gives a pair mean (nan: no items)
    items: int  # items per run over the endpoint's tasks
    source: str

    def upper(self, confidence: float = UPPER) -> float:
        """The sd's one-sided upper confidence bound: sd sqrt(df / chi2_{1-c}(df))."""
        if self.df < 1 or not np.isfinite(self.sd):
            return math.nan
        return self.sd * math.sqrt(self.df / stats.chi2.ppf(1 - confidence, self.df))


def pooled(variances_dfs, item_var: float, items: int, source: str) -> PilotSd:
    """Pools (variance, df) pairs, floored at the item-sampling variance."""
    pairs = [(v, df) for v, df in variances_dfs if df >= 1 and np.isfinite(v)]
    df = sum(d for _, d in pairs)
    var = sum(v * d for v, d in pairs) / df if df else math.nan
    if np.isfinite(item_var):
        var = max(var, item_var)
    return PilotSd(math.sqrt(var) if np.isfinite(var) else math.nan, df,
                   math.sqrt(item_var) if np.isfinite(item_var) else math.nan, items, source)


def from_results(results: list) -> PilotSd:
    """The pooled sd of one endpoint's pair means over arms (EndpointResults of one endpoint)."""
    item_var = [r.item_var for r in results if np.isfinite(r.item_var)]
    return pooled([(r.seed_var, r.pairs - 1) for r in results],
                  float(np.mean(item_var)) if item_var else math.nan,
                  max((r.items for r in results), default=0), "seed-pair differences")


def number(x: float, endpoint, signed: bool = False) -> str:
    """In the endpoint's table units: accuracy in points, bpb/nll to 4 digits."""
    if not np.isfinite(x):
        return "n/a"
    digits = 1 if endpoint.scale == 100.0 else 4
    return f"{x * endpoint.scale:{'+' if signed else ''}.{digits}f}" + (
        " pt" if endpoint.scale == 100.0 else "")


def detect_section(primary_results: dict[str, list], family: int) -> list[str]:
    """REPORT.md's "What this study could detect": per primary endpoint, the smallest true
    effect the report's test would find in 80% of studies like this one."""
    lines = ["## What this study could detect", "",
             f"The smallest true difference (arm − baseline, either direction) that this "
             f"report's own test finds with {seed_stats.POWER:.0%} power: a t-test over S seed "
             f"pairs at two-sided {seed_stats.ALPHA:.0%} / {family} (Holm's first step over "
             f"the family of {family}), with the seed-level sd of a pair mean measured here "
             "(pooled over the arms, floored at the item-sampling sd). A difference smaller "
             "than this can hide behind \"no primary endpoint differs\"; "
             "`python -m prefixlm.report RUN_DIR... --plan ENDPOINT=EFFECT` gives the seeds "
             "it would take.", "",
             "| endpoint | seed pairs | items per run | seed-level sd of a pair mean (df) | "
             "item-sampling sd | detectable at 80% power |", "|---|---|---|---|---|---|"]
    by_endpoint: dict[str, list] = {}
    for results in primary_results.values():
        for r in results:
            by_endpoint.setdefault(r.endpoint.name, []).append(r)
    for results in by_endpoint.values():
        e, pilot = results[0].endpoint, from_results(results)
        seeds = max(r.pairs for r in results)
        mde = seed_stats.detectable_effect(pilot.sd, seeds, max(family, 1)) \
            if pilot.df >= 1 else math.nan
        detect = number(mde, e) if np.isfinite(mde) else (
            "not measurable (fewer than 2 seed pairs)" if pilot.df < 1 else
            "not measurable (the seed pairs agree exactly and there are no items)")
        lines.append(f"| {e.label} | {seeds} | {pilot.items or '(logged scalar)'} | "
                     f"{number(pilot.sd, e)} ({pilot.df}) | {number(pilot.item_sd, e)} | "
                     f"{detect} |")
    return lines + [""]


def parse_effects(text: str) -> list[tuple[endpoints.Endpoint, float]]:
    """'charbench/bpb=0.04,mc/acc=2' -> [(Endpoint, 0.04), (Endpoint, 0.02)]: accuracy in
    points, as the report shows it; ValueError naming the entry and the form otherwise."""
    out = []
    for entry in (s.strip() for s in text.split(",") if s.strip()):
        name, sep, size = entry.partition("=")
        try:
            endpoint, = endpoints.parse_primary(name)
            effect = float(size) / endpoint.scale
        except ValueError as e:
            raise ValueError(f"--plan entry {entry!r}: expected ENDPOINT=EFFECT, e.g. "
                             f"charbench/bpb=0.04,mc/acc=2 (accuracy in points) ({e})") from None
        if not sep or not math.isfinite(effect) or effect <= 0:
            raise ValueError(f"--plan entry {entry!r}: expected ENDPOINT=EFFECT with EFFECT > 0, "
                             "e.g. charbench/bpb=0.04")
        out.append((endpoint, effect))
    if not out:
        raise ValueError("--plan names no effect; e.g. --plan charbench/bpb=0.04")
    return out


def plan_lines(pilots: dict, effects, family: int, pilot_text: str) -> list[str]:
    """The planning table: per stated effect, the pilot's sd and the seeds per arm needed."""
    lines = [f"Seeds per arm for {seed_stats.POWER:.0%} power with the report's test (t over "
             f"seed pairs, two-sided {seed_stats.ALPHA:.0%} / {family}: Holm over a family of "
             f"{family}). Pilot: {pilot_text}.", "",
             "| endpoint | effect | pilot sd of a pair mean (df, from) | seeds needed | seeds "
             f"needed at the sd's {UPPER:.0%} upper bound |", "|---|---|---|---|---|"]
    for endpoint, effect in effects:
        pilot = pilots[endpoint.name]
        cells = []
        for sd in (pilot.sd, pilot.upper()):
            n = seed_stats.seeds_needed(effect, sd, family) if np.isfinite(sd) else None
            cells.append("n/a" if not np.isfinite(sd) else str(n) if n else "more than 1000")
        lines.append(f"| {endpoint.label} | {number(effect, endpoint)} | "
                     f"{number(pilot.sd, endpoint)} ({pilot.df}, {pilot.source}) | "
                     f"{cells[0]} | {cells[1]} ({number(pilot.upper(), endpoint)}) |")
    return lines


def run_value(endpoint, run, items, doc_ids: dict, step: int) -> float | None:
    """One run's value of an endpoint at the step: val/KEY as logged there, or the mean over
    the endpoint's tasks of the run's mean over ``doc_ids[task]``."""
    if endpoint.logged:
        return endpoints.value_at(run.metrics, endpoint.name, step)
    field = endpoints.ITEM_FIELDS[endpoint.metric]
    means = [np.nanmean(getattr(items[run.path][t].take(ids), field))
             for t, ids in doc_ids.items()]
    return float(np.mean(means)) if means and np.isfinite(means).all() else None


def single_arm_sd(endpoint, arms: dict, items, step: int) -> PilotSd:
    """Twice the pooled variance of one run's value over the seeds of each arm with two or
    more (items: the documents all of the arm's runs scored)."""
    var_dfs, items_n = [], 0
    for runs in arms.values():
        tasks = endpoint.tasks(sorted(set.intersection(*(set(items[r.path]) for r in runs))))
        doc_ids = {t: np.array(sorted(set.intersection(*(set(items[r.path][t].doc_id_N.tolist())
                                                         for r in runs)))) for t in tasks}
        values = [v for r in runs if (v := run_value(endpoint, r, items, doc_ids, step))
                  is not None]
        if len(values) >= 2:
            var_dfs.append((2 * float(np.var(values, ddof=1)), len(values) - 1))
            items_n = max(items_n, sum(len(ids) for ids in doc_ids.values()))
    return pooled(var_dfs, math.nan, items_n, "2 x the sd of single runs")
