"""How often the study report's sentence claims an effect, on simulated studies with a known
truth (prefixlm/study_sim.py: 3 seeds per arm, 8 tasks of 1,000 items, seed-level shifts of
bpb sd 0.005 and accuracy sd 1.5 points). Prints a markdown table:

    python bench/report_claims.py [--repo DIR] [--studies 400] [--resamples 500]

``--repo`` measures another checkout's report (e.g. the code before seed-level inference); its
old API (``report.compare_arm`` + ``report.conclusion``, an item-level bootstrap) is driven study
by study, the new one (``endpoints.claims``) for all studies at once. A study counts as a claim
when the arm's sentence under "What the evidence supports" writes improves or worsens.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parents[1]


def load_sim():
    """This checkout's simulator, loaded by path (numpy only), whichever prefixlm is imported."""
    spec = importlib.util.spec_from_file_location("study_sim", HERE / "prefixlm/study_sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_sim"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def old_claims(report, paired, sim, study_sim, resamples: int):
    """(bool [R], bool [R]): the old report's sentence claims something / claims a CharBench bpb
    gain (compare_arm per task, then conclusion)."""
    s = sim.correct.shape[2]
    runs = [[report.Run(pathlib.Path(f"/sim/{a}{k}"), {"seed": k}, [], {}) for k in range(s)]
            for a in range(2)]
    pairs = list(zip(runs[1], runs[0], strict=True))
    out = []
    for r in range(sim.correct.shape[0]):
        items = {}
        for a in range(2):
            for k in range(s):
                items[runs[a][k].path] = {task: paired.Items(
                    np.arange(sim.correct.shape[-1]), sim.correct[r, a, k, t].astype(float),
                    np.full(sim.correct.shape[-1], np.nan), sim.bpb[r, a, k, t].astype(float))
                    for t, task in enumerate(study_sim.TASKS)}
        heads = {task: report.compare_arm(pairs, items, task, resamples, 0)[0]
                 for task in study_sim.TASKS}
        sentence = report.conclusion("arm", "base", heads, s)
        out.append(("improves" in sentence or "worsens" in sentence,
                    "improves charbench" in sentence and "bits/byte" in sentence))
    return tuple(np.array(x) for x in zip(*out, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(HERE), help="checkout whose prefixlm to measure")
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=500, help="old API's bootstrap")
    args = parser.parse_args()
    study_sim = load_sim()
    sys.path.insert(0, args.repo)
    from prefixlm import paired, report

    print(f"code: {pathlib.Path(report.__file__).parent}\n")
    print("| scenario | studies | sentence claims an effect | CharBench bpb claimed better |")
    print("|---|---|---|---|")
    for name, gain in (("no true effect", 0.0), ("CharBench bpb gain 0.04", 0.04)):
        rng, start = np.random.default_rng(2026), time.time()
        sim = study_sim.simulate(study_sim.Design(charbench_bpb_gain=gain), args.studies, rng)
        if hasattr(report, "compare_arm"):
            claimed, better = old_claims(report, paired, sim, study_sim, args.resamples)
        else:
            from prefixlm import endpoints
            c_RxK = endpoints.claims(study_sim.pair_means(sim), [True, False, True])
            claimed, better = (c_RxK != 0).any(1), c_RxK[:, 0] == 1
        print(f"| {name} | {args.studies} | {claimed.mean():.1%} | {better.mean():.1%} |"
              f"  <!-- {time.time() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
