"""The inputs of the study report: run directories, arms of seeds, and per-item results.

A run directory holds ``config.json``, ``metrics.jsonl`` and ``eval/step_XXXXXXXX.jsonl`` (one
JSON row per scored document, prefixlm.eval_results.item_rows). Runs whose configs differ only in
``seed``/``data_seed`` are the seeds of one arm; seed i of an arm is paired with seed i of the
baseline (by rank when they share no seed). A directory named twice, by any path, counts once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re

import numpy as np

from prefixlm import plots, schemas, workdir
from prefixlm.errors import UserError
from prefixlm.paired import Items

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
    return Run(path, config, plots.load_metrics(path) if has_metrics else [], files)


def arm_label(config: dict) -> str:
    """The run name without its seed part: prefix_norm_eps0p1_seed0 -> prefix_norm_eps0p1."""
    name = config.get("name") or "{name}_eps{eps}".format(**config.get("objective", {}))
    return re.sub(r"_(seed|data)\d+", "", name)


def group_arms(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by identity (workdir.identity: the fields that change results) less the
    seeds; each arm's runs sorted by seed. Labels repeat only for arms that differ elsewhere
    (say in train.steps), which then carry their first run's directory name."""
    by_identity: dict[str, list[Run]] = {}
    for run in runs:
        ident = {k: v for k, v in workdir.identity(run.config).items() if k not in SEED_FIELDS}
        by_identity.setdefault(json.dumps(ident, sort_keys=True), []).append(run)
    arms = {}
    for members in by_identity.values():
        label = arm_label(members[0].config)
        if label in arms:
            label = f"{label} [{members[0].path.name}]"
        members.sort(key=lambda r: (r.config.get("seed", 0), r.seed_label))
        for run in members:
            run.arm = label
        arms[label] = members
    return arms


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
