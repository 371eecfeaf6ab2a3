"""JaxLM gives lm-eval's HFLM numbers on the export of the same model; results flatten sanely."""

import collections
import math

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from test_export import random_model

from prefixlm import evaluate
from prefixlm.evaluation import harness, jaxlm
from prefixlm.evaluation import results as results_lib
from prefixlm.export import export_model

LL_REQUESTS = [
    ("Question: What is 2+2?\nAnswer:", " 4"),
    ("The cat sat on", " the mat."),
    ("", "An empty context is conditioned on the prefix token."),
    ("A context longer than the model " * 12, " is cut from the left"),  # > max_seq_len 64
    ("Trailing space moves to the continuation ", "word"),
    ("x", " a continuation" * 6),
    ("Numbers 1234", "5678"),
    # one shared input, several one-token answers (scored in one row), and a request whose
    # input equals theirs but whose continuation is two tokens
    ("Question: How many?\nAnswer:", " 1"),
    ("Question: How many?\nAnswer:", " 2"),
    ("Question: How many?\nAnswer:", " 10"),
    ("Question: How many?", "\nAnswer: 3"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, llama3):
    """(JaxLM, HFLM) over the same tiny random model (64-token context)."""
    from lm_eval.models.huggingface import HFLM

    model = random_model(tie=True, seed=3)
    out = export_model(model, model.cfg, tmp_path_factory.mktemp("hf"))
    jax_lm = jaxlm.JaxLM(model, llama3, batch_size=4)
    hf_lm = HFLM(pretrained=str(out), batch_size=4, device="cpu", dtype="float32")
    assert hf_lm.max_length == jax_lm.max_length == 64
    return jax_lm, hf_lm


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_matches_hflm(pair):
    jax_lm, hf_lm = pair
    reqs = _instances("loglikelihood", LL_REQUESTS)
    ours, theirs = jax_lm.loglikelihood(reqs), hf_lm.loglikelihood(reqs)
    for (a, ga), (b, gb), args in zip(ours, theirs, LL_REQUESTS, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (args, a, b)
        assert ga == gb
    assert all(v < -1.0 for v, _ in ours)  # random weights: nothing is trivially likely
    assert len(jax_lm.compiled_shapes) <= 4  # a few padded shapes, not one per request
    assert any(k > 1 for *_, k in jax_lm.compiled_shapes)  # shared inputs were grouped


def test_rolling_and_greedy_generation_match_hflm(pair):
    jax_lm, hf_lm = pair
    texts = [("Some text to score, long enough to need two windows. " * 4,), ("short",)]
    ours = jax_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    theirs = hf_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    gen = [(p, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False})
           for p in ("Once upon a time", "Q: hi\nA:")]
    assert (jax_lm.generate_until(_instances("generate_until", gen))
            == hf_lm.generate_until(_instances("generate_until", gen)))


def test_flatten_and_table():
    results = {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": 0.6, "acc_stderr,none": 0.01,
                     "acc_norm,none": 0.62, "acc_norm_stderr,none": 0.011},
            "charbench_local": {"acc,none": 0.3, "acc_stderr,none": "N/A"},
            "charbench_local_a": {"acc,none": 0.2, "acc_stderr,none": 0.1},
            "charbench_local_b": {"acc,none": 0.4, "acc_stderr,none": 0.1},
        },
        "group_subtasks": {"charbench_local": ["charbench_local_a", "charbench_local_b"]},
        "samples": {"charbench_local_a": [{"target": 1}, {"target": 1}, {"target": 2}],
                    "charbench_local_b": [{"target": 0}], "piqa": [{"target": 0}]},
    }
    flat = results_lib.flatten_results(results)
    assert flat["piqa/acc"] == 0.6 and flat["piqa/acc_norm_stderr"] == 0.011
    assert "charbench_local/acc_stderr" not in flat  # lm-eval's "N/A" is not a number
    assert flat["charbench_local_a/majority"] == pytest.approx(2 / 3)
    assert flat["charbench_local/majority"] == pytest.approx((2 + 1) / 4)
    assert "piqa/majority" not in flat
    table = results_lib.format_table(flat)
    assert "| piqa | 0.6000 ± 0.0100 | 0.6200 ± 0.0110 |  |" in table
    assert "charbench_local_a" in table and not any(math.isnan(v) for v in flat.values())


def test_evaluate_model_flat_metrics(llama3):
    """The function the training loop calls: flat floats keyed by the task that ran."""
    model = random_model(tie=True, seed=5)
    metrics = harness.evaluate_model(model, llama3, tasks=["charbench"], limit=4,
                                      num_fewshot=1, batch_size=8, offline=True)
    assert set(metrics) >= {"charbench_local/acc", "charbench_local/acc_stderr",
                            "charbench_local/majority",
                            "charbench_local_find_last_occurrence/acc"}
    assert all(isinstance(v, float) for v in metrics.values())


# ---- contexts start with <|end_of_text|>, long continuations ---------------------------------
def test_contexts_start_with_end_of_text_as_in_hflm(pair, llama3):
    """Training documents follow <|end_of_text|>; both models put it before every context."""
    jax_lm, hf_lm = pair
    for text in ("Question: 2+2?\nAnswer:", "x", " leading space", "a\n\nb "):
        expected = [llama3.eos_id] + llama3.encode(text)
        assert jax_lm.tok_encode(text) == hf_lm.tok_encode(text) == expected, text
        assert jax_lm.tok_encode(text, add_special_tokens=False) == llama3.encode(text)
    # text that already starts with the token's text gets no second one (HFLM's rule)
    assert jax_lm.tok_encode("<|end_of_text|>x") == llama3.encode("<|end_of_text|>x")
    ctx, cont = jax_lm._encode_pair("The cat sat on", " the mat.")
    assert ctx[0] == llama3.eos_id == 128001 and ctx[1:] == llama3.encode("The cat sat on")
    assert (ctx, cont) == hf_lm._encode_pair("The cat sat on", " the mat.")


def test_long_continuation_is_scored_in_pieces(pair, llama3):
    """A continuation longer than the model (64 tokens) no longer raises: it is scored in pieces
    of <= 64 tokens, each after the tokens before it cut from the left; HFLM (which asserts on
    such a request) gives the same sum when handed the same pieces."""
    jax_lm, hf_lm = pair
    context, continuation = "Story:", " and then the cat sat on the mat again" * 20
    (lp, greedy), = jax_lm.loglikelihood(_instances("loglikelihood", [(context, continuation)]))
    ctx, cont = jax_lm._encode_pair(context, continuation)
    assert len(cont) > 2 * jax_lm.max_length  # three pieces
    pieces = [(None, (ctx + cont[:s])[-65:], cont[s:s + 64]) for s in range(0, len(cont), 64)]
    reference = sum(v for v, _ in hf_lm._loglikelihood_tokens(pieces, disable_tqdm=True))
    assert math.isfinite(lp) and abs(lp - reference) <= 1e-4 * abs(reference)
    with pytest.raises(AssertionError):  # why JaxLM does not simply mirror HFLM here
        hf_lm.loglikelihood(_instances("loglikelihood", [(context, continuation)]))


# ---- in-loop evaluation --------------------------------------------------------------------
def _eval_config(**kw):
    import ml_collections

    return ml_collections.ConfigDict({"tasks": "piqa", "limit": 8, "num_fewshot": 1,
                                      "batch_size": 8, "limits": "", **kw})


def _read_items(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_in_loop_evaluator_builds_requests_once(tmp_path, llama3):
    """Evaluations at steps 0, 10, 20: later ones spend at most a quarter of the first one's
    request-building time, score the same documents, and write the per-item files."""
    model = random_model(tie=True, seed=5)
    evaluator = harness.InLoopEvaluator(llama3, _eval_config(), tmp_path)
    metrics = {step: evaluator(model, step) for step in (0, 10, 20)}
    first = metrics[0]["eval/request_seconds"]
    for step in (10, 20):
        m = metrics[step]
        assert m["eval/request_seconds"] <= 0.25 * first, (step, m["eval/request_seconds"], first)
        assert m["eval/seconds"] >= m["eval/request_seconds"] >= 0
        assert m["piqa_local/acc"] == metrics[0]["piqa_local/acc"]  # the same model, same docs
    assert metrics[0]["eval/documents"] == 8 and metrics[0]["eval/full"] == 0.0
    items = {step: _read_items(tmp_path / "eval" / f"step_{step:08d}.jsonl") for step in (0, 20)}
    assert items[0] == items[20] and len(items[0]) == 8
    for row in items[0]:
        assert set(row) == {"task", "doc_id", "correct", "correct_norm", "gold_logprob",
                            "gold_bytes", "n_choices", "gold_index", "pred_index"}
        assert row["task"] == "piqa_local" and row["n_choices"] == 2
        assert row["correct"] == int(row["pred_index"] == row["gold_index"])
        assert row["correct"] in (0, 1) and row["correct_norm"] in (0, 1)
        assert row["gold_logprob"] < 0 and row["gold_bytes"] > 0
    # bits per byte, from the per-item file in float64, as the formula says
    bpb = [-r["gold_logprob"] / (math.log(2) * r["gold_bytes"]) for r in items[0]]
    mean = sum(bpb) / len(bpb)
    stderr = math.sqrt(sum((b - mean) ** 2 for b in bpb) / (len(bpb) - 1) / len(bpb))
    assert metrics[0]["piqa_local/bpb"] == pytest.approx(mean, rel=1e-12)
    assert metrics[0]["piqa_local/bpb_stderr"] == pytest.approx(stderr, rel=1e-9)
    assert metrics[0]["piqa_local/acc"] == pytest.approx(np.mean([r["correct"] for r in items[0]]))
    # the gold log-prob is what JaxLM gives the gold continuation after lm-eval's context
    task_set, built = evaluator.task_set(full=False)
    assert not built
    doc_ids = [r["doc_id"] for r in items[0]]
    assert list(task_set.samples["piqa_local"]) == sorted(doc_ids)
    # another run (a new evaluator) scores the same label-balanced documents
    task = task_set.tasks["piqa_local"]
    labels = [results_lib.gold_index(task, doc) for doc in task.eval_docs]
    assert sorted(doc_ids) == results_lib.stratified_subset(labels, 8, "piqa_local")
    assert sum(labels[i] for i in doc_ids) == round(8 * np.mean(labels))


def test_final_evaluation_uses_the_full_sets(tmp_path, llama3):
    evaluator = harness.InLoopEvaluator(
        llama3, _eval_config(tasks="winogrande", limits="winogrande=5"), tmp_path)
    limited, _ = evaluator.task_set(full=False)
    full, built = evaluator.task_set(full=True)
    assert built and limited.sizes == {"winogrande_local": 5}
    assert not full.samples and full.sizes == {"winogrande_local": 1267}
    assert harness.InLoopEvaluator(llama3, _eval_config(), tmp_path, final=True).final


def _reference_subset_counts(labels, limit):
    """Largest-remainder quota per label, in float64 from the label frequencies."""
    counts = collections.Counter(labels)
    exact = {lab: limit * c / len(labels) for lab, c in counts.items()}
    return exact


def test_stratified_subset_keeps_label_balance_and_is_fixed():
    rng = np.random.RandomState(0)
    labels = rng.choice(4, size=1000, p=[0.4, 0.3, 0.2, 0.1]).tolist()
    subset = results_lib.stratified_subset(labels, 101, "task_a")
    assert len(subset) == 101 == len(set(subset)) and subset == sorted(subset)
    exact = _reference_subset_counts(labels, 101)
    got = collections.Counter(labels[i] for i in subset)
    assert all(abs(got[lab] - exact[lab]) < 1 for lab in exact), (got, exact)
    assert results_lib.stratified_subset(labels, 101, "task_a") == subset  # same in every run
    assert results_lib.stratified_subset(labels, 101, "task_b") != subset  # independent per task
    assert results_lib.stratified_subset(labels, 5000, "task_a") == list(range(1000))
    assert len(results_lib.stratified_subset([None] * 50, 7, "gen")) == 7  # no labels: hash order


def test_limits_are_checked(tmp_path, llama3, capsys):
    from prefixlm.config import ConfigError

    assert results_lib.parse_limits("piqa=500, charbench=200") == {"piqa": 500, "charbench": 200}
    for bad in ("piqa", "piqa=0", "piqa=-3", "piqa=x", "=5"):
        with pytest.raises(ConfigError, match="positive"):
            results_lib.parse_limits(bad)
    with pytest.raises(ConfigError, match="eval.limit=0"):
        harness.InLoopEvaluator(llama3, _eval_config(limit=0), tmp_path)
    with pytest.raises(ConfigError, match="not among the evaluated"):
        harness.InLoopEvaluator(llama3, _eval_config(limits="piqx=5"), tmp_path
                                 ).task_set(full=False)
    # the study's default limits name all five tasks; a run evaluating fewer is not refused
    assert harness.resolved_limits({"hellaswag": 5, "piqa": 7}, ["piqa"], ["piqa_local"]) == \
        {"piqa_local": 7}
    for bad in ("-1", "0"):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--workdir", str(tmp_path), "--limit", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "positive integer" in err[-1] and "--limit" in err[-1]
