"""charbench_local: an offline CharBench-format set built from wordfreq's English word list.

CharBench (Uzan & Pinter 2025, arXiv 2508.02591; data ``omriuz/CharBench`` on the hub, code
github.com/omriuz/CharBench under MIT) asks four character-level questions about single words.
Its generator (``benchmark/benchmark.py`` in that repository) fixes what this module copies:

* templates, verbatim (``TEMPLATES`` below; the two index tasks end in "\\nStart counting from 0.");
* answers: ``len(set(word))``, ``word.count(c)``, ``word.index(c)``, ``word.rindex(c)`` — the
  index tasks are **0-based** (the question says so), so answers are 0..9 for 4-10 letter words;
  the counts are 1..10. Every answer therefore lies in the 0..10 choice set;
* the queried character is ``random.choice(word)``, i.e. drawn in proportion to its frequency in
  the word (so "count_character_frequency" is mostly 1);
* words of 4..10 characters, the *same number of words per length* (a uniform length
  distribution), each word used by one task only.

What differs, and why the set is named ``charbench_local`` and never reported as CharBench:
the real words are unique ``[a-zA-Z]+`` matches from the first 100k MiniPile documents (case kept,
hence some capitalised words and acronyms); here they are lower-case ``[a-z]+`` words from
``wordfreq.top_n_list("en", 50000)`` (wordfreq 3.1.1, MIT code; its word lists are CC BY-SA 4.0).
The set is small (``--per_length`` words per length per task) and split into ``test`` (scored) and
``train`` (the few-shot pool) with disjoint words; rows are shuffled so ``--limit N`` keeps every
length. It is fully determined by the seed and the wordfreq version.

Usage: ``python -m prefixlm.evaluation.tasks.charbench_local --output DIR`` writes ``DIR/test.jsonl``,
``DIR/train.jsonl`` and ``DIR/info.json`` (sizes, answer histograms, majority baselines). The
lm-eval tasks ``charbench_local_*`` build the same rows in memory (no file needed); set
``PREFIXLM_CHARBENCH_LOCAL=DIR`` to make them read a written set instead.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import random
import re

TASK_TYPES = (
    "count_character_frequency",
    "count_unique_chars",
    "find_first_occurrence",
    "find_last_occurrence",
)
# Verbatim from omriuz/CharBench benchmark/benchmark.py (get_character_reasoning_templates).
TEMPLATES = {
    "count_character_frequency": (
        "How many times does the character '{character}' appear in the string '{word}'?"
    ),
    "count_unique_chars": "How many unique characters appear in the string '{word}'?",
    "find_first_occurrence": (
        "What is the index of the first occurrence of the character '{character}' in the "
        "string '{word}'?\nStart counting from 0."
    ),
    "find_last_occurrence": (
        "What is the index of the last occurrence of the character '{character}' in the "
        "string '{word}'?\nStart counting from 0."
    ),
}
MIN_LEN, MAX_LEN = 4, 10
CHOICES = [str(i) for i in range(11)]  # every CharBench answer for 4-10 letter words is in 0..10
WORDLIST_SIZE = 50_000
DEFAULTS = {"per_length": 100, "fewshot_per_length": 20, "seed": 42}


def answer(task: str, word: str, character: str | None) -> int:
    """The gold answer, exactly as CharBench's generator computes it (0-based indices)."""
    if task == "count_unique_chars":
        return len(set(word))
    if task == "count_character_frequency":
        return word.count(character)
    if task == "find_first_occurrence":
        return word.index(character)
    if task == "find_last_occurrence":
        return word.rindex(character)
    raise ValueError(f"unknown CharBench task {task!r}; expected one of {TASK_TYPES}")


def words_by_length(n_words: int = WORDLIST_SIZE) -> dict[int, list[str]]:
    """Lower-case ASCII words of 4..10 letters from wordfreq, most frequent first, per length."""
    import wordfreq

    buckets: dict[int, list[str]] = {n: [] for n in range(MIN_LEN, MAX_LEN + 1)}
    for w in wordfreq.top_n_list("en", n_words):
        if MIN_LEN <= len(w) <= MAX_LEN and re.fullmatch(r"[a-z]+", w):
            buckets[len(w)].append(w)
    return buckets


def generate(
    per_length: int = DEFAULTS["per_length"],
    fewshot_per_length: int = DEFAULTS["fewshot_per_length"],
    seed: int = DEFAULTS["seed"],
) -> dict[str, list[dict]]:
    """{"test": rows, "train": rows}; a row has CharBench's columns plus ``length``."""
    rng = random.Random(seed)
    need = len(TASK_TYPES) * (per_length + fewshot_per_length)
    splits: dict[str, list[dict]] = {"test": [], "train": []}
    for length, words in words_by_length().items():
        if len(words) < need:
            raise ValueError(
                f"wordfreq has {len(words)} words of length {length}, need {need}; lower "
                "--per_length/--fewshot_per_length"
            )
        words = words[:]
        rng.shuffle(words)
        for t, task in enumerate(TASK_TYPES):
            chunk = words[t * (per_length + fewshot_per_length) :][: per_length + fewshot_per_length]
            for i, word in enumerate(chunk):
                character = None if task == "count_unique_chars" else rng.choice(word)
                row = {
                    "question": TEMPLATES[task].format(word=word, character=character),
                    "answer": str(answer(task, word, character)),
                    "word": word,
                    "character": character,
                    "task": task,
                    "length": length,
                }
                splits["test" if i < per_length else "train"].append(row)
    for rows in splits.values():
        rng.shuffle(rows)  # a --limit prefix then covers every length and task
    return splits


def majority_baseline(answers: list[str] | list[int]) -> tuple[str, float]:
    """(most frequent answer, accuracy of always giving it) over the given gold answers."""
    if not answers:
        return "", float("nan")
    (value, count), = collections.Counter(str(a) for a in answers).most_common(1)
    return value, count / len(answers)


def summary(splits: dict[str, list[dict]]) -> dict:
    """Sizes, answer histograms and majority baselines per task type (written as info.json)."""
    import importlib.metadata

    version = importlib.metadata.version("wordfreq")
    info: dict = {
        "name": "charbench_local",
        "source": f"wordfreq {version} top_n_list('en', {WORDLIST_SIZE})",
        "splits": {k: len(v) for k, v in splits.items()},
        "tasks": {},
    }
    for task in TASK_TYPES:
        golds = [r["answer"] for r in splits["test"] if r["task"] == task]
        value, acc = majority_baseline(golds)
        info["tasks"][task] = {
            "test_rows": len(golds),
            "majority_answer": value,
            "majority_baseline": round(acc, 4),
            "answers": dict(sorted(collections.Counter(golds).items(), key=lambda kv: int(kv[0]))),
        }
    return info


def write(output: str | os.PathLike, **kwargs) -> pathlib.Path:
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate(**kwargs)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    info = summary(splits) | {"settings": DEFAULTS | kwargs}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def dataset(**_):
    """lm-eval ``custom_dataset`` hook: the set from $PREFIXLM_CHARBENCH_LOCAL, else in memory."""
    import datasets

    directory = os.environ.get("PREFIXLM_CHARBENCH_LOCAL")
    if directory:
        files = {s: str(pathlib.Path(directory) / f"{s}.jsonl") for s in ("test", "train")}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"PREFIXLM_CHARBENCH_LOCAL={directory} lacks {missing}; write the set with "
                f"`python -m prefixlm.evaluation.tasks.charbench_local --output {directory}` or unset it"
            )
        return datasets.load_dataset("json", data_files=files)
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in _cached().items()})


_CACHE: dict = {}


def _cached() -> dict[str, list[dict]]:
    if "splits" not in _CACHE:
        _CACHE["splits"] = generate()
    return _CACHE["splits"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m prefixlm.evaluation.tasks.charbench_local",
        description=(
            "Write charbench_local, an offline CharBench-format set (CharBench's four question "
            "templates and uniform 4-10 letter word lengths, words from wordfreq), as "
            "test.jsonl (scored), train.jsonl (few-shot pool) and info.json (majority baselines). "
            "It is NOT the real CharBench; use the task 'charbench' when the hub is reachable."
        ),
    )
    p.add_argument("--output", required=True, help="directory to write (created if missing)")
    p.add_argument("--per_length", type=int, default=DEFAULTS["per_length"],
                   help="test words per length (4..10) per task type (default %(default)s)")
    p.add_argument("--fewshot_per_length", type=int, default=DEFAULTS["fewshot_per_length"],
                   help="few-shot pool words per length per task type (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = p.parse_args(argv)
    out = write(args.output, per_length=args.per_length,
                fewshot_per_length=args.fewshot_per_length, seed=args.seed)
    info = json.loads((out / "info.json").read_text())
    print(f"wrote {out}: {info['splits']}")
    for task, t in info["tasks"].items():
        print(f"  {task:28s} {t['test_rows']:5d} rows  majority answer {t['majority_answer']:>2s}"
              f"  baseline {t['majority_baseline']:.3f}")


if __name__ == "__main__":
    main()
