"""REPORT.md: the study report's text, tables and figures (``python -m prefixlm.report`` is its
command line; its help says what the report holds and how to read it).

Every arm against a baseline arm, paired over the same evaluation items: ``build_report`` writes
``OUT/REPORT.md`` and the figures; ``plan`` reads a pilot and prints the seeds each effect needs.
"""

from __future__ import annotations

import functools
import math
import pathlib
import sys

import numpy as np

from prefixlm.core import atomic
from prefixlm.study import detectable, endpoints, figures, item_stats, seed_stats
from prefixlm.study import runs as runs_lib
from prefixlm.study.endpoints import last_logged
from prefixlm.study.item_stats import Interval, Items, Paired
from prefixlm.study.runs import ReportError

# ---- cells ----

def value_cell(values: list[tuple[float, float]], digits: int = 4) -> str:
    """One run: value ± stderr; several seeds: mean ± sd over seeds."""
    values = [v for v in values if np.isfinite(v[0])]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0][0]:.{digits}f} ± {values[0][1]:.{digits}f}"
    v_S = np.array([v for v, _ in values])
    return f"{v_S.mean():.{digits}f} ± {v_S.std(ddof=1):.{digits}f} sd"


def interval_cell(iv: Interval | None, scale: float = 100.0, digits: int = 1) -> str:
    """+1.2 [+0.3, +2.1]: accuracy in points by default, bpb with scale 1 and 4 digits."""
    if iv is None or not np.isfinite(iv.est):
        return ""
    est, lo, hi = (f"{v * scale:+.{digits}f}" for v in iv)
    return f"{est} [{lo}, {hi}]"


def p_cell(head: Paired) -> str:
    """McNemar's p (b/c) for one seed pair; the t-test's p over seed pairs otherwise."""
    if head.mcnemar is not None:
        return f"{head.mcnemar[0]:.2g} ({head.mcnemar[1]}/{head.mcnemar[2]})"
    return f"{head.p['acc']:.2g} (t)" if "acc" in head.p else ""


def number(x: float, scale: float = 100.0, digits: int = 1, sign: str = "") -> str:
    return "n/a" if not np.isfinite(x) else f"{round(x * scale, digits) + 0.0:{sign}.{digits}f}"


def logged_cell(metrics: list[dict], key: str) -> str:
    last = last_logged(metrics, key)
    return "" if last is None else f"{last[1]:.4f} ({last[0]})"


def run_values(items: Items) -> dict[str, tuple[float, float]]:
    """{metric: (value, stderr)} of one run, over the documents that have the metric."""
    out = {}
    for metric, x_N in (("acc", items.correct_N), ("acc_norm", items.correct_norm_N),
                        ("bpb", items.bpb_N)):
        x_N = x_N[np.isfinite(x_N)]
        out[metric] = item_stats.mean_stderr(x_N) if len(x_N) else (math.nan, math.nan)
    return out


def majority_cells(pairs: list[tuple[Items, Items]] | None, items: Items) -> list[str]:
    """chance | majority | Δ picks majority | Δacc = majority-gold part + other part."""
    chance, share, majority = item_stats.answer_baselines(items)
    cells = [number(chance), number(share)]
    if not pairs:
        return cells + ["", ""]
    split = np.mean([item_stats.majority_split(a, b, majority) for a, b in pairs], axis=0)
    if not np.isfinite(split).all():
        return cells + ["n/a", "n/a"]
    return cells + [number(split[0], sign="+"), f"{number(split[1] + split[2], sign='+')} = "
                    f"{number(split[1], sign='+')} + {number(split[2], sign='+')}"]


# ---- REPORT.md sections ----

def arm_method(n_pairs: int) -> str:
    """The interval method of one arm's rows (and its forest-plot legend entry)."""
    if n_pairs >= 2:
        return f"t over {n_pairs} seed pairs"
    return "item-level bootstrap, one seed pair"


def header(base, arms, runs, step, chosen, primary, n_pairs, resamples, seed,
           family: str) -> list[str]:
    """Title, step, baseline, and which statistics every number below comes from."""
    methods = []
    if any(n >= 2 for n in n_pairs.values()):
        methods.append(
            "**Seed-level** (arms with two or more seed pairs): every interval and test is a "
            "t-interval / two-sided t-test over the per-seed-pair paired means (arm seed i − "
            "baseline seed i, each a mean over the same items) with S − 1 degrees of freedom, "
            "so run-to-run variance is in every interval (prefixlm.study.seed_stats explains the "
            "choice over a hierarchical bootstrap). A pair mean's variance is never taken "
            "below what item sampling alone gives it, and identical pair means without items "
            "are not tested: ties are no evidence.")
    if any(n < 2 for n in n_pairs.values()):
        methods.append(
            "**Item-level only** (arms with one seed pair): run-to-run variance is unmeasured. "
            f"Intervals are 95% percentile intervals of a paired bootstrap over items "
            f"({resamples:,} resamples, numpy seed {seed}); p is McNemar's exact two-sided test "
            "on the discordant pairs (b = only the arm right, c = only the baseline right). No "
            "effect is claimed for such an arm: train --seeds 0,1,2,3,4 to test.")
    method = "\n\n".join(methods)
    return [
        f"# Study report: {len(arms) - 1} arm(s) against {base}", "",
        f"Evaluation step **{step}** (the {'chosen' if chosen else 'last'} step common to all "
        f"{len(runs)} runs); every primary value is from this step. Baseline arm **{base}** "
        f"(seeds {', '.join(r.seed_label for r in arms[base])}).", "", method, "",
        f"Primary endpoints (declared with --primary): {', '.join(e.name for e in primary)}. "
        f"**Error control: the family is every arm x every primary endpoint; method: {family}** "
        "(prefixlm.study.endpoints says why Holm over the whole report rather than per arm, a "
        "hierarchy or a pooled many-to-one test): the chance that this report claims any effect "
        f"that is not there is at most {seed_stats.ALPHA:.0%}. Everything else (each "
        "task's table, the forest plot) is exploratory and never counts as an effect, whatever "
        "its interval.", "",
        "Δ = arm − baseline over the same items (inner join on task, doc_id); Δacc in points. "
        "bpb: bits per byte of the gold continuation, mean over documents (lower is better). "
        "Values: ± stderr for one seed, ± sd over seeds for several. chance: mean 1/n_choices; "
        "majority: accuracy of always giving the most common gold answer. Δ picks majority: "
        "change in the share of items answered with that answer; Δacc = the part earned on "
        "items whose gold is the majority answer + the part on the others (a shift of answer "
        "preference shows as a gain in the first and a loss in the second); n/a for results "
        "written without gold_index / pred_index.", ""]


def primary_section(primary_results, n_pairs, step) -> list[str]:
    """The primary table (every value from ``step``; `seed pairs`: the pairs each endpoint
    used) and the runs left out of an endpoint."""
    lines = ["## Primary endpoints", "", "| arm | endpoint | step | seed pairs | tasks | "
             "Δ [95% CI] | p | Holm p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    left_out = []
    for arm, results in primary_results.items():
        for r in results:
            e, iv = r.endpoint, r.interval
            left_out += r.left_out
            if iv is None or not np.isfinite(iv.est):
                cell = "n/a"
            elif not np.isfinite(iv.lo):
                cell = f"{iv.est * e.scale:+.4f} ({endpoints.no_interval_reason(r)})"
            else:
                cell = interval_cell(iv, e.scale, 1 if e.scale == 100 else 4)
            if r.claimed:
                verdict = "effect: arm better" if r.verb == endpoints.IMPROVES \
                    else "effect: arm worse"
            elif r.test is None:
                verdict = "untested (one seed pair)" if r.pairs == 1 or n_pairs[arm] < 2 \
                    else "n/a"
            elif not np.isfinite(r.test.p):
                verdict = "untested (identical seed-pair means)"
            else:
                verdict = "no corrected effect"
            p = f"{r.test.p:.2g}" if r.test and np.isfinite(r.test.p) else ""
            holm = f"{r.p_holm:.2g}" if np.isfinite(r.p_holm) else ""
            lines.append(f"| {arm} | {e.label} | {step} | {r.pairs} | {len(r.tasks) or ''} | "
                         f"{cell} | {p} | {holm} | {verdict} |")
    if left_out:
        lines += ["", "Left out (a value missing at the report's step is never replaced by an "
                  "older one):", "", *[f"- {w}" for w in dict.fromkeys(left_out)]]
    return lines + [""]


def runs_section(arms, items) -> list[str]:
    """Each run's seed, items and last logged val/nll and loss; then the same per arm."""
    lines = ["## Runs", "", "| run | arm | seed | items at step | final val/nll (step) | "
             "final loss (step) |", "|---|---|---|---|---|---|"]
    for arm, runs in arms.items():
        for r in runs:
            n = sum(len(it.doc_id_N) for it in items[r.path].values())
            cells = " | ".join(logged_cell(r.metrics, k) for k in ("val/nll", "loss"))
            lines.append(f"| {r.path.name} | {arm} | {r.seed_label} | {n} | {cells} |")
    lines += ["", "Training side, mean ± sd over seeds (val/nll is the gold-token NLL, comparable "
              "across objectives; loss is each run's own objective, which is not):", "",
              "| arm | seeds | final val/nll | final loss |", "|---|---|---|---|"]
    for arm, runs in arms.items():
        cells = []
        for key in ("val/nll", "loss"):
            v_S = [x[1] for r in runs if (x := last_logged(r.metrics, key))]
            cells.append("" if not v_S else f"{v_S[0]:.4f}" if len(v_S) == 1
                         else f"{np.mean(v_S):.4f} ± {np.std(v_S, ddof=1):.4f}")
        lines.append(f"| {arm} | {len(runs)} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def task_section(task, arms, base, items, results, aligned) -> list[str]:
    """The exploratory table of one task: every arm's values, baselines, paired differences."""
    lines = [f"## {task} (exploratory)", "", "| arm | seeds | paired items | chance | majority "
             "| acc | acc_norm | bpb | Δacc pt [95% CI] | p | Δacc_norm pt | Δbpb [95% CI] | "
             "Δ picks majority pt | Δacc = majority-gold + other pt |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, runs in arms.items():
        own = [items[r.path][task] for r in runs if task in items[r.path]]
        cells = [value_cell([run_values(it)[m] for it in own]) for m in ("acc", "acc_norm", "bpb")]
        maj = majority_cells(aligned.get((arm, task)), own[0]) if own else ["", "", "", ""]
        if arm == base or (arm, task) not in results:
            note = "baseline" if arm == base else "task not in both arms"
            lines.append(f"| {arm} | {len(own)} |  | {maj[0]} | {maj[1]} | {' | '.join(cells)} "
                         f"| {note} |  |  |  |  |  |")
            continue
        h = results[arm, task]
        lines.append(f"| {arm} | {len(own)} | {h.n} | {maj[0]} | {maj[1]} | "
                     + " | ".join(cells) + " | " + " | ".join([
                         interval_cell(h.acc), p_cell(h), interval_cell(h.acc_norm),
                         interval_cell(h.bpb, 1.0, 4), maj[2], maj[3]]) + " |")
    multi = [(arm, h) for (arm, t), h in results.items() if t == task and h.pair_means]
    if multi:
        lines += ["", "Per seed pair, the paired means the intervals are over (arm seed vs "
                  "baseline seed):", "", "| arm | pair | Δacc pt | Δbpb |", "|---|---|---|---|"]
        for arm, h in multi:
            labels = [f"{a.seed_label} vs {b.seed_label}"
                      for a, b in runs_lib.seed_pairs(arms[arm], arms[base])]
            for k, label in enumerate(labels):
                acc, bpb = (h.pair_means.get(m, ())[k:k + 1] for m in ("acc", "bpb"))
                lines.append(f"| {arm} | {label} | {number(acc[0], sign='+') if acc else ''} "
                             f"| {number(bpb[0], 1.0, 4, '+') if bpb else ''} |")
    return lines + [""]


def missing_section(tasks, runs, items) -> list[str]:
    """Items some run lacks, counted against the union of each task's documents."""
    rows = []
    for task in tasks:
        have = {r.path.name: items[r.path][task].doc_id_N if task in items[r.path]
                else np.zeros(0, np.int64) for r in runs}
        union = functools.reduce(np.union1d, have.values())
        rows += [f"| {task} | {name} | {len(union) - len(ids)} of {len(union)} |"
                 for name, ids in have.items() if len(ids) < len(union)]
    if not rows:
        return ["## Missing items", "", "None: every run scored the same items of each task.", ""]
    return ["## Missing items", "", "Left out of every pair that includes the run:", "",
            "| task | run | missing |", "|---|---|---|", *rows, ""]


# ---- the report ----

def load_study(run_dirs, baseline, step, need_other_arm: bool = True):
    """(runs, arms, base arm, step, items): the inputs, checked; ReportError names what is
    missing and the fix. ``baseline`` may be None for a --plan pilot."""
    dirs = runs_lib.unique_dirs(run_dirs)
    base_path = runs_lib.unique_dirs([baseline])[0] if baseline is not None else None
    if base_path is not None and base_path not in dirs:
        raise ReportError(f"--baseline {baseline} is not one of the RUN_DIRs: name the "
                          "baseline run among the RUN_DIRs too")
    if len(dirs) < 2:
        raise ReportError(f"one run ({dirs[0]}) is nothing to compare: pass the baseline's run "
                          "and at least one run of another arm")
    runs = [runs_lib.load_run(d) for d in dirs]
    arms = runs_lib.group_arms(runs)
    runs = [r for members in arms.values() for r in members]  # each (arm, seed) once
    base = next((r.arm for r in runs if r.path == base_path), None)
    if base_path is not None and base is None:  # the baseline was a copy of another seed
        base = next(r.arm for members in arms.values() for r in members
                    if runs_lib.same_rows(r, runs_lib.load_run(base_path)))
    if need_other_arm and len(arms) < 2:
        raise ReportError(f"every run is a seed of the baseline arm {base}: pass at least one "
                          "run of another arm (a config that differs in more than the seed)")
    step_used = runs_lib.choose_step(runs, step)
    items = {r.path: runs_lib.load_items(r.eval_files[step_used]) for r in runs}
    if base is not None:
        for arm, members in arms.items():
            if arm != base:
                runs_lib.check_common_items(runs_lib.seed_pairs(members, arms[base]), items, step_used)
    return runs, arms, base, step_used, items


def compare_arms(arms, base, items, tasks, primary, step, resamples, seed):
    """Per (arm, task) exploratory comparisons, and every arm's primaries, Holm-corrected
    together over all arms x endpoints (prefixlm.study.endpoints: the family is the report)."""
    results, aligned, primary_results, n_pairs = {}, {}, {}, {}
    for arm, arm_runs in arms.items():
        if arm == base:
            continue
        pairs = runs_lib.seed_pairs(arm_runs, arms[base])
        n_pairs[arm] = len(pairs)
        for task in tasks:
            if (pair_items := runs_lib.aligned_items(pairs, items, task)) is not None:
                aligned[arm, task] = pair_items
                results[arm, task] = seed_stats.compare_task(pair_items, resamples, seed)
        primary_results[arm] = [endpoints.evaluate_endpoint(e, pairs, items, step, resamples,
                                                            seed) for e in primary]
    endpoints.correct_family([r for rs in primary_results.values() for r in rs])
    return results, aligned, primary_results, n_pairs


def build_report(run_dirs, baseline, output, step: int | None = None,
                 resamples: int = item_stats.RESAMPLES, seed: int = 0,
                 primary: str = endpoints.DEFAULT_PRIMARY) -> pathlib.Path:
    """Loads the runs, compares every arm with the baseline arm, writes REPORT.md and PNGs."""
    check_args(resamples, seed)
    declared = _parse(endpoints.parse_primary, primary)
    runs, arms, base, step_used, items = load_study(run_dirs, baseline, step)
    tasks = sorted({t for per_run in items.values() for t in per_run})
    results, aligned, primary_results, n_pairs = compare_arms(
        arms, base, items, tasks, declared, step_used, resamples, seed)
    for warning in dict.fromkeys(w for rs in primary_results.values() for r in rs
                                 for w in r.left_out):
        print(f"prefixlm.report: warning: {warning}", file=sys.stderr)
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    others = [a for a in arms if a != base]
    figures.plot_forest(results, others, tasks, base, out / "forest.png",
                             {arm: arm_method(n_pairs[arm]) for arm in others})
    pngs = [out / "forest.png", *figures.plot_curves(runs, out)]
    family = endpoints.family_text(primary_results)
    lines = header(base, arms, runs, step_used, step is not None, declared, n_pairs,
                   resamples, seed, family)
    lines += primary_section(primary_results, n_pairs, step_used)
    lines += detectable.detect_section(primary_results, family_size(primary_results))
    lines += runs_section(arms, items)
    for task in tasks:
        lines += task_section(task, arms, base, items, results, aligned)
    lines += missing_section(tasks, runs, items)
    lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in pngs], "",
              "## What the evidence supports", ""]
    lines += ["- " + endpoints.sentence(arm, base, primary_results[arm], n_pairs[arm], family)
              for arm in others]
    return atomic.write_text(out / "REPORT.md", "\n".join(lines) + "\n")


def family_size(primary_results) -> int:
    """The number of hypotheses Holm ran over (at least 1)."""
    return max(1, sum(r.test is not None and np.isfinite(r.test.p)
                      for rs in primary_results.values() for r in rs))


def plan(run_dirs, baseline, effects: str, plan_arms: int, step: int | None = None,
         primary: str = endpoints.DEFAULT_PRIMARY) -> list[str]:
    """The --plan table: seeds per arm for each stated effect, from a pilot's variance."""
    wanted = _parse(detectable.parse_effects, effects)
    declared = _parse(endpoints.parse_primary, primary)
    if plan_arms < 1:
        raise ReportError(f"--plan_arms {plan_arms}: the study needs at least 1 arm besides "
                          "the baseline")
    family = plan_arms * len(set(declared) | {e for e, _ in wanted})
    runs, arms, base, step_used, items = load_study(run_dirs, baseline, step,
                                                    need_other_arm=False)
    paired_arms = {a: runs_lib.seed_pairs(m, arms[base]) for a, m in arms.items()
                   if base is not None and a != base}
    pilots = {}
    for e, _ in wanted:
        results = [endpoints.evaluate_endpoint(e, pairs, items, step_used, item_stats.RESAMPLES, 0)
                   for pairs in paired_arms.values() if len(pairs) >= 2]
        for warning in dict.fromkeys(w for r in results for w in r.left_out):
            print(f"prefixlm.report: warning: {warning}", file=sys.stderr)
        pilot = detectable.from_results(results) if results else None
        if pilot is None or pilot.df < 1:
            pilot = detectable.single_arm_sd(e, arms, items, step_used)
        if pilot.df < 1:
            raise ReportError(f"the pilot has no two seeds of one arm with {e.name} at step "
                              f"{step_used}: pass two or more seeds of an arm (the baseline's "
                              "seeds will do)")
        pilots[e.name] = pilot
    return detectable.plan_lines(pilots, wanted, family,
                                 f"{len(runs)} runs of {len(arms)} arm(s) at step {step_used}")


def _parse(parse, text):
    try:
        return parse(text)
    except ValueError as e:
        raise ReportError(str(e)) from e


def check_args(resamples: int, seed: int) -> None:
    if resamples < 1:
        raise ReportError(f"--resamples {resamples}: the bootstrap needs at least 1 resample "
                          f"(default {item_stats.RESAMPLES:,})")
    if seed < 0:
        raise ReportError(f"--seed {seed}: numpy's generator takes a seed >= 0 (default 0)")
