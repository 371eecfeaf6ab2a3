"""Task definitions: the CharBench-format generator, the offline data, and every task end to end."""

import collections
import re

import pytest

from prefixlm import tasks
from prefixlm.tasks import charbench_local, olmo_data

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


def test_resolve(capsys):
    assert tasks.resolve("piqa,charbench", offline=False) == ["piqa", "charbench"]
    assert tasks.resolve(["piqa", "charbench", "lambada"], offline=True) == [
        "piqa_local", "charbench_local", "lambada"]
    assert "offline twins" in capsys.readouterr().err
    assert tasks.resolve(["piqa_local"]) == ["piqa_local"]  # no hub probe needed


def test_every_task_runs_offline(tiny_lm):
    """All five offline tasks through lm_eval.simple_evaluate on a tiny random model."""
    from prefixlm import evaluate

    run = evaluate.run_lm_eval(tiny_lm, tasks=list(tasks.STANDARD), limit=3, num_fewshot=2,
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
    from prefixlm.model import Llama, ModelConfig

    cfg = ModelConfig(vocab_size=128256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      d_ff=32, max_seq_len=256, dtype="float32")
    return JaxLM(Llama(cfg, rngs=nnx.Rngs(0)), llama3, batch_size=8)
