"""Synthetic studies with a known truth, to measure how often the report claims an effect.

A simulated study has a baseline arm and one other arm, S seeds each, T tasks of N items. Each
item has a fixed difficulty and a typical bits per byte shared by every run (the same evaluation
items in every run, as in the real study); each run adds a **seed-level shift** to its accuracy
and its bpb on every task (half of the variance shared by the run's tasks, half per task: one
init moves all tasks a little together) and item-level noise to bpb; val/nll gets a per-run
shift. The arm may carry a true CharBench bpb gain. Only numpy is imported, so
``bench/report_claims.py`` can load this file beside any version of the report.

``pair_means`` gives the per-seed-pair paired means of the report's default primary endpoints
(mean CharBench bpb, mean accuracy over the four multiple-choice tasks, final val/nll) for many
studies at once; ``write_study`` writes one study in the run-directory format
(config.json, metrics.jsonl, eval/step_*.jsonl) for the report's file path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

TASKS = ("arc_easy_local", "hellaswag_local", "piqa_local", "winogrande_local",
         "charbench_local_count_character_frequency", "charbench_local_count_unique_chars",
         "charbench_local_find_first_occurrence", "charbench_local_find_last_occurrence")
N_CHOICES = (4, 4, 2, 2, 4, 4, 4, 4)
MC = np.array([not t.startswith("charbench") for t in TASKS])
STEP = 200


@dataclasses.dataclass(frozen=True)
class Design:
    seeds: int = 3
    items: int = 1000
    seed_sd_bpb: float = 0.005  # sd of a run's bpb shift on one task
    seed_sd_acc: float = 0.015  # sd of a run's accuracy shift on one task (1.5 points)
    seed_sd_nll: float = 0.005  # sd of a run's final val/nll
    item_sd_bpb: float = 0.1  # per-run, per-item bpb noise
    charbench_bpb_gain: float = 0.0  # the arm's true bpb reduction on every CharBench task


@dataclasses.dataclass
class Studies:
    """R studies: correct_RxAxSxTxN (bool), bpb_RxAxSxTxN, val_nll_RxAxS; arm 0 = baseline."""
    correct: np.ndarray
    bpb: np.ndarray
    val_nll: np.ndarray


def _shift(rng, shape, sd) -> np.ndarray:
    """[R, A, S, T]: half the variance shared by a run's tasks, half per task."""
    run = rng.standard_normal(shape[:3] + (1,))
    task = rng.standard_normal(shape)
    return sd * math.sqrt(0.5) * (run + task)


def simulate(design: Design, studies: int, rng: np.random.Generator) -> Studies:
    r, s, t, n = studies, design.seeds, len(TASKS), design.items
    p_item = rng.beta(0.8, 0.8, size=(r, 1, 1, t, n))  # mean 0.5: easy and hard items
    bpb_item = rng.uniform(0.8, 4.0, size=(r, 1, 1, t, n))
    p_run = np.clip(p_item + _shift(rng, (r, 2, s, t), design.seed_sd_acc)[..., None], 0, 1)
    correct = rng.random((r, 2, s, t, n), dtype=np.float32) < p_run
    gain = np.zeros((2, 1, t, 1))
    gain[1, 0, ~MC, 0] = -design.charbench_bpb_gain
    bpb = (bpb_item + _shift(rng, (r, 2, s, t), design.seed_sd_bpb)[..., None] + gain
           + design.item_sd_bpb * rng.standard_normal((r, 2, s, t, n), dtype=np.float32))
    val_nll = 3.0 + design.seed_sd_nll * rng.standard_normal((r, 2, s))
    return Studies(correct, bpb, val_nll)


def pair_means(sim: Studies) -> np.ndarray:
    """d_RxSxK: per seed pair (arm seed i - baseline seed i), the differences of the default
    primaries K = (mean CharBench bpb, mean MC accuracy, val/nll), each task's mean over its
    items, tasks weighted equally, as prefixlm.endpoints computes them."""
    acc_RxAxSxT = sim.correct.mean(-1, dtype=np.float64)
    bpb_RxAxSxT = sim.bpb.mean(-1, dtype=np.float64)
    charbench = bpb_RxAxSxT[..., ~MC].mean(-1)
    mc_acc = acc_RxAxSxT[..., MC].mean(-1)
    per_arm = np.stack([charbench, mc_acc, sim.val_nll], -1)  # [R, A, S, K]
    return per_arm[:, 1] - per_arm[:, 0]


def write_study(root, sim: Studies, study: int, seed: int = 0) -> list[pathlib.Path]:
    """Study ``study`` of ``sim`` as run directories root/{ce,arm}_seedS (config.json,
    metrics.jsonl, eval/step_00000200.jsonl with gold and predicted answers); returns them,
    baseline runs first."""
    root = pathlib.Path(root)
    rng = np.random.default_rng([seed, study])
    n_choices_T = np.array(N_CHOICES)
    gold_TxN = rng.integers(0, 1 << 30, size=(len(TASKS), sim.correct.shape[-1])) \
        % n_choices_T[:, None]
    bytes_TxN = rng.integers(10, 60, size=gold_TxN.shape)
    dirs = []
    for arm, (objective, eps) in enumerate((("ce", 0.0), ("prefix_norm", 0.1))):
        for s in range(sim.correct.shape[2]):
            d = root / f"{objective}_seed{s}"
            (d / "eval").mkdir(parents=True, exist_ok=True)
            config = {"name": f"{objective}_eps{eps}_seed{s}".replace(".", "p"), "seed": s,
                      "data_seed": -1, "objective": {"name": objective, "eps": eps},
                      "model": {"d_model": 64}, "train": {"steps": STEP}}
            (d / "config.json").write_text(json.dumps(config))
            rows = []
            for t, task in enumerate(TASKS):
                correct_N, bpb_N = sim.correct[study, arm, s, t], sim.bpb[study, arm, s, t]
                wrong_N = (gold_TxN[t] + 1 + rng.integers(0, n_choices_T[t] - 1, len(bpb_N))) \
                    % n_choices_T[t]
                pred_N = np.where(correct_N, gold_TxN[t], wrong_N)
                rows += [json.dumps({
                    "task": task, "doc_id": i, "correct": int(correct_N[i]), "correct_norm": None,
                    "gold_logprob": -float(bpb_N[i]) * math.log(2) * int(bytes_TxN[t, i]),
                    "gold_bytes": int(bytes_TxN[t, i]), "n_choices": int(n_choices_T[t]),
                    "gold_index": int(gold_TxN[t, i]), "pred_index": int(pred_N[i])})
                    for i in range(len(bpb_N))]
            (d / "eval" / f"step_{STEP:08d}.jsonl").write_text("\n".join(rows) + "\n")
            metrics = [{"step": STEP, "loss": 3.0, "nll": 3.0,
                        "val/nll": float(sim.val_nll[study, arm, s])}]
            (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
            dirs.append(d)
    return dirs
