"""The study report: every arm against a baseline arm, paired over the same evaluation items.

    python -m prefixlm.report RUN_DIR... --baseline RUN_DIR --output OUT [--step N]
        [--primary charbench/bpb,mc/acc,val/nll]
    python -m prefixlm.report PILOT_RUN_DIR... [--baseline RUN_DIR] --plan charbench/bpb=0.04
        [--plan_arms 6]

writes ``OUT/REPORT.md``, ``OUT/forest.png`` (paired differences with 95% intervals, arms x
tasks) and ``OUT/curves_acc.png`` / ``OUT/curves_bpb.png`` (task metrics over training), each
atomically. Runs whose configs differ only in ``seed``/``data_seed`` are seeds of one arm
(prefixlm.study.runs); seeds are the unit of replication, and one (arm, seed) is one run. With two or
more seed pairs every interval and test is a t-interval over the per-seed-pair paired means
(prefixlm.study.seed_stats says why), and only the declared primary endpoints, Holm-corrected over
every arm x endpoint of the report, may be called an effect (prefixlm.study.endpoints). Every primary
value comes from the evaluation step the report names. With one seed pair the intervals are
item-level (prefixlm.study.item_stats) and the report claims nothing: run-to-run variance is then
unmeasured. "What this study could detect" sizes a null verdict (prefixlm.study.detectable).

--plan reads a pilot instead (two or more seeds per arm, or the baseline's seeds alone) and
prints the seeds per arm that each stated effect needs (accuracy in points) for 80% power when
the study has --plan_arms arms besides the baseline and the --primary endpoints.
"""

from __future__ import annotations

import argparse
import sys

from prefixlm.core import cli
from prefixlm.study import endpoints, item_stats
from prefixlm.study.report_md import build_report, plan
from prefixlm.study.runs import ReportError


@cli.command
def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m prefixlm.report", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="training run directories (config.json, metrics.jsonl, eval/)")
    parser.add_argument("--baseline", metavar="RUN_DIR",
                        help="a run of the baseline arm (also among RUN_DIR); all seeds of its "
                        "arm are the baseline (required for a report)")
    parser.add_argument("--output", help="directory for REPORT.md and the PNGs (required for "
                        "a report)")
    parser.add_argument("--step", type=int, default=None,
                        help="evaluation step to compare (default: the last common to all runs)")
    parser.add_argument("--primary", default=endpoints.DEFAULT_PRIMARY,
                        help="primary endpoints, GROUP/METRIC or val/KEY, comma-separated "
                        f"(default {endpoints.DEFAULT_PRIMARY}); see prefixlm.study.endpoints")
    parser.add_argument("--resamples", type=int, default=item_stats.RESAMPLES,
                        help="bootstrap resamples for one-seed reports (default 2,000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    parser.add_argument("--plan", metavar="ENDPOINT=EFFECT,...",
                        help="instead of a report: the RUN_DIRs are a pilot (2+ seeds per arm, "
                        "or the baseline's seeds); print the seeds per arm each stated effect "
                        "needs for 80%% power, e.g. charbench/bpb=0.04,mc/acc=2 (points)")
    parser.add_argument("--plan_arms", type=int, default=6,
                        help="arms besides the baseline in the planned study (default 6: the "
                        "seven-run study); the family is arms x primary endpoints")
    args = parser.parse_args(argv)
    # A ReportError, a full disk or a read-only OUT: one line from the boundary (prefixlm.core.cli),
    # and nothing half-written is left behind.
    if args.plan is not None:
        print("\n".join(plan(args.run_dirs, args.baseline, args.plan, args.plan_arms,
                             args.step, args.primary)))
        return 0
    for flag in ("baseline", "output"):
        if getattr(args, flag) is None:
            raise ReportError(f"--{flag} is required for a report (or pass --plan)")
    report = build_report(args.run_dirs, args.baseline, args.output, args.step,
                          args.resamples, args.seed, args.primary)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
