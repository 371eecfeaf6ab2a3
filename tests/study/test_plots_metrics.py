"""`python -m prefixlm.plots metrics`: PNGs and the final-results table from metrics.jsonl files."""

import json

import numpy as np
import pytest

from prefixlm import plots
from prefixlm.study import figures

TASKS = ("piqa_local", "arc_easy_local", "winogrande_local", "hellaswag_local",
         "charbench_local", "charbench_local_count_unique_chars",
         "charbench_local_find_first_occurrence")


def write_run(d, seed, steps=120, restart_at=60):
    """A fake run: log lines every step, validation every 20, evaluation every 40, and a restart
    that re-logs steps (the later record must win)."""
    rng = np.random.default_rng(seed)
    d.mkdir()
    lines = []
    for step in list(range(1, restart_at + 1)) + list(range(restart_at - 5, steps + 1)):
        rec = {"step": step, "tokens": step * 4096,
               "loss": 8 / np.sqrt(step) + 2 + 0.3 * rng.standard_normal(),
               "nll": 7.5 / np.sqrt(step) + 2 + 0.3 * rng.standard_normal()}
        if step % 20 == 0:
            rec |= {"val/loss": 8 / np.sqrt(step) + 2.1, "val/nll": 7.5 / np.sqrt(step) + 2.1}
        if step % 40 == 0:
            for t in TASKS:
                acc = 0.25 + 0.1 * step / steps + 0.02 * rng.standard_normal()
                rec |= {f"{t}/acc": acc, f"{t}/acc_stderr": 0.02,
                        f"{t}/bpb": 1.5 - 0.3 * step / steps, f"{t}/bpb_stderr": 0.01}
                if not t.startswith(("charbench", "winogrande")):
                    rec |= {f"{t}/acc_norm": acc + 0.02, f"{t}/acc_norm_stderr": 0.02}
                if t.startswith("charbench"):
                    rec[f"{t}/majority"] = 0.23
        lines.append(json.dumps(rec))
    lines.append('{"step": 99, "lo')  # a torn last line (an append cut short) is skipped
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_metrics_plots_and_table(tmp_path, capsys):
    runs = [tmp_path / "ce", tmp_path / "prefix_norm"]
    for i, d in enumerate(runs):
        write_run(d, i)
    out = tmp_path / "plots"
    assert plots.main(["metrics", *map(str, runs), "--output", str(out)]) == 0
    for name in ("training.png", "tasks.png", "tasks_bpb.png", "charbench_local.png"):
        png = out / name
        assert png.is_file() and png.stat().st_size > 20_000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "final_results.md").read_text()
    assert table.startswith("| metric | ce | prefix_norm |")
    assert "| tokens | 491.52k | 491.52k |" in table
    assert "| piqa_local acc_norm | " in table and "winogrande_local acc_norm" not in table
    assert " ± 0.0200 |" in table and "charbench_local 0.2300" in table
    assert "| piqa_local bpb | 1.2000 ± 0.0100 | 1.2000 ± 0.0100 |" in table
    assert table in capsys.readouterr().out


def test_load_metrics_dedupes_restarts(tmp_path):
    write_run(tmp_path / "r", 0)
    recs = figures.load_metrics(tmp_path / "r")
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)) == list(range(1, 121))


def test_missing_run_dir_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        figures.load_metrics(tmp_path)


def test_bpb_alone_makes_a_task(tmp_path):
    """A run that logs only the continuous metric still gets its task panel and table row."""
    d = tmp_path / "r"
    d.mkdir()
    rows = [{"step": s, "piqa_local/bpb": 1.0 / s} for s in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert figures.eval_tasks({"r": figures.load_metrics(d)}) == ["piqa_local"]
    out = tmp_path / "plots"
    assert plots.main(["metrics", str(d), "--output", str(out)]) == 0
    assert (out / "tasks_bpb.png").stat().st_size > 10_000
    assert "| piqa_local bpb | 0.5000 |" in (out / "final_results.md").read_text()
