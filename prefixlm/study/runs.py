"""The inputs of the study report: run directories, arms of seeds, and per-item results.

A run directory holds ``config.json``, ``metrics.jsonl`` and ``eval/step_XXXXXXXX.jsonl`` (one
JSON row per scored document, prefixlm.evaluation.results.item_rows). Runs whose configs differ only in
``seed``/``data_seed`` are the seeds of one arm; seed i of an arm is paired with seed i of the
baseline (by rank when they share no seed). A directory named twice, by any path, counts once.

A seed is an identity: two directories holding the same (arm, seed) are one run trained twice,
not two seeds (a second copy would enter as another seed pair, paired with the same baseline
run, and buy a degree of freedom it does not have). ``group_arms`` refuses them in one line
naming both, or uses one when every row they hold is the same.

Nothing here imports JAX: a report of finished runs reads config.json as JSON and takes the
identity rules from prefixlm.run.workdir, which needs neither the model nor the configs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import sys

import numpy as np

from prefixlm.core import safe_files, schemas
from prefixlm.core.errors import UserError
from prefixlm.run import workdir
from prefixlm.study import figures
from prefixlm.study.item_stats import Items

STEP_FILE = re.compile(r"step_(\d+)\.jsonl")
SEED_FIELDS = ("seed", "data_seed")  # what may differ between seeds of one arm
OPTIONAL_FIELDS = ("n_choices", "gold_index", "pred_index")  # nan when a row lacks them


class ReportError(UserError):
    """A problem with the report's inputs: reported as one line, exit status 2."""


@dataclasses.dataclass
class Run:
    """One training run directory (its real path): config, metrics rows, eval files by step."""
    path: pathlib.Path
    config: dict
    metrics: list[dict]
    eval_files: dict[int, pathlib.Path]
    arm: str = ""

    @property
    def seed_label(self) -> str:
        """'0', or '0/data3' when the data order was seeded apart from the init."""
        seed, data_seed = self.config.get("seed", 0), self.config.get("data_seed", -1)
        return f"{seed}" + ("" if data_seed in (-1, seed, None) else f"/data{data_seed}")


def unique_dirs(run_dirs) -> list[pathlib.Path]:
    """The run directories in order, each once: symlinks, '..', trailing slashes and relative
    paths are resolved first, so one directory named two ways is one run, not two seeds."""
    return list(dict.fromkeys(pathlib.Path(os.path.realpath(d)) for d in run_dirs))


def load_run(run_dir) -> Run:
    path = pathlib.Path(os.path.realpath(run_dir))
    config_path, eval_dir = path / "config.json", path / "eval"
    if not config_path.is_file():
        raise ReportError(f"{config_path} not found: pass training run directories "
                          "(python -m prefixlm.main --workdir DIR writes DIR/config.json)")
    if not eval_dir.is_dir():
        raise ReportError(f"{eval_dir} not found: the run has no per-item evaluation results "
                          "(train with eval.every > 0 and eval.tasks set)")
    files = {int(m.group(1)): p for p in eval_dir.iterdir()
             if (m := STEP_FILE.fullmatch(p.name))}
    if not files:
        raise ReportError(f"{eval_dir} holds no step_XXXXXXXX.jsonl files")
    config = workdir.read_config_json(config_path)  # schemas.CONFIG: SchemaError, one line
    has_metrics = (path / "metrics.jsonl").is_file()  # optional: only the training-side table
    return Run(path, config, figures.load_metrics(path) if has_metrics else [], files)


def arm_label(config: dict) -> str:
    """The run name without its seed part: prefix_norm_eps0p1_seed0 -> prefix_norm_eps0p1."""
    name = config.get("name") or "{name}_eps{eps}".format(**config.get("objective", {}))
    return re.sub(r"_(seed|data)\d+", "", name)


def group_arms(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by identity (workdir.identity: the fields that change results) less the
    seeds; each arm's runs sorted by seed, each seed once (``one_run_per_seed``). Labels repeat
    only for arms that differ elsewhere (say in train.steps), which then carry their first
    run's directory name."""
    by_identity: dict[str, list[Run]] = {}
    for run in runs:
        ident = {k: v for k, v in workdir.identity(run.config).items() if k not in SEED_FIELDS}
        by_identity.setdefault(json.dumps(ident, sort_keys=True), []).append(run)
    arms = {}
    for members in by_identity.values():
        label = arm_label(members[0].config)
        if label in arms:
            label = f"{label} [{members[0].path.name}]"
        members = one_run_per_seed(sorted(members, key=lambda r: (r.config.get("seed", 0),
                                                                   r.seed_label)), label)
        for run in members:
            run.arm = label
        arms[label] = members
    return arms


def same_rows(a: Run, b: Run) -> bool:
    """Whether two run directories hold the same metrics rows and evaluation files (read
    through ``safe_files``: a FIFO at any step's name is refused, never opened and waited on)."""
    return a.metrics == b.metrics and set(a.eval_files) == set(b.eval_files) and all(
        safe_files.read_bytes(a.eval_files[s]) == safe_files.read_bytes(b.eval_files[s])
        for s in a.eval_files)


def one_run_per_seed(members: list[Run], arm: str) -> list[Run]:
    """The arm's runs with each seed once: a copy with the same rows is used once (with a
    warning); a second run of the same seed with other rows is refused, naming both."""
    kept: dict[str, Run] = {}
    for run in members:
        first = kept.setdefault(run.seed_label, run)
        if first is run:
            continue
        if not same_rows(first, run):
            raise ReportError(
                f"{first.path} and {run.path} are both seed {run.seed_label} of arm {arm} with "
                "different results: a re-run of a seed is not another seed; pass one of them "
                "(train more seeds with --seeds)")
        print(f"prefixlm.report: warning: {run.path} repeats {first.path} (seed "
              f"{run.seed_label} of {arm}, same rows): used once", file=sys.stderr)
    return list(kept.values())


def _item_row(row: dict) -> tuple[str, int, tuple]:
    norm, n_bytes = row.get("correct_norm"), int(row["gold_bytes"])
    extra = tuple(math.nan if row.get(k) is None else float(row[k]) for k in OPTIONAL_FIELDS)
    return row["task"], int(row["doc_id"]), (
        float(row["correct"]), math.nan if norm is None else float(norm),
        -float(row["gold_logprob"]) / (math.log(2) * n_bytes) if n_bytes else math.nan, *extra)


def load_items(path: pathlib.Path) -> dict[str, Items]:
    """{task: Items} of one evaluation file (``schemas.EVAL_ROW`` rows, read by the one JSONL
    reader: a torn last line is dropped, any other bad line is a SchemaError naming the line and
    the field). Rows written before n_choices / gold_index / pred_index existed load with nan
    there."""
    docs: dict[str, dict[int, tuple]] = {}
    for row in schemas.read_jsonl(path, schemas.EVAL_ROW):
        task, doc_id, values = _item_row(row)
        docs.setdefault(task, {})[doc_id] = values
    if not docs:
        raise ReportError(f"{path} holds no scored items: evaluate the run again (python -m "
                          "prefixlm.evaluate) or pass --step with a complete evaluation")
    out = {}
    for task, by_doc in docs.items():
        doc_id_N = np.array(sorted(by_doc), dtype=np.int64)
        values_NxF = np.array([by_doc[d] for d in doc_id_N], dtype=np.float64)
        out[task] = Items(doc_id_N, *values_NxF.T)
    return out


def choose_step(runs: list[Run], step: int | None) -> int:
    """The last evaluation step every run has, or ``step`` when every run has it."""
    if step is not None:
        for run in runs:
            if step not in run.eval_files:
                raise ReportError(f"{run.path / 'eval'} has no step_{step:08d}.jsonl "
                                  f"(it has steps {sorted(run.eval_files)})")
        return step
    common = functools.reduce(set.intersection, (set(r.eval_files) for r in runs))
    if not common:
        raise ReportError("no evaluation step is common to all runs: " + "; ".join(
            f"{r.path}: {sorted(r.eval_files)}" for r in runs) + "; pass fewer runs or --step")
    return max(common)


def seed_pairs(arm_runs: list[Run], base_runs: list[Run]) -> list[tuple[Run, Run]]:
    """Seed i with baseline seed i; by rank when the two arms share no seed."""
    base = {r.seed_label: r for r in base_runs}
    pairs = [(r, base[r.seed_label]) for r in arm_runs if r.seed_label in base]
    return pairs or list(zip(arm_runs, base_runs, strict=False))


def aligned_items(pairs, items, task) -> list[tuple[Items, Items]] | None:
    """Each seed pair's (arm, baseline) Items of ``task`` on the documents every run of the
    pairs scored (so each pair's mean is over the same items); None if a run lacks the task."""
    if not all(task in items[a.path] and task in items[b.path] for a, b in pairs):
        return None
    doc_id_M = functools.reduce(np.intersect1d, [items[r.path][task].doc_id_N
                                                 for pair in pairs for r in pair])
    return [(items[a.path][task].take(doc_id_M), items[b.path][task].take(doc_id_M))
            for a, b in pairs]


def check_common_items(pairs, items, step: int) -> None:
    """ReportError naming both runs when a seed pair shares a task but no scored document of
    it: a paired comparison over no items is no comparison."""
    for a, b in pairs:
        for task in sorted(set(items[a.path]) & set(items[b.path])):
            if not len(np.intersect1d(items[a.path][task].doc_id_N,
                                      items[b.path][task].doc_id_N)):
                raise ReportError(
                    f"{a.path} and {b.path} have no {task} item in common at step {step}: "
                    "evaluate both on the same documents (the same eval.limits, or python -m "
                    "prefixlm.evaluate on both)")
