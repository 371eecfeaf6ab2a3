"""What an evaluation produced, in the forms the run keeps: flat metrics for metrics.jsonl,
one row per scored document (``WORKDIR/eval/step_*.jsonl``, read by ``prefixlm.report``), bits
per byte of the gold continuation, majority baselines, and which documents a limited evaluation
scores (label-stratified fixed subsets, the same at every step and in every run).
"""


from __future__ import annotations

import collections
import hashlib
import math

import numpy as np

from prefixlm.config import ConfigError


# ---- results -------------------------------------------------------------------------------
def majority_baselines(samples: dict[str, list[dict]]) -> dict[str, float]:
    """Accuracy of always answering the most frequent gold choice, per evaluated task."""
    out = {}
    for task, rows in samples.items():
        golds = [r.get("target") for r in rows if isinstance(r.get("target"), int)]
        if golds:
            out[task] = collections.Counter(golds).most_common(1)[0][1] / len(golds)
    return out


def flatten_results(results: dict, with_majority: tuple[str, ...] = ("charbench",)
                    ) -> dict[str, float]:
    """lm-eval's nested results -> {"piqa/acc": .., "piqa/acc_stderr": .., ...} (floats only).

    Tasks whose name starts with one of ``with_majority`` also get ``<task>/majority``, the
    majority-answer baseline over the documents actually scored (groups: size-weighted).
    """
    flat: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if filt not in ("none", ""):
                metric = f"{metric}[{filt}]"
            flat[f"{task}/{metric}"] = float(value)
    majority = majority_baselines(results.get("samples", {}))
    for task, value in majority.items():
        if task.startswith(with_majority):
            flat[f"{task}/majority"] = value
    for group, members in results.get("group_subtasks", {}).items():
        if group.startswith(with_majority) and members:
            sizes = {m: len(results["samples"].get(m, [])) for m in members if m in majority}
            total = sum(sizes.values())
            if total:
                flat[f"{group}/majority"] = sum(majority[m] * n for m, n in sizes.items()) / total
    return flat


def gold_index(task, doc) -> int | None:
    """The gold choice of a multiple-choice document, found as lm-eval's ``process_results``
    finds it (winogrande-style tasks give it through ``doc_to_text``); None when the task is not
    multiple choice or the document has several gold choices."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        choices = task.doc_to_choice(doc)
        return choices.index(gold) if gold in choices else None
    if isinstance(gold, (int, np.integer)) and not isinstance(gold, bool):
        return int(gold)
    return None


def item_rows(results: dict, tasks: dict) -> list[dict]:
    """One row per scored multiple-choice document, in the per-item file format::

        {"task": "piqa_local", "doc_id": 17, "correct": 1, "correct_norm": 0,
         "gold_logprob": -23.1, "gold_bytes": 41, "n_choices": 2, "gold_index": 1,
         "pred_index": 0}

    ``doc_id`` indexes the task's evaluation split (the same id in every run and at every step);
    ``gold_logprob`` is the summed log-probability (nats) of the gold continuation exactly as
    lm-eval scored it, ``gold_bytes`` its UTF-8 length; ``correct_norm`` is null for tasks
    without ``acc_norm``. ``gold_index`` is the gold choice and ``pred_index`` the choice with
    the highest log-likelihood (the one ``correct`` scores; first on ties, as numpy's argmax):
    the report needs both for majority-answer baselines. ``tasks`` maps task names to lm-eval
    task objects (for the gold index). The format is declared once, as ``schemas.EVAL_ROW``,
    which the report checks every line against where it reads the file.
    """
    rows, seen = [], set()
    for name, samples in results.get("samples", {}).items():
        task = tasks.get(name)
        if task is None or task.OUTPUT_TYPE != "multiple_choice":
            continue
        for sample in samples:
            key = (name, int(sample["doc_id"]))
            gold = gold_index(task, sample["doc"])
            if key in seen or gold is None or "acc" not in sample:
                continue  # another filter's copy of a document, or no single gold choice
            seen.add(key)
            loglikelihoods = [float(resp[0]) for resp in sample["filtered_resps"]]
            continuation = sample["arguments"][gold][1]
            rows.append({
                "task": name, "doc_id": key[1], "correct": int(sample["acc"]),
                "correct_norm": int(sample["acc_norm"]) if "acc_norm" in sample else None,
                "gold_logprob": loglikelihoods[gold],
                "gold_bytes": len(continuation.encode("utf-8")),
                "n_choices": len(loglikelihoods), "gold_index": int(gold),
                "pred_index": int(np.argmax(loglikelihoods)),
            })
    return rows


def bpb_metrics(rows: list[dict], group_subtasks: dict | None = None) -> dict[str, float]:
    """Bits per byte of the gold continuation (OLMES's continuous multiple-choice metric).

    Per document ``bpb = -gold_logprob / (ln 2 * gold_bytes)``; ``<task>/bpb`` is the mean over
    documents and ``<task>/bpb_stderr`` its standard error (sample standard deviation over
    sqrt(n); left out for a single document). Unlike accuracy it moves smoothly while a small
    model is still at chance, so in-loop curves show progress early. Groups pool their
    subtasks' documents (so a group is weighted by size, as lm-eval weights its accuracy).
    """
    per_task: dict[str, list[float]] = collections.defaultdict(list)
    for r in rows:
        if r["gold_bytes"] > 0:
            per_task[r["task"]].append(-r["gold_logprob"] / (math.log(2) * r["gold_bytes"]))
    group_subtasks = group_subtasks or {}

    def leaves(name: str, depth: int = 0) -> list[str]:
        if name not in group_subtasks or depth > 8:
            return [name]
        return [leaf for child in group_subtasks[name] for leaf in leaves(child, depth + 1)]

    pooled = dict(per_task)
    for group in group_subtasks:
        values = [v for leaf in leaves(group) for v in per_task.get(leaf, [])]
        if values:
            pooled[group] = values
    out = {}
    for name, values in pooled.items():
        v = np.asarray(values, np.float64)
        out[f"{name}/bpb"] = float(v.mean())
        if len(v) > 1:
            out[f"{name}/bpb_stderr"] = float(v.std(ddof=1) / math.sqrt(len(v)))
    return out


# ---- task sets: requests built once, fixed stratified subsets --------------------------------
SUBSET_SALT = "prefixlm-eval-subset-v1"  # changing it changes every run's subsets


def stratified_subset(labels, limit: int, key: str) -> list[int]:
    """``limit`` document indices out of ``len(labels)``, the same for the same inputs anywhere.

    Stratified by label: each gold label gets its share of ``limit`` (largest remainder), so the
    subset keeps the set's label balance (a 52/48 set is not scored on a 60/40 subset, which
    would move a majority-leaning model's accuracy). Within a label, documents are taken in the
    order of ``sha256(salt/key/index)``: deterministic, no RNG state, independent of Python's
    hash seed, and different per task ``key``. Returned sorted ascending (lm-eval needs that).
    """
    n = len(labels)
    if limit >= n:
        return list(range(n))
    by_label: dict = collections.defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    order = sorted(by_label, key=repr)
    exact = {lab: limit * len(by_label[lab]) / n for lab in order}
    quota = {lab: int(exact[lab]) for lab in order}
    for lab in sorted(order, key=lambda lab: (quota[lab] - exact[lab], repr(lab))):
        if sum(quota.values()) >= limit:
            break
        if quota[lab] < len(by_label[lab]):
            quota[lab] += 1

    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{SUBSET_SALT}/{key}/{i}".encode()).digest()

    chosen = [i for lab in order for i in sorted(by_label[lab], key=rank)[:quota[lab]]]
    return sorted(chosen)


class SortedIndices(list):
    """A sorted list of document indices with O(1) ``in``: lm-eval's ``doc_iterator`` tests
    ``i in samples`` for every document of the split (10k x 500 comparisons for hellaswag)."""

    def __init__(self, indices):
        super().__init__(indices)
        self._set = frozenset(indices)

    def __contains__(self, i) -> bool:
        return i in self._set


def parse_limits(text: str | None) -> dict[str, int]:
    """"piqa=500,hellaswag=500,charbench=200" -> {"piqa": 500, ...}; positive integers only."""
    out = {}
    for item in (s.strip() for s in (text or "").split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not sep or not name.strip() or n <= 0:
            raise ConfigError(f"eval.limits entry {item!r}: expected task=N with N a positive "
                              "integer, e.g. 'piqa=500,hellaswag=500' (leave a task out for all)")
        out[name.strip()] = n
    return out


def check_limit(limit, field: str = "eval.limit") -> int | None:
    """``limit`` as documents per task, None meaning all; rejects 0 and negatives (lm-eval would
    read 0 as "a fraction: none" and a negative as an empty slice) and fractions."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
        raise ConfigError(f"{field}={limit!r}: must be a positive number of documents per task, "
                          "or None for all of them")
    return int(limit)




def format_table(metrics: dict[str, float]) -> str:
    """A markdown table: task | acc | acc_norm | bpb | majority (each with +- stderr)."""
    by_task: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for key, value in metrics.items():
        task, _, metric = key.partition("/")
        if task != "eval":
            by_task[task][metric] = value
    cols = ["acc", "acc_norm", "bpb", "majority"]
    lines = ["| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for task in sorted(by_task):
        m = by_task[task]
        cells = []
        for c in cols:
            if c not in m or (isinstance(m[c], float) and math.isnan(m[c])):
                cells.append("")
            elif f"{c}_stderr" in m and not math.isnan(m[f"{c}_stderr"]):
                cells.append(f"{m[c]:.4f} ± {m[c + '_stderr']:.4f}")
            else:
                cells.append(f"{m[c]:.4f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


