"""How often the seven-run study's report claims an effect, on simulated studies with a known
truth (prefixlm/study/sim.py ``simulate_means``: 6 arms against CE, the default primaries
CharBench bpb / MC accuracy / val/nll, in-loop item counts 4 x 1,000 MC and 4 x 250 CharBench,
seed-level shifts of accuracy sd 1.5 points, val/nll sd 0.005, bpb sd as in the scenario).
Prints a markdown table, one row per (seed sd, method):

    python bench/report_claims.py [--studies 4000] [--seeds 4,5]

- **before**: the report as it was (Holm within each arm over its 3 primaries, 3 seeds, no
  floor on the seed-level variance), reimplemented here so it stays runnable;
- **after**: ``prefixlm.study.endpoints.claims``, Holm over all 18 arm x endpoint tests with the
  variance floored at item sampling, at 3 seeds and at each of ``--seeds`` (the README's
  count is 5).

Columns: the share of null reports (no true effect anywhere) that write any "improves" or
"worsens"; the share of reports that find ("improves") a true 0.04 and a true 0.02 bpb
CharBench gain in one arm (the other five arms null).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from prefixlm.study import endpoints, seed_stats, sim


def before_claims(d_RxAxSxK, lower_is_better, alpha: float = seed_stats.ALPHA) -> np.ndarray:
    """int8 [R, A, K]: the decisions of the report before issue 20: a t-test per (arm,
    endpoint) over the seed pairs without a variance floor, Holm within each arm only."""
    d_RxAxKxS = np.moveaxis(np.asarray(d_RxAxSxK, dtype=np.float64), 2, -1)
    mean, _, p = seed_stats.t_tests(d_RxAxKxS)
    r, a, k = p.shape
    rejected = seed_stats.holm_rows(p.reshape(r * a, k), alpha).reshape(r, a, k)
    good = (mean < 0) == np.asarray(lower_is_better)
    return np.where(rejected, np.where(good, 1, -1), 0).astype(np.int8)


def rates(method, seeds: int, sd: float, studies: int) -> tuple[float, float, float]:
    """(null reports with any claim, 0.04 gain found, 0.02 gain found)."""
    out = []
    for gain in (0.0, 0.04, 0.02):
        design = sim.StudyDesign(seeds=seeds, seed_sd_bpb=sd, charbench_bpb_gain=gain)
        d, item_var = sim.simulate_means(design, studies, np.random.default_rng(2026))
        c_RxAxK = method(d, sim.LOWER_IS_BETTER, item_var)
        out.append((c_RxAxK != 0).any((1, 2)).mean() if gain == 0 else
                   (c_RxAxK[:, 0, 0] == 1).mean())
    return tuple(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=4000)
    parser.add_argument("--seeds", default="4,5", help="seed counts for 'after' besides 3 "
                        "(the README recommends 5)")
    args = parser.parse_args()
    methods = (("before: Holm per arm (3 primaries)", 3,
                lambda d, lib, v: before_claims(d, lib)),
               *(("after: Holm over 18, variance floor", seeds, endpoints.claims)
                 for seeds in (3, *map(int, args.seeds.split(",")))))
    print(f"{args.studies:,} simulated seven-run studies per cell (6 arms vs CE, 3 primary "
          "endpoints)\n")
    print("| bpb seed sd | report | seeds | null reports with any claim | 0.04 bpb gain found "
          "| 0.02 bpb gain found |")
    print("|---|---|---|---|---|---|")
    for sd in (0.005, 0.01, 0.02):
        for name, seeds, method in methods:
            start = time.time()
            null, big, small = rates(method, seeds, sd, args.studies)
            print(f"| {sd} | {name} | {seeds} | {null:.1%} | {big:.1%} | {small:.1%} |"
                  f"  <!-- {time.time() - start:.1f} s -->", flush=True)


if __name__ == "__main__":
    main()
