"""Synthetic studies with a known truth, to measure how often the report claims an effect.

Two simulators, numpy only (so ``bench/report_claims.py`` can load this file beside any version
of the report):

- ``simulate`` draws every item: a baseline arm and ``arms - 1`` others, S seeds each, T tasks
  of N items. Each item has a fixed difficulty and a typical bits per byte shared by every run
  (the same evaluation items in every run, as in the real study); each run adds a **seed-level
  shift** to its accuracy and its bpb on every task (half of the variance shared by the run's
  tasks, half per task: one init moves all tasks a little together) and item-level noise to
  bpb; val/nll gets a per-run shift. The last arm may carry a true CharBench bpb gain.
  ``pair_means`` turns it into what the report tests; ``write_study`` writes one study in the
  run-directory format (config.json, metrics.jsonl, eval/step_*.jsonl) for the report's file
  path.
- ``simulate_means`` draws the seven-run study at the level of task means (a mean over N items
  of independent per-run item noise is normal with variance item variance / N), so thousands of
  studies of 7 arms cost a few MB and a second: the error rates of the whole report.
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
    arms: int = 2  # the baseline included
    seeds: int = 3
    items: int = 1000
    seed_sd_bpb: float = 0.005  # sd of a run's bpb shift on one task
    seed_sd_acc: float = 0.015  # sd of a run's accuracy shift on one task (1.5 points)
    seed_sd_nll: float = 0.005  # sd of a run's final val/nll
    item_sd_bpb: float = 0.1  # per-run, per-item bpb noise
    charbench_bpb_gain: float = 0.0  # the last arm's true bpb reduction on every CharBench task


@dataclasses.dataclass(frozen=True)
class StudyDesign:
    """The seven-run study: 6 arms against a baseline, the in-loop item counts (eval.limits:
    1,000 per multiple-choice task, 4 CharBench subtasks of 250)."""
    arms: int = 6  # besides the baseline
    seeds: int = 4
    mc_items: int = 1000
    charbench_items: int = 250
    seed_sd_bpb: float = 0.005
    seed_sd_acc: float = 0.015
    seed_sd_nll: float = 0.005
    item_sd_bpb: float = 0.1
    acc_item_var: float = 0.64 / (1.6 * 2.6)  # E p(1 - p) for item difficulty p ~ Beta(.8, .8)
    charbench_bpb_gain: float = 0.0  # arm 1's true bpb reduction on every CharBench task


LOWER_IS_BETTER = (True, False, True)  # the default primaries: CharBench bpb, MC acc, val/nll


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
    r, a, s, t, n = studies, design.arms, design.seeds, len(TASKS), design.items
    p_item = rng.beta(0.8, 0.8, size=(r, 1, 1, t, n))  # mean 0.5: easy and hard items
    bpb_item = rng.uniform(0.8, 4.0, size=(r, 1, 1, t, n))
    p_run = np.clip(p_item + _shift(rng, (r, a, s, t), design.seed_sd_acc)[..., None], 0, 1)
    correct = rng.random((r, a, s, t, n), dtype=np.float32) < p_run
    gain = np.zeros((a, 1, t, 1))
    gain[-1, 0, ~MC, 0] = -design.charbench_bpb_gain
    bpb = (bpb_item + _shift(rng, (r, a, s, t), design.seed_sd_bpb)[..., None] + gain
           + design.item_sd_bpb * rng.standard_normal((r, a, s, t, n), dtype=np.float32))
    val_nll = 3.0 + design.seed_sd_nll * rng.standard_normal((r, a, s))
    return Studies(correct, bpb, val_nll)


def pair_means(sim: Studies) -> tuple[np.ndarray, np.ndarray]:
    """(d_RxAxSxK, item_var_RxAxK): per seed pair (arm seed i - baseline seed i) of each of
    the A = arms - 1 arms, the differences of the default primaries K = (mean CharBench bpb,
    mean MC accuracy, val/nll), each task's mean over its items, tasks weighted equally; and the
    item-sampling variance of one pair mean (mean over the pairs; nan for val/nll), as
    prefixlm.study.endpoints computes them."""
    acc_RxAxSxT = sim.correct.mean(-1, dtype=np.float64)
    bpb_RxAxSxT = sim.bpb.mean(-1, dtype=np.float64)
    charbench = bpb_RxAxSxT[..., ~MC].mean(-1)
    mc_acc = acc_RxAxSxT[..., MC].mean(-1)
    per_arm = np.stack([charbench, mc_acc, sim.val_nll], -1)  # [R, A, S, K]
    n = sim.bpb.shape[-1]

    def item_var(x, tasks):  # [R, A-1]: mean over pairs of sum_t var(diff_t) / n / T^2
        x = x[..., tasks, :].astype(np.float32)
        diff = (x[:, 1:] - x[:, :1]).astype(np.float64)
        return (diff.var(-1, ddof=1) / n).sum(-1).mean(-1) / tasks.sum() ** 2

    var_RxAxK = np.stack([item_var(sim.bpb, ~MC), item_var(sim.correct, MC),
                          np.full(per_arm.shape[:2], np.nan)[:, 1:]], -1)
    return per_arm[:, 1:] - per_arm[:, :1], var_RxAxK


def simulate_means(design: StudyDesign, studies: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(d_RxAxSxK, item_var_RxAxK) of ``studies`` seven-run studies, as ``pair_means`` gives
    them, drawn from task means: each run's task mean is its seed-level shift (as in
    ``simulate``) plus item noise of variance (item variance / items); the item parts every run
    shares cancel in the pair differences and are left out."""
    r, a, s, t = studies, design.arms + 1, design.seeds, len(TASKS)
    n_T = np.where(MC, design.mc_items, design.charbench_items)
    gain = np.zeros((a, 1, t))
    gain[1, 0, ~MC] = -design.charbench_bpb_gain
    bpb = (_shift(rng, (r, a, s, t), design.seed_sd_bpb) + gain
           + design.item_sd_bpb / np.sqrt(n_T) * rng.standard_normal((r, a, s, t)))
    acc = (_shift(rng, (r, a, s, t), design.seed_sd_acc)
           + np.sqrt(design.acc_item_var / n_T) * rng.standard_normal((r, a, s, t)))
    val_nll = 3.0 + design.seed_sd_nll * rng.standard_normal((r, a, s))
    per_arm = np.stack([bpb[..., ~MC].mean(-1), acc[..., MC].mean(-1), val_nll], -1)
    var_K = np.array([(2 * design.item_sd_bpb**2 / n_T[~MC]).sum() / (~MC).sum() ** 2,
                      (2 * design.acc_item_var / n_T[MC]).sum() / MC.sum() ** 2, np.nan])
    return per_arm[:, 1:] - per_arm[:, :1], np.broadcast_to(var_K, (r, a - 1, 3))


ARMS = (("ce", 0.0), ("prefix_norm", 0.1))  # write_study's arms, the baseline first


def write_study(root, sim: Studies, study: int, seed: int = 0, arms=ARMS,
                suffix: str = "") -> list[pathlib.Path]:
    """Study ``study`` of ``sim`` as run directories root/{objective}[_eps]{suffix}_seedS
    (config.json, metrics.jsonl, eval/step_00000200.jsonl with gold and predicted answers), one
    arm per (objective, eps) of ``arms``; returns them, baseline runs first."""
    root = pathlib.Path(root)
    rng = np.random.default_rng([seed, study])
    n_choices_T = np.array(N_CHOICES)
    gold_TxN = rng.integers(0, 1 << 30, size=(len(TASKS), sim.correct.shape[-1])) \
        % n_choices_T[:, None]
    bytes_TxN = rng.integers(10, 60, size=gold_TxN.shape)
    dirs = []
    for arm, (objective, eps) in enumerate(arms):
        for s in range(sim.correct.shape[2]):
            name = f"{objective}_eps{eps}{suffix}".replace(".", "p") if arm else \
                f"{objective}{suffix}"
            d = root / f"{name}_seed{s}"
            (d / "eval").mkdir(parents=True, exist_ok=True)
            config = {"name": f"{name}_seed{s}", "seed": s,
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


# A demo-scale study of three arms, 3 seeds each, with spreads set to those the real 100-step
# demo runs of 2026-12-01 showed (README: a CharBench bpb pair-mean sd of ~0.2 and a gain of
# ~1.0 bpb for prefix_norm, piqa pair means scattering by ~10 points on 20 items, val/nll pair
# means by ~0.05): synthetic, to show the report's sections without training nine runs.
DEMO = Design(arms=3, seeds=3, items=20, seed_sd_bpb=0.2, seed_sd_acc=0.02, seed_sd_nll=0.035,
              item_sd_bpb=0.3, charbench_bpb_gain=1.0)
DEMO_ARMS = (("ce", 0.0), ("label_smoothing", 0.1), ("prefix_norm", 0.1))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m prefixlm.study.sim",
        description="Write a SYNTHETIC demo-scale study (ce, label_smoothing, prefix_norm; 3 "
        "seeds; 20 items per task; DEMO's spreads) as run directories under OUTPUT.")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    sim = simulate(DEMO, 1, np.random.default_rng(args.seed))
    for d in write_study(args.output, sim, 0, args.seed, DEMO_ARMS, suffix="_demo"):
        print(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
