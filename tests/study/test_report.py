"""`python -m prefixlm.report` on synthetic run directories with known effects, and the paired
statistics (prefixlm.study.item_stats) against independent float64 computations."""

import json
import math
import os
import pathlib

import numpy as np
import pytest

from prefixlm import report
from prefixlm.study import endpoints, item_stats, seed_stats
from prefixlm.study import runs as study_lib
from prefixlm.study import sim as sim_lib

N_ITEMS = 400
TASKS = ("hellaswag_local", "piqa_local")


def base_outcomes(task: str, seed: int):
    """The baseline's per-item (correct, correct_norm, gold_logprob) of one seed."""
    rng = np.random.default_rng([TASKS.index(task), seed])
    correct = (rng.random(N_ITEMS) < 0.5).astype(int)
    norm = (rng.random(N_ITEMS) < 0.55).astype(int)
    return correct, norm, -rng.uniform(5.0, 40.0, N_ITEMS)


def gold_bytes(task: str):
    return np.random.default_rng([TASKS.index(task), 99]).integers(10, 60, N_ITEMS)


def write_run(root, name, objective, eps, seed, outcomes, steps=(100, 200), drop=()):
    """A run dir: config.json, metrics.jsonl and eval/step_*.jsonl. ``outcomes(task, seed)``
    gives (correct, correct_norm, gold_logprob); items in ``drop`` (task, doc_id) are left out."""
    d = root / name
    (d / "eval").mkdir(parents=True)
    config = {"name": f"{objective}_eps{eps}_seed{seed}".replace(".", "p"), "seed": seed,
              "data_seed": -1, "objective": {"name": objective, "eps": eps},
              "model": {"d_model": 64}, "train": {"steps": 300}}
    (d / "config.json").write_text(json.dumps(config))
    metrics = []
    for step in steps:
        row = {"step": step, "tokens": step * 1024, "loss": 3.0 + eps, "nll": 3.0,
               "val/nll": 3.1 + 0.01 * seed}
        lines = []
        for task in TASKS:
            correct, norm, logprob = outcomes(task, seed)
            for i in range(N_ITEMS):
                if (task, i) not in drop:
                    lines.append(json.dumps({
                        "task": task, "doc_id": i, "correct": int(correct[i]),
                        "correct_norm": int(norm[i]), "gold_logprob": float(logprob[i]),
                        "gold_bytes": int(gold_bytes(task)[i]), "n_choices": 2}))
            row |= {f"{task}/acc": correct.mean(), f"{task}/acc_stderr": 0.02,
                    f"{task}/bpb": np.mean(-logprob / math.log(2) / gold_bytes(task))}
        (d / "eval" / f"step_{step:08d}.jsonl").write_text("\n".join(lines) + "\n")
        metrics.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return d


def better(task, seed):
    """Right on 15% more items (60 of the baseline's wrong ones), and 0.5 nats surer of gold."""
    correct, norm, logprob = base_outcomes(task, seed)
    correct = correct.copy()
    correct[np.flatnonzero(correct == 0)[:int(0.15 * N_ITEMS)]] = 1
    return correct, norm, logprob + 0.5


def noisy(task, seed):
    """The baseline with 20 items flipped each way: no true difference."""
    correct, norm, logprob = base_outcomes(task, seed)
    rng = np.random.default_rng([seed, 7, TASKS.index(task)])
    correct = correct.copy()
    for value in (0, 1):
        correct[rng.choice(np.flatnonzero(correct == value), 20, replace=False)] = 1 - value
    return correct, norm, logprob + rng.normal(0, 0.3, N_ITEMS)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = [write_run(root, "ce_s0", "ce", 0.0, 0, base_outcomes, steps=(100, 200, 300)),
            write_run(root, "ce_s1", "ce", 0.0, 1, base_outcomes),
            write_run(root, "same_s0", "label_smoothing", 0.1, 0, base_outcomes),
            write_run(root, "better_s0", "prefix_norm", 0.1, 0, better,
                      drop={("piqa_local", i) for i in range(7)}),
            write_run(root, "noisy_s0", "prefix_simple", 0.1, 0, noisy),
            write_run(root, "noisy_s1", "prefix_simple", 0.1, 1, noisy)]
    out = root / "report"
    assert report.main([*map(str, dirs), "--baseline", str(dirs[0]), "--output", str(out)]) == 0
    return out, (out / "REPORT.md").read_text()


def section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def row(text: str, task: str, arm: str) -> list[str]:
    line = next(r for r in section(text, f"## {task} (exploratory)\n").splitlines()
                if r.startswith(f"| {arm} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def primary_row(text: str, arm: str, label: str) -> list[str]:
    line = next(r for r in section(text, "## Primary endpoints\n").splitlines()
                if r.startswith(f"| {arm} | {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def sentence(text: str, arm: str) -> str:
    return next(s for s in section(text, "## What the evidence supports\n").splitlines()
                if s.startswith(f"- {arm} "))


def parse_interval(cell: str) -> tuple[float, float, float]:
    """'+15.0 [+11.2, +18.8]' -> (15.0, 11.2, 18.8)."""
    est, rest = cell.split(" [", 1)
    lo, hi = rest.rstrip("]").split(", ")
    return float(est), float(lo), float(hi)


# columns of a task row
SEEDS, PAIRED, CHANCE, MAJORITY, ACC, ACC_NORM, BPB, DACC, P, DNORM, DBPB, DPICK, DSPLIT = \
    range(1, 14)


def test_identical_arm_is_no_difference(study):
    _, text = study
    cells = row(text, "piqa_local", "label_smoothing_eps0p1")
    assert cells[DACC] == "+0.0 [+0.0, +0.0]" and cells[P] == "1 (0/0)"
    assert cells[DBPB] == "+0.0000 [+0.0000, +0.0000]"
    line = sentence(text, "label_smoothing_eps0p1")
    assert "no claim" in line and "improves" not in line and "worsens" not in line


def test_one_seed_reports_item_level_intervals_and_claims_nothing(study):
    """A 15-point gain is plain at item level, but with one seed run-to-run variance is
    unmeasured: the interval is shown, the pinned verbs never appear."""
    _, text = study
    cells = row(text, "hellaswag_local", "prefix_norm_eps0p1")
    est, lo, hi = parse_interval(cells[DACC])
    assert est == pytest.approx(15.0, abs=0.05) and lo > 0 and hi > lo
    assert cells[P].startswith(f"{item_stats.mcnemar_exact([1] * 60, [0] * 60)[0]:.2g} (60/0)")
    line = sentence(text, "prefix_norm_eps0p1")
    assert "run-to-run variance is unmeasured" in line and "no claim" in line
    assert "improves" not in text and "worsens" not in text
    assert "**Item-level only**" in text and "**Seed-level**" in text
    assert primary_row(text, "prefix_norm_eps0p1", "val/nll")[5] == \
        "+0.0000 (one value per run: no interval)"
    assert primary_row(text, "prefix_norm_eps0p1", "mean CharBench bits/byte")[5] == "n/a"
    assert primary_row(text, "prefix_norm_eps0p1",
                       "mean accuracy over piqa/winogrande/arc_easy/hellaswag")[8] == \
        "untested (one seed pair)"


def test_missing_items_are_counted_and_left_out_of_pairs(study):
    _, text = study
    assert "| piqa_local | better_s0 | 7 of 400 |" in section(text, "## Missing items")
    assert row(text, "piqa_local", "prefix_norm_eps0p1")[PAIRED] == str(N_ITEMS - 7)
    assert row(text, "hellaswag_local", "prefix_norm_eps0p1")[PAIRED] == str(N_ITEMS)


def test_seed_level_intervals_are_t_intervals_over_seed_pair_means(study):
    """With 2 seed pairs, Δacc's interval is mean ± t(0.975, 1 df) sd / sqrt(2) over the two
    pairs' mean differences (t = 12.7062...: tan(0.475 pi), the Cauchy quantile), the variance
    floored at the item-sampling variance of a pair mean (here both pair means are exactly 0:
    20 items flipped each way, so the floor is the whole variance), computed here in float64
    from the generators."""
    _, text = study
    diff_SxN = np.array([noisy("piqa_local", s)[0] - base_outcomes("piqa_local", s)[0]
                         for s in (0, 1)], dtype=np.float64)
    d_S = diff_SxN.mean(1)
    item_var = np.mean([np.sum((d - d.mean()) ** 2) / (N_ITEMS - 1) / N_ITEMS for d in diff_SxN])
    half = math.tan(0.475 * math.pi) * math.sqrt(max(d_S.var(ddof=1), item_var) / 2)
    assert half > 0.1  # a tie of the pair means is no evidence: 13.7 points either way
    cells = row(text, "piqa_local", "prefix_simple_eps0p1")
    assert cells[SEEDS] == "2"
    accs = [noisy("piqa_local", s)[0].mean() for s in (0, 1)]
    assert cells[ACC] == f"{np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f} sd"
    mean = d_S.mean() * 100
    assert cells[DACC] == f"{mean:+.1f} [{mean - half * 100:+.1f}, {mean + half * 100:+.1f}]"
    assert cells[P].endswith("(t)")
    per_seed = section(text, "## piqa_local (exploratory)\n").split("Per seed pair", 1)[1]
    assert f"| prefix_simple_eps0p1 | 0 vs 0 | {d_S[0] * 100:+.1f} |" in per_seed
    assert f"| prefix_simple_eps0p1 | 1 vs 1 | {d_S[1] * 100:+.1f} |" in per_seed
    assert "| ce_eps0p0 | 2 |" in text  # the baseline arm holds both ce seeds
    line = sentence(text, "prefix_simple_eps0p1")
    assert line.startswith("- prefix_simple_eps0p1 (2 seed pairs) vs ce_eps0p0: no primary "
                           "endpoint differs after correction")
    vals = [3.1, 3.11]
    assert f"| prefix_simple_eps0p1 | 2 | {np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f} |" \
        in text
    # val/nll: the same per seed in both arms, so each pair differs by exactly 0: p = 1
    assert primary_row(text, "prefix_simple_eps0p1", "val/nll")[5:8] == [
        "+0.0000 [+0.0000, +0.0000]", "1", "1"]


def test_old_rows_without_answers_show_n_a(study):
    _, text = study
    cells = row(text, "piqa_local", "prefix_simple_eps0p1")
    assert cells[CHANCE] == "50.0" and cells[MAJORITY] == "n/a"
    assert cells[DPICK] == "n/a" and cells[DSPLIT] == "n/a"


def test_last_common_step_and_pngs(study):
    out, text = study
    assert "Evaluation step **200**" in text
    for name in ("forest.png", "curves_acc.png", "curves_bpb.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"({name})" in text
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _one_line_exit_2(capsys, argv) -> str:
    code = report.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err


def test_bad_run_dirs_exit_2_naming_the_path(tmp_path, capsys):
    good = write_run(tmp_path, "ce_s0", "ce", 0.0, 0, base_outcomes, steps=(100,))
    other = write_run(tmp_path, "ls_s0", "label_smoothing", 0.1, 0, base_outcomes, steps=(100,))
    no_eval = tmp_path / "no_eval"
    no_eval.mkdir()
    (no_eval / "config.json").write_text("{}")
    no_config = tmp_path / "no_config"
    (no_config / "eval").mkdir(parents=True)
    out = ["--output", str(tmp_path / "o")]
    for bad, missing in ((no_eval, "eval"), (no_config, "config.json")):
        err = _one_line_exit_2(capsys, [str(good), str(bad), "--baseline", str(good), *out])
        assert str(bad / missing) in err
    err = _one_line_exit_2(capsys, [str(good), str(other), "--baseline", str(good),
                                    "--step", "7", *out])
    assert "step_00000007.jsonl" in err


def test_one_run_no_baseline_no_items_no_other_arm_are_one_line_errors(tmp_path, capsys):
    good = write_run(tmp_path, "ce_s0", "ce", 0.0, 0, base_outcomes, steps=(100,))
    seed1 = write_run(tmp_path, "ce_s1", "ce", 0.0, 1, base_outcomes, steps=(100,))
    other = write_run(tmp_path, "ls_s0", "label_smoothing", 0.1, 0, base_outcomes, steps=(100,))
    (tmp_path / "link").symlink_to(good)
    out = ["--output", str(tmp_path / "o")]
    for runs in ([good], [good, f"{good}/", tmp_path / "link"]):
        err = _one_line_exit_2(capsys, [*map(str, runs), "--baseline", str(good), *out])
        assert "one run" in err and str(good) in err and "another arm" in err
    err = _one_line_exit_2(capsys, [str(other), str(seed1), "--baseline", str(good), *out])
    assert f"--baseline {good}" in err and "among the RUN_DIRs" in err
    err = _one_line_exit_2(capsys, [str(good), str(seed1), "--baseline", str(good), *out])
    assert "every run is a seed of the baseline arm" in err
    (other / "eval" / "step_00000100.jsonl").write_text("\n")
    err = _one_line_exit_2(capsys, [str(good), str(other), "--baseline", str(good), *out])
    assert str(other / "eval" / "step_00000100.jsonl") in err and "no scored items" in err
    err = _one_line_exit_2(capsys, [str(good), str(seed1), "--baseline", str(good),
                                    "--primary", "charbench/loss", *out])
    assert "--primary entry 'charbench/loss'" in err
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are checked


def test_a_directory_named_twice_counts_once(tmp_path):
    """The same run by a symlink, a trailing slash and a relative path is one seed, not three."""
    base = write_run(tmp_path, "ce_s0", "ce", 0.0, 0, base_outcomes, steps=(100,))
    arm = write_run(tmp_path, "ls_s0", "label_smoothing", 0.1, 0, noisy, steps=(100,))
    (tmp_path / "ls_link").symlink_to(arm)
    rel = os.path.relpath(arm)
    out = tmp_path / "o"
    assert report.main([str(base), str(arm), f"{arm}/", str(tmp_path / "ls_link"), rel,
                        f"{tmp_path}/ce_s0/../ce_s0", "--baseline", f"{base}/",
                        "--output", str(out)]) == 0
    text = (out / "REPORT.md").read_text()
    assert row(text, "piqa_local", "label_smoothing_eps0p1")[SEEDS] == "1"
    assert "(one seed each)" in sentence(text, "label_smoothing_eps0p1")
    runs_table = section(text, "## Runs\n").split("Training side")[0]
    assert [r.split(" | ")[0] for r in runs_table.splitlines() if r.startswith("| ")][1:] == [
        "| ce_s0", "| ls_s0"]


def test_a_full_disk_leaves_no_empty_report_or_png(study, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing REPORT.md or a PNG: exit 2 in one line, the previous files intact,
    no temporary file left behind."""
    import errno

    from matplotlib.figure import Figure

    out, text = study
    runs = sorted(p for p in out.parent.iterdir() if (p / "config.json").exists())
    base = next(p for p in runs if p.name == "ce_s0")
    target = tmp_path / "o"
    target.mkdir()
    (target / "REPORT.md").write_text("old report\n")
    (target / "forest.png").write_bytes(b"old png")

    def full_disk(path):
        pathlib.Path(path).write_bytes(b"")  # the disk took nothing
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    argv = [*map(str, runs), "--baseline", str(base), "--output", str(target)]
    for where, name, fake in ((Figure, "savefig", lambda fig, path, **kw: full_disk(path)),
                              (pathlib.Path, "write_text", lambda path, text: full_disk(path))):
        with monkeypatch.context() as m:
            m.setattr(where, name, fake)
            err = _one_line_exit_2(capsys, argv)
        assert "No space left on device" in err
        assert (target / "REPORT.md").read_text() == "old report\n"
        assert sorted(p.name for p in target.iterdir()) == ["REPORT.md", "forest.png"] or \
            where is pathlib.Path  # the PNGs of the second attempt were written before
        assert (target / "forest.png").stat().st_size > 0
        assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]


def test_bootstrap_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    for diff_N in (rng.choice([-1.0, 0.0, 1.0], size=3000, p=[0.2, 0.62, 0.18]),  # Δacc
                   rng.normal(-0.01, 0.05, size=3000)):  # Δbpb
        iv = item_stats.paired_bootstrap(diff_N, resamples=4000, seed=1)
        mean, half = diff_N.mean(), 1.96 * diff_N.std(ddof=1) / np.sqrt(len(diff_N))
        assert iv.est == pytest.approx(mean, abs=1e-12)
        assert (iv.lo, iv.hi) == pytest.approx((mean - half, mean + half), abs=0.1 * half)
        assert item_stats.mean_stderr(diff_N)[1] == pytest.approx(half / 1.96, rel=1e-12)


def test_bpb_is_the_per_document_mean_as_evaluate_logs_it(study):
    """The report's bpb of a run equals mean_i(-logprob_i / (ln 2 * bytes_i)), the value
    prefixlm.evaluation.results.bpb_metrics writes to metrics.jsonl."""
    _, text = study
    _, _, logprob = base_outcomes("piqa_local", 0)
    bpb_N = -logprob / (math.log(2) * gold_bytes("piqa_local"))
    cell = row(text, "piqa_local", "label_smoothing_eps0p1")[BPB]
    assert cell == f"{bpb_N.mean():.4f} ± {bpb_N.std(ddof=1) / np.sqrt(N_ITEMS):.4f}"


def test_bootstrap_is_seeded():
    diff_N = np.random.default_rng(3).normal(size=500)
    assert item_stats.paired_bootstrap(diff_N, seed=5) == item_stats.paired_bootstrap(diff_N, seed=5)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (7, 3), (40, 61), (1200, 1300), (10, 10)])
def test_mcnemar_matches_an_exact_binomial(b, c):
    arm = np.array([1] * b + [0] * c + [1] * 9 + [0] * 4)
    base = np.array([0] * b + [1] * c + [1] * 9 + [0] * 4)
    p, got_b, got_c = item_stats.mcnemar_exact(arm, base)
    assert (got_b, got_c) == (b, c)
    try:
        from scipy.stats import binomtest
        expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    except ImportError:  # a direct sum in floats from log-gamma, independent of report's ints
        n, k = b + c, min(b, c)
        expected = min(1.0, 2 * sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1)
                                             - math.lgamma(n - i + 1) - n * math.log(2))
                                    for i in range(k + 1))) if n else 1.0
    assert p == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_seed_pairs_fall_back_to_rank():
    def run(seed):
        return study_lib.Run(path=None, config={"seed": seed}, metrics=[], eval_files={})
    arm, base = [run(3), run(4)], [run(0), run(1)]
    assert [(a.seed_label, b.seed_label) for a, b in study_lib.seed_pairs(arm, base)] == [
        ("3", "0"), ("4", "1")]
    assert [(a.seed_label, b.seed_label) for a, b in study_lib.seed_pairs(arm, [run(4)])] == [
        ("4", "4")]


def test_t_tests_match_the_closed_form_at_two_degrees_of_freedom():
    """Student's t with 2 df has F(t) = 1/2 + t / (2 sqrt(2 + t^2)): two-sided p = 1 - |t| /
    sqrt(2 + t^2) and the 97.5% quantile solves q / sqrt(2 + q^2) = 0.95."""
    rng = np.random.default_rng(4)
    d_RxS = rng.normal(0.01, 0.02, size=(50, 3))
    mean_R, half_R, p_R = seed_stats.t_tests(d_RxS)
    se_R = d_RxS.std(1, ddof=1) / math.sqrt(3)
    t_R = np.abs(d_RxS.mean(1)) / se_R
    q = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # F(q) = 0.975 <=> q / sqrt(2 + q^2) = 0.95
    assert q == pytest.approx(4.3027, abs=1e-4)  # the tables' value
    np.testing.assert_allclose(mean_R, d_RxS.mean(1), rtol=1e-12)
    np.testing.assert_allclose(half_R, q * se_R, rtol=1e-9)
    np.testing.assert_allclose(p_R, 1 - t_R / np.sqrt(2 + t_R**2), rtol=1e-9)
    assert seed_stats.seed_test([0.02]) is None  # one pair: no run-to-run variance
    assert seed_stats.seed_test([0.0, 0.0, 0.0]).p == 1.0


def test_holm_matches_a_direct_step_down():
    """Holm against a loop written from the definition: reject the k-th smallest p while
    p_(k) <= alpha / (K - k); stop at the first that is not."""
    rng = np.random.default_rng(7)
    p_RxK = rng.uniform(0, 0.08, size=(500, 3)) ** rng.uniform(0.5, 2, size=(500, 1))
    expected = np.zeros_like(p_RxK, dtype=bool)
    for r, p_K in enumerate(p_RxK):
        for k, i in enumerate(np.argsort(p_K)):
            if p_K[i] > 0.05 / (3 - k):
                break
            expected[r, i] = True
    adjusted, rejected = seed_stats.holm(p_RxK)
    np.testing.assert_array_equal(rejected, expected)
    np.testing.assert_array_equal(seed_stats.holm_rows(p_RxK), expected)
    assert expected.any() and not expected.all()
    adjusted, rejected = seed_stats.holm([[0.01, np.nan, 0.03]])  # untested: not counted
    np.testing.assert_allclose(adjusted[0], [0.02, np.nan, 0.03])
    p_RxK[rng.random(p_RxK.shape) < 0.3] = np.nan  # the simulation's fast path agrees on
    np.testing.assert_array_equal(seed_stats.holm_rows(p_RxK), seed_stats.holm(p_RxK)[1])  # nan


def _result(name, est, lo, hi, p):
    e = endpoints.Endpoint(name)
    return endpoints.EndpointResult(e, item_stats.Interval(est, lo, hi),
                                    seed_stats.SeedTest(item_stats.Interval(est, lo, hi), p, 3, ()),
                                    ["t"])


def test_the_pinned_verbs_only_for_corrected_primary_endpoints():
    results = [_result("charbench/bpb", -0.04, -0.05, -0.03, 0.001),
               _result("mc/acc", -0.02, -0.03, 0.001, 0.06),  # not even nominally
               _result("val/nll", 0.02, 0.01, 0.03, 0.012)]
    endpoints.correct_family(results)
    assert [r.claimed for r in results] == [True, False, True]
    family = endpoints.family_text({"pn": results})
    assert family == ("Holm over the report's 3 primary tests = 1 arm(s) with seed pairs x 3 "
                      "endpoint(s) less untested ones, family-wise 5%")
    line = endpoints.sentence("pn", "ce", results, 3, family)
    assert line == (
        "pn (3 seed pairs) vs ce: improves mean CharBench bits/byte by 0.0400 [0.0300, 0.0500] "
        "(Holm p 0.003); worsens val/nll by 0.0200 [0.0100, 0.0300] (Holm p 0.024); no "
        "corrected difference in mean accuracy over piqa/winogrande/arc_easy/hellaswag Δ -2.0 "
        f"pt [-3.0, +0.1], Holm p 0.06 ({family}).")
    one = endpoints.sentence("pn", "ce", results, 1, family)
    assert "improves" not in one and "worsens" not in one and "unmeasured" in one


def test_the_simulated_decisions_are_the_reports(tmp_path):
    """The vectorised decisions of the overclaim test (tests/study/test_report_evidence.py) equal what
    REPORT.md writes for the same studies pushed through files (config.json, metrics.jsonl,
    eval/step_*.jsonl) and main."""
    sim = sim_lib.simulate(sim_lib.Design(charbench_bpb_gain=0.04, items=300), 2,
                             np.random.default_rng(5))
    c_RxAxK = endpoints.claims(*sim_lib.pair_means(sim)[:1], sim_lib.LOWER_IS_BETTER,
                               sim_lib.pair_means(sim)[1])
    for r in range(2):
        dirs = sim_lib.write_study(tmp_path / f"s{r}", sim, r)
        out = tmp_path / f"out{r}"
        assert report.main([*map(str, dirs), "--baseline", str(dirs[0]),
                            "--output", str(out)]) == 0
        line = sentence((out / "REPORT.md").read_text(), "prefix_norm_eps0p1")
        for k, label in enumerate(("mean CharBench bits/byte", "mean accuracy over",
                                   "val/nll")):
            words = {1: f"improves {label}", -1: f"worsens {label}"}
            assert all((w in line) == (c_RxAxK[r, 0, k] == v) for v, w in words.items()), \
                (r, k, line)
    assert c_RxAxK[:, 0, 0].tolist() == [1, 1]


def test_majority_baseline_and_the_share_of_majority_answers(tmp_path):
    """A task where gold is answer 1 on 3 of 4 items: the arm gains 10 points only by
    answering 1 more often; the table shows chance, the majority baseline, +20 points of
    majority picks, and Δacc split into +15 on majority-gold items and -5 on the others."""
    n = 400
    gold = np.array([1, 1, 1, 0] * (n // 4))
    base_pred = np.where(np.arange(n) // 4 % 2 == 0, gold, 1 - gold)  # 50% right
    arm_pred = base_pred.copy()
    arm_pred[np.flatnonzero((gold == 1) & (base_pred == 0))[:60]] = 1  # +60 right
    arm_pred[np.flatnonzero((gold == 0) & (base_pred == 0))[:20]] = 1  # -20 right
    dirs = []
    for name, objective, pred in (("ce", "ce", base_pred), ("maj", "label_smoothing", arm_pred)):
        d = tmp_path / name
        (d / "eval").mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"name": f"{objective}_seed0", "seed": 0,
                                                   "objective": {"name": objective}}))
        (d / "eval" / "step_00000010.jsonl").write_text("".join(json.dumps({
            "task": "piqa_local", "doc_id": i, "correct": int(pred[i] == gold[i]),
            "correct_norm": None, "gold_logprob": -10.0, "gold_bytes": 20, "n_choices": 2,
            "gold_index": int(gold[i]), "pred_index": int(pred[i])}) + "\n" for i in range(n)))
        dirs.append(d)
    assert report.main([*map(str, dirs), "--baseline", str(dirs[0]),
                        "--output", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "REPORT.md").read_text()
    cells = row(text, "piqa_local", "label_smoothing")
    assert cells[CHANCE] == "50.0" and cells[MAJORITY] == "75.0"
    assert parse_interval(cells[DACC])[0] == pytest.approx(10.0)
    assert cells[DPICK] == "+20.0" and cells[DSPLIT] == "+10.0 = +15.0 + -5.0"
    chance, share, majority = item_stats.answer_baselines(item_stats.Items(
        np.arange(4), *np.zeros((3, 4)), np.array([2, 2, 4, 4]), np.array([0, 2, 2, 1]),
        np.zeros(4)))
    assert (chance, share, majority) == (0.375, 0.5, 2)
