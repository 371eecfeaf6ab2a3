"""One prompt per document: few-shot examples drawn from a generator seeded per document.

lm-eval 0.4.13's sampler holds one ``random.Random`` for a whole task and draws from it document
after document, so a document's examples depend on every document rendered before it. The
in-loop evaluation scores a fixed subset and the final evaluation the full set, so the same
document was shown different examples at the last point of every curve (999 of 1,000 piqa
documents). Here each document's examples are drawn from ``Random(sha256(task, doc_id, seed))``:
they depend on the task, the document's index in the scored split and the few-shot seed, never
on which other documents are rendered.

:func:`per_document_fewshot` installs this on one loaded lm-eval task (what
``prefixlm.evaluation.harness.TaskSet`` does for every task it builds); lm-eval's own ``build_all_requests``
and ``fewshot_context`` still render every prompt.

Exclusions, checked against each document:
- the document itself, when examples come from the scored split (lm-eval passes the scored
  document only when ``fewshot_split == test_split``; equal rows count as the document, as in
  lm-eval);
- winogrande: the scored item's twin, the other sentence of its pair (same text before the blank,
  the other option filled in). Showing it with its answer gives the scored item's answer away.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence

SEED_SALT = "prefixlm-fewshot-v1"


def document_seed(task: str, doc_id: int | str, seed: int | None) -> int:
    """The generator seed of one document's examples: stable across processes and Python hash
    seeds (sha256, not ``hash``)."""
    digest = hashlib.sha256(f"{SEED_SALT}/{task}/{doc_id}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def winogrande_twin_key(doc: dict) -> str:
    """Winogrande pairs share the sentence up to the blank and flip the answer with one word after
    it; the text before ``_`` identifies the pair."""
    return doc["sentence"].split("_", 1)[0].strip()


# Tasks (by name, or name prefix before "_") whose items have twins that must never be a shot.
TWIN_KEYS: dict[str, Callable[[dict], str]] = {"winogrande": winogrande_twin_key}


def twin_key_for(task_name: str) -> Callable[[dict], str] | None:
    for name, key in TWIN_KEYS.items():
        if task_name == name or task_name.startswith(name + "_"):
            return key
    return None


def document_key(doc) -> str:
    """A document's content as text: how a rendered document is mapped back to its index."""
    return json.dumps(doc, sort_keys=True, default=str)


class PerDocumentSampler:
    """A stand-in for lm-eval's ``ContextSampler`` (``sample(n, eval_doc=...)``) whose generator
    is reset for each document by :meth:`start`.

    Draws ``n`` + a little headroom without replacement, drops excluded documents and keeps the
    first ``n``; if exclusions leave fewer than ``n`` (rare), draws again from the pool with every
    excluded document removed. ``twins_excluded`` counts prompts that would have shown a twin.
    """

    def __init__(self, pool: Sequence[dict], *, task: str, seed: int | None,
                 twin_key: Callable[[dict], str] | None = None):
        self.pool = list(pool)
        self.task = task
        self.seed = seed
        self.twin_key = twin_key
        self._pool_keys = [twin_key(d) for d in self.pool] if twin_key else None
        self.rnd = random.Random(seed)
        self.doc: dict | None = None
        self.twins_excluded = 0

    def start(self, doc_id: int | str, doc: dict) -> None:
        self.rnd = random.Random(document_seed(self.task, doc_id, self.seed))
        self.doc = doc

    def set_rnd(self, seed):  # lm-eval's set_fewshot_seed calls this; the seed is per document
        self.seed = seed
        return self

    def fewshot_docs(self) -> list[dict]:
        return self.pool

    def _allowed(self, i: int, eval_doc, twin) -> bool:
        if eval_doc is not None and self.pool[i] == eval_doc:
            return False
        return twin is None or self._pool_keys[i] != twin

    def sample(self, n: int, eval_doc=None, df=None, **_) -> list[dict]:
        if n <= 0:
            return []
        twin = self.twin_key(self.doc) if self.twin_key and self.doc is not None else None
        drawn = self.rnd.sample(range(len(self.pool)), min(len(self.pool), n + 4))
        chosen, skipped_twin = [], False
        for i in drawn:
            if len(chosen) == n:
                break
            if self._allowed(i, eval_doc, twin):
                chosen.append(i)
            elif eval_doc is None or self.pool[i] != eval_doc:
                skipped_twin = True
        if len(chosen) < n:
            rest = [i for i in range(len(self.pool)) if self._allowed(i, eval_doc, twin)]
            if len(rest) < n:
                raise ValueError(f"{self.task}: {n} few-shot examples asked, {len(rest)} "
                                 "allowed in the pool; lower num_fewshot")
            chosen = self.rnd.sample(rest, n)
        self.twins_excluded += skipped_twin
        return [self.pool[i] for i in chosen]


def per_document_fewshot(task, seed: int | None) -> PerDocumentSampler | None:
    """Makes ``task`` (a loaded lm-eval ``ConfigurableTask``) draw each document's examples from
    its own seeded generator. Returns the sampler (None: the task has no few-shot pool)."""
    if getattr(task, "sampler", None) is None:
        return None
    name = task.config.task
    sampler = PerDocumentSampler(task.sampler.fewshot_docs(), task=name, seed=seed,
                                 twin_key=twin_key_for(name))
    ids: dict[str, int] = {}
    for i, doc in enumerate(task.eval_docs):
        ids.setdefault(document_key(doc), i)  # duplicate rows share the first one's examples
    render = task.fewshot_context

    def fewshot_context(doc, *args, **kwargs):
        key = document_key(doc)  # a document from outside the split is seeded by its content
        sampler.start(ids.get(key, key), doc)
        return render(doc, *args, **kwargs)

    task.sampler = sampler
    task.fewshot_context = fewshot_context
    return sampler
