"""The study report's evidence rules (issue 20): the family is the whole report, a seed is an
identity, every primary value is from the named step, ties are no evidence, each arm's forest
interval names its method, what a null result could have detected, the --plan command, and a
report that never imports JAX."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from prefixlm import report
from prefixlm.study import endpoints, seed_stats, sim

N = 200
TASKS = ("piqa_local", "charbench_local_find_first_occurrence")


def make_run(root, dirname, objective, seed, *, bpb_shift=0.0, noise_seed=None,
             val_nll=None, tasks=TASKS, steps=(100, 200), doc_ids=range(N)):
    """A run directory. bpb of item i: 2 + 0.5 sin(i) + bpb_shift (+ N(0, 0.05) noise drawn
    from ``noise_seed`` when given); correct: a fixed pattern per seed; ``val_nll``: {step:
    value} logged in metrics.jsonl (a step missing from it logs no val/nll)."""
    d = root / dirname
    (d / "eval").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "name": f"{objective}_seed{seed}", "seed": seed, "data_seed": -1,
        "objective": {"name": objective, "eps": 0.1}, "model": {"d_model": 64}}))
    ids = np.array(list(doc_ids))
    bpb = 2 + 0.5 * np.sin(ids) + bpb_shift
    if noise_seed is not None:
        bpb = bpb + np.random.default_rng(noise_seed).normal(0, 0.05, len(ids))
    correct = (np.random.default_rng([seed, 3]).random(len(ids)) < 0.6).astype(int)
    rows = []
    for task in tasks:
        rows += [json.dumps({"task": task, "doc_id": int(i), "correct": int(c),
                             "correct_norm": None, "gold_logprob": -float(b) * 10 * math.log(2),
                             "gold_bytes": 10, "n_choices": 2})
                 for i, c, b in zip(ids, correct, bpb, strict=True)]
    metrics = []
    for step in steps:
        (d / "eval" / f"step_{step:08d}.jsonl").write_text("\n".join(rows) + "\n")
        row = {"step": step, "loss": 3.0}
        if val_nll and step in val_nll:
            row["val/nll"] = val_nll[step]
        metrics.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return d


def run_report(dirs, out, capsys=None, baseline=None):
    code = report.main([*map(str, dirs), "--baseline", str(baseline or dirs[0]),
                        "--output", str(out)])
    assert code == 0
    text = (out / "REPORT.md").read_text()
    return text, capsys.readouterr().err if capsys else ""


def primary(text, arm, endpoint):
    """The cells of one row of the primary table."""
    table = text.split("## Primary endpoints\n", 1)[1].split("\n## ", 1)[0]
    line = next(r for r in table.splitlines() if r.startswith(f"| {arm} | {endpoint} |"))
    return [c.strip() for c in line.strip("|").split("|")]


STEP, PAIRS, DELTA, P, HOLM, VERDICT = 2, 3, 5, 6, 7, 8


def evidence(text, arm):
    body = text.split("## What the evidence supports\n", 1)[1]
    return next(s for s in body.splitlines() if s.startswith(f"- {arm} "))


def three_seed_study(root, arm_val=lambda s: 3.0 + 0.01 * s, **arm_kw):
    dirs = [make_run(root, f"ce_s{s}", "ce", s, val_nll={100: 3.5, 200: 3.0 + 0.01 * s})
            for s in range(3)]
    dirs += [make_run(root, f"ls_s{s}", "label_smoothing", s,
                      val_nll={100: 3.5, 200: arm_val(s)}, **arm_kw) for s in range(3)]
    return dirs


# ---- 1. the family is the report ----

def test_null_reports_claim_at_most_5_percent_and_a_true_gain_is_found():
    """4,000 simulated seven-run studies (6 arms vs CE, 3 primaries, in-loop item counts) per
    scenario, seed sd 0.005 bpb, the README's 5 seeds: with no true effect at most 5% of
    reports write any improves/worsens (measured 2.0%; the binomial sd of the share is 0.35
    points at 5%, so the bound holds with ~8 sd of room); a true 0.04 bpb CharBench gain in one
    arm is found in at least 80% (measured 98.9%). The per-arm Holm of before gives 25%."""
    rates = {}
    for gain in (0.0, 0.04):
        design = sim.StudyDesign(seeds=5, seed_sd_bpb=0.005, charbench_bpb_gain=gain)
        d, item_var = sim.simulate_means(design, 4000, np.random.default_rng(2026))
        c_RxAxK = endpoints.claims(d, sim.LOWER_IS_BETTER, item_var)
        assert c_RxAxK.shape == (4000, 6, 3)
        rates[gain] = ((c_RxAxK != 0).any((1, 2)).mean(), (c_RxAxK[:, 0, 0] == 1).mean())
    assert rates[0.0][0] <= 0.05, rates
    assert rates[0.04][1] >= 0.80, rates


def test_holm_runs_over_every_arm_and_endpoint(tmp_path):
    """Two arms of 3 seeds and 3 primaries: one family of 6 (stated in the header), and each
    Holm p is the step-down over all 6 p-values of the table, not within the arm."""
    dirs = three_seed_study(tmp_path)
    dirs += [make_run(tmp_path, f"pn_s{s}", "prefix_norm", s, bpb_shift=0.01 * (s + 1),
                      val_nll={200: 3.0 + 0.02 * s}) for s in range(3)]
    text, _ = run_report(dirs, tmp_path / "o")
    assert "the family is every arm x every primary endpoint; method: Holm over the report's " \
        "6 primary tests = 2 arm(s) with seed pairs x 3 endpoint(s)" in text
    cells = [primary(text, arm, e) for arm in ("label_smoothing", "prefix_norm")
             for e in ("mean CharBench bits/byte", "mean accuracy over piqa/winogrande/"
                       "arc_easy/hellaswag", "val/nll")]
    p_K = np.array([float(c[P]) if c[P] else np.nan for c in cells])
    tested = np.isfinite(p_K)
    order = np.argsort(np.where(tested, p_K, np.inf))[:tested.sum()]
    expected = np.minimum(1, np.maximum.accumulate(p_K[order] * (tested.sum()
                                                                 - np.arange(tested.sum()))))
    got = np.array([float(cells[i][HOLM]) for i in order])
    np.testing.assert_allclose(got, expected, rtol=0.06)  # cells carry 2 significant digits


# ---- 3. a seed is an identity ----

def test_a_rerun_seed_is_refused_naming_both_dirs(tmp_path, capsys):
    """A second directory of (label_smoothing, seed 2) with other results would be a fourth
    seed pair paired with the same baseline run: refused in one line naming both."""
    dirs = three_seed_study(tmp_path)
    rerun = make_run(tmp_path, "ls_s2_rerun", "label_smoothing", 2, bpb_shift=0.3,
                     val_nll={200: 3.02})
    code = report.main([*map(str, dirs), str(rerun), "--baseline", str(dirs[0]),
                        "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(dirs[5]) in err and str(rerun) in err and "seed 2" in err


def test_an_identical_copy_of_a_seed_is_used_once(tmp_path, capsys):
    dirs = three_seed_study(tmp_path)
    copy = make_run(tmp_path, "ls_s2_copy", "label_smoothing", 2,
                    val_nll={100: 3.5, 200: 3.02})
    text, err = run_report([*dirs, copy], tmp_path / "o", capsys)
    assert f"{copy} repeats {dirs[5]}" in err and "used once" in err
    for e in ("mean CharBench bits/byte", "val/nll"):
        assert primary(text, "label_smoothing", e)[PAIRS] == "3"
    assert evidence(text, "label_smoothing").startswith("- label_smoothing (3 seed pairs)")


def test_a_fifo_in_a_copied_seed_is_refused_not_waited_on(tmp_path, capsys):
    """Comparing a copy with its seed reads every step's file: a FIFO at another step's name
    (not the report's step) is refused in one line instead of blocking the report for ever."""
    import signal

    dirs = three_seed_study(tmp_path)
    copy = make_run(tmp_path, "ls_s2_copy", "label_smoothing", 2, val_nll={100: 3.5, 200: 3.02})
    for d in (dirs[5], copy):
        os.mkfifo(d / "eval" / "step_00000050.jsonl")

    class Blocked(Exception):  # not an OSError: the report must not catch it
        pass

    def hung(*_):
        raise Blocked("the report waited 20 s on a named pipe")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        code = report.main([*map(str, dirs), str(copy), "--baseline", str(dirs[0]),
                            "--output", str(tmp_path / "o")])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "a FIFO" in err, err
    assert "step_00000050.jsonl" in err


# ---- 4. no stale values ----

def test_a_missing_val_nll_at_the_step_is_left_out_not_replaced(tmp_path, capsys):
    """Seed 1 of the arm logged val/nll 9.0 at step 100 and nothing at step 200 (its final
    validation failed): the old report took the 9.0 (a pair difference of 6); now the pair is
    left out of val/nll with a warning naming the run and the step, and `seed pairs` says 2."""
    dirs = three_seed_study(tmp_path)
    stale = make_run(tmp_path, "ls_s1_stale", "label_smoothing", 1, val_nll={100: 9.0})
    dirs[4] = stale
    (tmp_path / "ls_s1").rename(tmp_path / "unused")
    text, err = run_report(dirs, tmp_path / "o", capsys)
    warning = "ls_s1_stale has no val/nll at step 200: seed pair 1 vs 1 left out of val/nll"
    assert warning in err and f"- {warning}" in text
    cells = primary(text, "label_smoothing", "val/nll")
    assert cells[STEP] == "200" and cells[PAIRS] == "2"
    d_S = [3.0 - 3.0, 3.02 - 3.02]  # seeds 0 and 2: the values at step 200 only
    assert float(cells[DELTA].split()[0]) == pytest.approx(np.mean(d_S), abs=1e-4)
    assert primary(text, "label_smoothing", "mean CharBench bits/byte")[PAIRS] == "3"


def test_a_run_missing_an_endpoints_items_is_left_out_of_that_endpoint(tmp_path, capsys):
    """Seed 0 of the arm has no CharBench items at the step: that pair leaves CharBench bpb
    (warned, `seed pairs` 2) and stays in the accuracy endpoint (3)."""
    dirs = three_seed_study(tmp_path)
    dirs[3] = make_run(tmp_path, "ls_s0_piqa_only", "label_smoothing", 0, tasks=TASKS[:1],
                       val_nll={200: 3.0})
    text, err = run_report(dirs, tmp_path / "o", capsys)
    warning = (f"ls_s0_piqa_only has no {TASKS[1]} items at step 200: seed pair 0 vs 0 left "
               "out of mean CharBench bits/byte")
    assert warning in err and warning in text
    assert primary(text, "label_smoothing", "mean CharBench bits/byte")[PAIRS] == "2"
    assert primary(text, "label_smoothing", "mean accuracy over piqa/winogrande/arc_easy/"
                   "hellaswag")[PAIRS] == "3"


# ---- 5. no evidence from ties ----

def test_identical_pair_means_without_items_are_untested():
    """[0.0125] * 3 gave p = 1.9e-32 and a claim; with no item-level variance to floor at,
    identical pair means are a tie: no test, no interval."""
    test = seed_stats.seed_test([0.0125] * 3)
    assert math.isnan(test.p) and math.isnan(test.interval.lo)
    assert seed_stats.seed_test([0.0, 0.0, 0.0]).p == 1.0  # no difference at all: p 1
    mean, half, p = seed_stats.t_tests([[0.0125] * 3, [0.01, 0.02, 0.03]])
    t = 0.02 / (0.01 / math.sqrt(3))
    assert math.isnan(p[0]) and p[1] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)


def test_identical_pair_means_with_items_claim_what_the_items_show():
    """With item-level evidence the seed-level variance is floored at the item-sampling
    variance of a pair mean v: t = mean / sqrt(v / 3) with 2 df, p = 1 - t / sqrt(2 + t^2)
    (the closed form of Student's t at 2 df)."""
    for item_var in (6.25e-6, 1e-3):
        test = seed_stats.seed_test([0.0125] * 3, item_var)
        t = 0.0125 / math.sqrt(item_var / 3)
        assert test.p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
        half = math.sqrt(2 * 0.95**2 / (1 - 0.95**2)) * math.sqrt(item_var / 3)
        assert test.interval.hi - test.interval.est == pytest.approx(half, rel=1e-9)
    assert seed_stats.seed_test([0.0125] * 3, 1e-3).p > 0.5  # noisy items: no evidence


def test_a_report_of_tied_pair_means_claims_nothing_from_the_tie(tmp_path):
    """val/nll 0.0125 above the baseline in every seed pair (no items): untested. CharBench
    bpb 0.0125 above on every item, with the same item noise in every seed: identical pair
    means, tested against the item-sampling variance only."""
    dirs = [make_run(tmp_path, f"ce_s{s}", "ce", s, noise_seed=99, val_nll={200: 3.0 + s})
            for s in range(3)]
    dirs += [make_run(tmp_path, f"ls_s{s}", "label_smoothing", s, bpb_shift=0.0125,
                      noise_seed=7, val_nll={200: 3.0125 + s}) for s in range(3)]
    text, _ = run_report(dirs, tmp_path / "o")
    cells = primary(text, "label_smoothing", "val/nll")
    assert cells[VERDICT] == "untested (identical seed-pair means)" and cells[P] == ""
    line = evidence(text, "label_smoothing")
    assert "worsens val/nll" not in line and "improves val/nll" not in line
    assert "val/nll Δ +0.0125 (identical seed-pair means and no items: untested" in line
    section = text.split("## What this study could detect\n", 1)[1].split("\n## ", 1)[0]
    row = next(r for r in section.splitlines() if r.startswith("| val/nll |"))
    assert "| 3 |" in row and "fewer than 2 seed pairs" not in row
    assert "not measurable (the seed pairs agree exactly and there are no items)" in row
    diff = (np.random.default_rng(7).normal(0, 0.05, N) + 0.0125
            - np.random.default_rng(99).normal(0, 0.05, N))
    t = diff.mean() / math.sqrt(diff.var(ddof=1) / N / 3)
    cells = primary(text, "label_smoothing", "mean CharBench bits/byte")
    assert float(cells[P]) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=0.05)


# ---- 6. the forest plot ----

def test_the_forest_plot_labels_each_arm_with_its_own_method(tmp_path, monkeypatch):
    from prefixlm.core import atomic

    figures = []
    monkeypatch.setattr(atomic, "save_figure", lambda fig, path, **kw: figures.append(fig))
    dirs = three_seed_study(tmp_path)
    dirs.append(make_run(tmp_path, "pn_s0", "prefix_norm", 0, val_nll={200: 3.0}))
    report.main([*map(str, dirs), "--baseline", str(dirs[0]), "--output", str(tmp_path / "o")])
    forest = next(f for f in figures if "Paired difference" in f._suptitle.get_text())
    labels = [t.get_text() for t in forest.legends[0].get_texts()]
    assert labels == ["label_smoothing (t over 3 seed pairs)",
                      "prefix_norm (item-level bootstrap, one seed pair)"]
    assert "item-level bootstrap" not in forest._suptitle.get_text()


# ---- 2. what the study could detect, and the plan ----

def test_power_and_detectable_effect_agree_with_scipy():
    from scipy import stats
    for seeds in (4, 5, 8):  # scipy's nct is nan at 2 df here
        crit = stats.t.ppf(1 - 0.05 / 36, seeds - 1)
        ncp = 0.04 / (0.007 / math.sqrt(seeds))
        expected = stats.nct.sf(crit, seeds - 1, ncp) + stats.nct.cdf(-crit, seeds - 1, ncp)
        assert seed_stats.power(0.04, 0.007, seeds, 18) == pytest.approx(expected, abs=1e-4)
        mde = seed_stats.detectable_effect(0.007, seeds, 18)
        assert seed_stats.power(mde, 0.007, seeds, 18) == pytest.approx(0.8, abs=1e-6)
    assert seed_stats.seeds_needed(0.04, 0.007, 18) == 5  # power 0.79 at 4, 0.99 at 5


def test_what_this_study_could_detect(tmp_path):
    """The section's CharBench row: the pair means' sd pooled over the arms (here one arm),
    the most pairs, and the effect found with 80% power at 0.05 / family."""
    shifts = (0.01, 0.03, 0.08)
    dirs = [make_run(tmp_path, f"ce_s{s}", "ce", s, val_nll={200: 3.0}) for s in range(3)]
    dirs += [make_run(tmp_path, f"ls_s{s}", "label_smoothing", s, bpb_shift=shifts[s],
                      val_nll={200: 3.0 + shifts[s]}) for s in range(3)]
    text, _ = run_report(dirs, tmp_path / "o")
    section = text.split("## What this study could detect\n", 1)[1].split("\n## ", 1)[0]
    family = int(text.split("Holm over the report's ", 1)[1].split(" ")[0])
    sd = np.std(shifts, ddof=1)
    row = next(r for r in section.splitlines() if r.startswith("| mean CharBench bits/byte |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3" and cells[2] == str(N)  # one CharBench task of N items
    assert cells[3] == f"{sd:.4f} (2)"
    assert cells[5] == f"{seed_stats.detectable_effect(sd, 3, family):.4f}"


def test_plan_from_the_baselines_seeds(tmp_path, capsys):
    """A pilot of the baseline's 3 seeds: a pair mean's variance is 2 x the run values'
    variance; seeds needed for a 0.04 bpb CharBench gain in a study of 6 arms x 3 endpoints."""
    from prefixlm.study import detectable

    shifts = (0.0, 0.004, 0.011)
    dirs = [make_run(tmp_path, f"ce_s{s}", "ce", s, bpb_shift=shifts[s], val_nll={200: 3.0})
            for s in range(3)]
    assert report.main([*map(str, dirs), "--plan", "charbench/bpb=0.04,mc/acc=2"]) == 0
    out = capsys.readouterr().out
    sd = math.sqrt(2) * np.std(shifts, ddof=1)
    row = next(r for r in out.splitlines() if r.startswith("| mean CharBench bits/byte |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.0400" and cells[2].startswith(f"{sd:.4f} (2, 2 x the sd of single")
    assert cells[3] == str(seed_stats.seeds_needed(0.04, sd, 18))
    upper = detectable.PilotSd(sd, 2, math.nan, 0, "").upper()
    assert cells[4].startswith(str(seed_stats.seeds_needed(0.04, upper, 18)))
    assert "| mean accuracy over piqa/winogrande/arc_easy/hellaswag | 2.0 pt |" in out


# ---- arguments and inputs, one line each ----

@pytest.mark.parametrize("args", [["--resamples", "0"], ["--resamples", "-5"],
                                  ["--seed", "-1"], ["--plan", "charbench/bpb=-1"],
                                  ["--plan", "charbench/bpb"]])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args):
    dirs = three_seed_study(tmp_path)
    code = report.main([*map(str, dirs), "--baseline", str(dirs[0]), "--output",
                        str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and args[0] in err, err
    assert not (tmp_path / "o").exists()


def test_runs_with_no_item_in_common_are_one_line_exit_2(tmp_path, capsys):
    base = make_run(tmp_path, "ce_s0", "ce", 0, val_nll={200: 3.0})
    other = make_run(tmp_path, "ls_s0", "label_smoothing", 0, val_nll={200: 3.0},
                     doc_ids=range(N, 2 * N))
    code = report.main([str(base), str(other), "--baseline", str(base), "--output",
                        str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(base) in err and str(other) in err and "item in common at step 200" in err


@pytest.mark.parametrize("damage", ["eval_row", "config", "metrics_row"])
def test_a_file_off_its_schema_is_one_line_exit_2(tmp_path, capsys, damage):
    """The readers raise SchemaError (not a ReportError): the report still says it in one line
    naming the file and exits 2, instead of a traceback."""
    dirs = three_seed_study(tmp_path)
    path, text = {"eval_row": (dirs[4] / "eval" / "step_00000200.jsonl", "[1, 2]\n"),
                  "config": (dirs[4] / "config.json", "[]"),
                  "metrics_row": (dirs[4] / "metrics.jsonl", '{"step": "7"}\n')}[damage]
    path.write_text(text + (path.read_text() if damage != "config" else ""))
    code = report.main([*map(str, dirs), "--baseline", str(dirs[0]), "--output",
                        str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err, err


# ---- the report path never imports JAX ----

def test_the_report_builds_with_jax_blocked(tmp_path):
    dirs = three_seed_study(tmp_path)
    script = ("import sys\nfor m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax'):\n"
              "    sys.modules[m] = None\n"
              "from prefixlm import report\n"
              f"sys.exit(report.main({[*map(str, dirs)]!r} + ['--baseline', {str(dirs[0])!r}, "
              f"'--output', {str(tmp_path / 'o')!r}]))\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "## What this study could detect" in (tmp_path / "o" / "REPORT.md").read_text()
