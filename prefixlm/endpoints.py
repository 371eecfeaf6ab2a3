"""Declared endpoints of the study: what the report may claim, and the sentence that claims it.

An arm is judged on a few **primary endpoints** named before looking (``--primary``; defaults:
mean CharBench bits per byte, mean accuracy over piqa/winogrande/arc_easy/hellaswag, final
val/nll). With S >= 2 seed pairs each is a t-test over the per-seed-pair differences
(prefixlm.inference), and the arm's primary tests are Holm-corrected at family-wise level
``inference.ALPHA``. Only a primary endpoint that survives the correction is written with the
verbs ``improves`` / ``worsens`` (pinned: checks outside the tests read them, so nothing else in
REPORT.md may use them). Every per-task number is exploratory. With one seed pair run-to-run
variance is unmeasured, so the sentence claims nothing and shows item-level intervals.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from prefixlm import inference
from prefixlm.inference import SeedTest
from prefixlm.paired import Interval, Items

MC_TASKS = ("piqa", "winogrande", "arc_easy", "hellaswag")
DEFAULT_PRIMARY = "charbench/bpb,mc/acc,val/nll"
ITEM_FIELDS = {"acc": "correct_N", "acc_norm": "correct_norm_N", "bpb": "bpb_N"}
IMPROVES, WORSENS = "improves", "worsens"  # pinned words of a claimed primary effect


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """``GROUP/METRIC``: GROUP is ``charbench`` (every CharBench subtask), ``mc`` (the four
    multiple-choice tasks) or one task name (``piqa`` matches ``piqa_local``), METRIC one of
    acc, acc_norm, bpb, each averaged over the group's tasks with equal weight; or ``val/KEY``,
    the last value of KEY logged in metrics.jsonl at or before the evaluation step."""
    name: str

    @property
    def group(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def metric(self) -> str:
        return self.name.split("/", 1)[1]

    @property
    def logged(self) -> bool:
        return self.group == "val"

    @property
    def lower_is_better(self) -> bool:
        return self.metric in ("bpb", "nll", "loss")

    @property
    def scale(self) -> float:  # accuracy in points
        return 100.0 if self.metric.startswith("acc") else 1.0

    @property
    def label(self) -> str:
        what = {"acc": "accuracy", "acc_norm": "length-normalised accuracy",
                "bpb": "bits/byte"}.get(self.metric, self.metric)
        if self.logged:
            return f"final {self.name}"
        if self.group == "charbench":
            return f"mean CharBench {what}"
        if self.group == "mc":
            return f"mean {what} over {'/'.join(MC_TASKS)}"
        return f"{self.group} {what}"

    def tasks(self, tasks) -> list[str]:
        """The evaluated tasks this endpoint averages over."""
        if self.group == "mc":
            return [t for t in tasks if any(_is(t, m) for m in MC_TASKS)]
        return [t for t in tasks if _is(t, self.group)]


def _is(task: str, name: str) -> bool:
    return task == name or task.startswith(name + "_")


def parse_primary(text: str) -> list[Endpoint]:
    """'charbench/bpb,mc/acc,val/nll' -> Endpoints; ValueError with the fix on a bad name."""
    out = []
    for name in (s.strip() for s in text.split(",") if s.strip()):
        group, sep, metric = name.partition("/")
        if not sep or not group or not (group == "val" and metric or metric in ITEM_FIELDS):
            raise ValueError(f"--primary entry {name!r}: expected GROUP/METRIC with GROUP "
                             f"charbench, mc or a task and METRIC one of {sorted(ITEM_FIELDS)}, "
                             f"or val/KEY of metrics.jsonl (default {DEFAULT_PRIMARY})")
        out.append(Endpoint(name))
    if not out:
        raise ValueError(f"--primary names no endpoint; e.g. --primary {DEFAULT_PRIMARY}")
    return list(dict.fromkeys(out))


def last_logged(metrics: list[dict], key: str, step: int | None = None
                ) -> tuple[int, float] | None:
    """(step, value) of the last metrics.jsonl row that logged ``key`` (at or before step)."""
    rows = [r for r in metrics if isinstance(r.get(key), (int, float)) and "step" in r
            and (step is None or r["step"] <= step)]
    return (rows[-1]["step"], float(rows[-1][key])) if rows else None


def item_differences(endpoint: Endpoint, pair_items: dict[str, list[tuple[Items, Items]]]
                     ) -> dict[str, list[np.ndarray]]:
    """{task: [per-item arm - base differences of each seed pair]} over the endpoint's tasks
    (items where both runs have the metric)."""
    field = ITEM_FIELDS[endpoint.metric]
    out = {}
    for task in endpoint.tasks(pair_items):
        diffs = [getattr(a, field) - getattr(b, field) for a, b in pair_items[task]]
        diffs = [d[np.isfinite(d)] for d in diffs]
        if all(len(d) for d in diffs):
            out[task] = diffs
    return out


@dataclasses.dataclass
class EndpointResult:
    endpoint: Endpoint
    interval: Interval | None  # seed-level t-interval (S >= 2) or item-level (S = 1)
    test: SeedTest | None  # None with one seed pair
    tasks: list[str]
    p_holm: float = math.nan
    claimed: bool = False

    @property
    def verb(self) -> str:
        if not self.claimed:
            return ""
        good = (self.interval.est < 0) == self.endpoint.lower_is_better
        return IMPROVES if good else WORSENS


def evaluate_endpoint(endpoint, pair_items, pair_metrics, step, resamples, seed
                      ) -> EndpointResult:
    """One endpoint of one arm: its per-seed-pair differences and the t-interval over them, or
    with one pair the item-level interval (none for a logged scalar: one value per run)."""
    if endpoint.logged:
        values = [(last_logged(a, endpoint.name, step), last_logged(b, endpoint.name, step))
                  for a, b in pair_metrics]
        d_S = [a[1] - b[1] for a, b in values if a and b]
        tasks, by_task = [], {}
    else:
        by_task = item_differences(endpoint, pair_items)
        tasks = sorted(by_task)
        n_pairs = len(next(iter(by_task.values()), []))
        d_S = [float(np.mean([by_task[t][s].mean() for t in tasks])) for s in range(n_pairs)]
    test = inference.seed_test(d_S)
    if test is not None:
        return EndpointResult(endpoint, test.interval, test, tasks)
    if len(d_S) == 1 and by_task:
        iv = inference.stratified_bootstrap([d[0] for d in by_task.values()], resamples, seed)
        return EndpointResult(endpoint, iv, None, tasks)
    if len(d_S) == 1:
        return EndpointResult(endpoint, Interval(d_S[0], math.nan, math.nan), None, tasks)
    return EndpointResult(endpoint, None, None, tasks)


def correct_family(results: list[EndpointResult], alpha: float = inference.ALPHA) -> None:
    """Holm over the arm's tested primary endpoints; sets p_holm and claimed in place."""
    p_K = [r.test.p if r.test else math.nan for r in results]
    adjusted, rejected = inference.holm([p_K], alpha)
    for r, p, rej in zip(results, adjusted[0], rejected[0], strict=True):
        r.p_holm, r.claimed = float(p), bool(rej)


def effect_text(r: EndpointResult) -> str:
    """Claimed: 'mean CharBench bits/byte by 0.0400 [0.0310, 0.0490]', sizes along the verb's
    direction; otherwise the signed 'mean CharBench bits/byte Δ -0.0012 [-0.0050, +0.0026]'."""
    iv, label, scale = r.interval, r.endpoint.label, r.endpoint.scale
    d, unit = (1, " pt") if scale == 100.0 else (4, "")
    if iv is None or not np.isfinite(iv.est):
        return f"{label}: not available"
    if r.claimed:
        sign = -1.0 if iv.est < 0 else 1.0
        lo, hi = sorted((sign * iv.lo * scale, sign * iv.hi * scale))
        return f"{label} by {sign * iv.est * scale:.{d}f}{unit} [{lo:.{d}f}, {hi:.{d}f}]"
    est = f"Δ {iv.est * scale:+.{d}f}{unit}"
    if not np.isfinite(iv.lo):
        return f"{label} {est} (one value per run: no interval)"
    return f"{label} {est} [{iv.lo * scale:+.{d}f}, {iv.hi * scale:+.{d}f}]"


def sentence(arm: str, base: str, results: list[EndpointResult], n_pairs: int) -> str:
    """The arm's line under "What the evidence supports"."""
    if n_pairs < 2:
        shown = "; ".join(effect_text(r) for r in results)
        return (f"{arm} vs {base} (one seed each): no claim, since run-to-run variance is "
                f"unmeasured with one seed per arm. Item-level 95% intervals (they cover the "
                f"choice of items only): {shown}. Run --seeds 0,1,2 to test.")
    claimed = [r for r in results if r.claimed]
    rest = [r for r in results if not r.claimed]
    level = f"Holm-corrected over {sum(r.test is not None for r in results)} primary " \
            f"endpoint(s), family-wise {inference.ALPHA:.0%}"
    head = f"{arm} ({n_pairs} seed pairs) vs {base}: "
    parts = [f"{r.verb} {effect_text(r)} (Holm p {r.p_holm:.2g})" for r in claimed]
    others = "; ".join(f"{effect_text(r)}" + (f", Holm p {r.p_holm:.2g}"
                                              if np.isfinite(r.p_holm) else "") for r in rest)
    if not claimed:
        return head + f"no primary endpoint differs after correction ({level}): {others}."
    tail = f"; no corrected difference in {others}" if rest else ""
    return head + "; ".join(parts) + tail + f" ({level})."


def claims(d_RxSxK, lower_is_better, alpha: float = inference.ALPHA) -> np.ndarray:
    """int8 [R, K]: +1 where the report writes ``improves``, -1 ``worsens``, 0 nothing, for R
    studies at once from their per-seed-pair differences (S >= 2) of K primary endpoints: the
    decisions of correct_family and EndpointResult.verb, vectorised for simulations."""
    mean_RxK, _, p_RxK = inference.t_tests(np.moveaxis(np.asarray(d_RxSxK), 1, -1))
    rejected_RxK = inference.holm_rows(p_RxK, alpha)
    good_RxK = (mean_RxK < 0) == np.asarray(lower_is_better)
    return np.where(rejected_RxK, np.where(good_RxK, 1, -1), 0).astype(np.int8)
