"""Evaluate a prefixlm checkpoint with lm-eval, through JaxLM (no export needed).

    python -m prefixlm.evaluate --workdir DIR --tasks piqa,winogrande,arc_easy,hellaswag,charbench \\
        --limits piqa=500,hellaswag=500 --num_fewshot 5 --output DIR/eval.json

The flags are parsed here; the work is ``prefixlm.evaluation.harness.run_lm_eval``.
"""

from __future__ import annotations

import json
import pathlib
import sys

from prefixlm.core import cli
from prefixlm.evaluation import tasks as tasks_lib
from prefixlm.evaluation.harness import run_lm_eval
from prefixlm.evaluation.jaxlm import JaxLM
from prefixlm.evaluation.results import format_table, parse_limits


@cli.command
def main(argv=None) -> int:
    p = cli.ArgumentParser(
        prog="python -m prefixlm.evaluate", verbose_help="show lm-eval's logging and the "
        "traceback of an error",
        description=(
            "Evaluate a prefixlm checkpoint with lm-eval through JaxLM (no export needed). Task "
            "names: piqa, winogrande, arc_easy, hellaswag, charbench (lm-eval built-ins / the hub "
            "when reachable; otherwise their offline twins <name>_local, announced on stderr), "
            "or any lm-eval task name. Writes the metrics, resolved task names and lm-eval's "
            "results to --output as JSON and prints a table with standard errors, bits per byte "
            "of the gold answer and, for CharBench, the majority-answer baseline."
        ),
    )
    p.add_argument("--workdir", required=True, help="training directory holding checkpoints/")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--tasks", default=",".join(tasks_lib.STANDARD),
                   help="comma-separated task names (default: %(default)s)")
    p.add_argument("--limit", default=None,
                   type=cli.int_at_least(1, "documents per task; leave --limit out for all"),
                   help="documents per task, a positive integer (default: all): the same "
                        "label-stratified subset the in-loop evaluation scores")
    p.add_argument("--limits", default=None,
                   help="per-task documents overriding --limit, e.g. piqa=500,charbench=200")
    p.add_argument("--num_fewshot", type=cli.int_at_least(0, "few-shot examples"), default=5,
                   help="few-shot examples (default 5)")
    p.add_argument("--batch_size", type=cli.int_at_least(1, "rows per compiled call"),
                   default=16, help="rows per compiled call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="activation dtype for evaluation (float32 matches the HF export)")
    p.add_argument("--offline", action="store_true",
                   help="use the *_local twins without probing the hub")
    p.add_argument("--output", default=None, help="results JSON (default: print only)")
    p.add_argument("--items", default=None,
                   help="per-document JSONL (task, doc_id, correct, correct_norm, gold_logprob, "
                        "gold_bytes, n_choices)")
    args = p.parse_args(argv)
    try:
        limits = parse_limits(args.limits)
        tasks_lib.validate(args.tasks)  # before the (slow) restore
    except ValueError as e:
        p.error(str(e))
    lm = JaxLM.from_workdir(args.workdir, step=args.step, batch_size=args.batch_size,
                            dtype=args.dtype)
    run = run_lm_eval(lm, tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                      offline=True if args.offline else None, verbose=cli.verbose(args),
                      limits=limits)
    print(f"step {getattr(lm, 'step', None)} of {args.workdir}: {','.join(run['tasks'])}, "
          f"limit {args.limit}{' ' + args.limits if args.limits else ''}, "
          f"{args.num_fewshot}-shot, {run['seconds']:.0f} s "
          f"({run['request_seconds']:.0f} s building requests)")
    print(format_table(run["metrics"]))
    if args.items:
        items = pathlib.Path(args.items)
        items.parent.mkdir(parents=True, exist_ok=True)
        items.write_text("".join(json.dumps(r) + "\n" for r in run["items"]))
        print(f"wrote {items}")
    if args.output:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        res = run["results"]
        payload = {
            "workdir": str(args.workdir), "step": getattr(lm, "step", None),
            "tasks": run["tasks"], "limit": args.limit, "limits": limits,
            "num_fewshot": args.num_fewshot, "seconds": run["seconds"],
            "metrics": run["metrics"],
            "lm_eval": {k: res.get(k) for k in ("results", "groups", "group_subtasks",
                                                "configs", "versions", "n-shot", "n-samples")},
        }
        out.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

