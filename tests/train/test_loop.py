"""What the training loop offers around the step: hooks at step 0, every N and at the end, the
eps = 1 warning line, profiler traces, the W&B sink (offline), the eps schedule in the logs, and
a separate data seed. Tiny model, 34-id vocabulary, seq 16 (see test_train.py)."""

import json
import logging

import pytest
from test_train import read_metrics, run, tiny_config, tiny_tokenizer, write_token_dir

from prefixlm import config as config_lib
from prefixlm.evaluation import harness
from prefixlm.train import driver
from prefixlm.train import trainer as step_lib
from prefixlm.train.loop import Evaluation


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_dir(tmp_path_factory.mktemp("tokens"), tiny_tokenizer().vocab_hash)


def test_hooks_run_at_step_0_every_n_and_at_the_end(token_dir, tmp_path):
    seen = []

    def hook(model, step, final):
        seen.append((step, final, type(model).__name__))
        return {"eval/score": float(step)}

    c = tiny_config(token_dir, train__steps=20, log_every=5, eval__every=10,
                    eval__val_tokens=256, checkpoint__every=0)
    run(c, tmp_path, evaluations=[Evaluation("eval", hook, every=10, at_start=True)])
    assert seen == [(0, False, "Llama"), (10, False, "Llama"), (20, True, "Llama")]
    rows = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(rows) == [0, 5, 10, 15, 20]
    for s in (0, 10, 20):
        assert rows[s]["eval/score"] == s and rows[s]["eval/seconds"] >= 0
        assert "val/nll" in rows[s]
    assert "loss" not in rows[0] and rows[0]["tokens"] == 0  # the initial model: no loss yet


def test_a_resume_does_not_repeat_an_evaluation_already_logged(token_dir, tmp_path):
    calls = []
    hook = Evaluation("eval", lambda m, s, f: calls.append(s) or {"eval/x": 1.0}, every=4,
                      at_start=True)
    c = tiny_config(token_dir, train__steps=4, log_every=2, eval__every=4, eval__val_tokens=0)
    run(c, tmp_path, evaluations=[hook])
    c8 = tiny_config(token_dir, train__steps=8, log_every=2, eval__every=4,
                     eval__val_tokens=0)
    run(c8, tmp_path, evaluations=[hook], allow_changes=["train.steps"])
    assert calls == [0, 4, 8]


def test_eps_one_over_proper_prefixes_logs_how_often_the_gold_gets_no_mass(token_dir, tmp_path,
                                                                         caplog):
    c = tiny_config(token_dir, objective__eps=1.0, train__steps=2, eval__every=0)
    with caplog.at_level(logging.INFO, logger="prefixlm"):
        run(c, tmp_path)
    lines = [r.message for r in caplog.records if "no mass on the gold token" in r.message]
    assert len(lines) == 1 and "%" in lines[0]


def test_the_eps_schedule_is_logged_and_reaches_zero(token_dir, tmp_path):
    c = tiny_config(token_dir, objective__eps_schedule="linear", objective__eps_decay_fraction=0.5,
                    train__steps=8, log_every=2, eval__every=0)
    run(c, tmp_path)
    eps = {r["step"]: r["eps"] for r in read_metrics(tmp_path) if "eps" in r}
    # eps of the update that led to the logged step: step s used eps_at(s - 1)
    assert eps[2] == pytest.approx(0.1 * (1 - 1 / 4))
    assert eps[6] == eps[8] == 0.0


def test_a_profile_trace_is_written_for_the_chosen_steps(token_dir, tmp_path):
    c = tiny_config(token_dir, train__steps=4, eval__every=0, profile__steps="2,3")
    run(c, tmp_path)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces, list((tmp_path / "profile").rglob("*"))


def test_the_wandb_sink_logs_offline(token_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    c = tiny_config(token_dir, train__steps=4, log_every=2, eval__every=0, log__wandb="prefixlm",
                    log__wandb_mode="offline")
    run(c, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "wandb_run_id").read_text().strip()


def test_data_order_and_init_are_seeded_apart(token_dir):
    c = config_lib.resolve(tiny_config(token_dir, seed=3, data_seed=7), 1, 1)
    assert c.name == "prefix_norm_eps0p1_seed3_data7_tiny"
    assert config_lib.data_seed(c) == 7
    assert config_lib.data_seed(config_lib.resolve(tiny_config(token_dir, seed=3), 1, 1)) == 3
    first = {}
    for data_seed in (7, 8):
        c = config_lib.resolve(tiny_config(token_dir, seed=3, data_seed=data_seed), 1, 1)
        it = step_lib.data_iterator(c, tiny_tokenizer())
        first[data_seed] = json.dumps(next(it)["inputs"].tolist())
    assert first[7] != first[8]


def test_in_loop_evaluation_builds_requests_once(tmp_path, llama3):
    """The evaluation main.py plugs in: steps 0, 10 and 20 log eval/seconds and
    eval/request_seconds, and the later evaluations reuse the first one's requests."""

    data = write_token_dir(tmp_path / "tokens", llama3.vocab_hash, n_train=3000, n_val=600,
                           n_ids=1000)
    c = tiny_config(data, train__steps=20, log_every=10, eval__every=10, eval__val_tokens=0,
                    checkpoint__every=0, eval__tasks="piqa_local", eval__limit=8,
                    eval__limits="", eval__final_full=False, eval__batch_size=8)
    c.model.vocab_size = llama3.vocab_size
    c = config_lib.resolve(c, 1, 1)
    harness.validate_tasks(c)
    hooks = harness.in_loop_evaluations(c, "llama3", str(tmp_path / "run"))
    driver.train_and_evaluate(c, tmp_path / "run", tokenizer=llama3, evaluations=hooks)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run") if "eval/seconds" in r}
    assert sorted(rows) == [0, 10, 20]
    first = rows[0]["eval/request_seconds"]
    assert first > 0
    for s in (10, 20):
        assert rows[s]["eval/request_seconds"] <= first / 4, rows[s]
        assert 0 <= rows[s]["piqa_local/acc"] <= 1 and rows[s]["piqa_local/bpb"] > 0
    items = (tmp_path / "run" / "eval" / "step_00000010.jsonl").read_text().splitlines()
    assert len(items) == 8 and json.loads(items[0])["task"] == "piqa_local"
    assert json.loads((tmp_path / "run" / "eval" / "tasks.json").read_text())


# ---- evaluations at resume ------------------------------------------------------------------------
class _Killed(BaseException):
    """A crash (not an Exception, so the loop does not log it as eval/error and go on)."""


def _flaky(calls, fail_at):
    """An evaluation hook that raises ``fail_at[step]`` once, then succeeds."""
    def fn(model, step, final):
        calls.append((step, final))
        if step in fail_at:
            raise fail_at.pop(step)
        return {"eval/x": float(step)}

    return Evaluation("eval", fn, every=4, at_start=True)


def _eval_rows(workdir):
    return [(r["step"], r.get("eval/x"), r.get("eval/error", "-")) for r in read_metrics(workdir)
            if "eval/seconds" in r]


def test_a_failed_evaluation_at_the_restored_step_is_retried_on_resume(token_dir, tmp_path):
    """The final evaluation fails; rerunning the finished run retries it (once), and the retry's
    row marks the failure resolved (eval/error: null)."""
    calls = []
    c = tiny_config(token_dir, train__steps=4, log_every=2, eval__every=4, eval__val_tokens=0,
                    checkpoint__every=4)
    hook = _flaky(calls, {4: RuntimeError("the hub went away")})
    run(c, tmp_path, evaluations=[hook])
    assert _eval_rows(tmp_path) == [(0, 0.0, "-"), (4, None, "RuntimeError: the hub went away")]
    last = run(c, tmp_path, evaluations=[hook])
    assert calls == [(0, False), (4, True), (4, True)]
    assert _eval_rows(tmp_path)[-1] == (4, 4.0, None) and last["eval/x"] == 4.0
    run(c, tmp_path, evaluations=[hook])  # nothing left to retry
    assert len(calls) == 3


def test_an_evaluation_killed_before_it_logged_runs_at_resume(token_dir, tmp_path):
    """A crash during the final evaluation (after its checkpoint): the rerun evaluates step 4."""
    calls = []
    c = tiny_config(token_dir, train__steps=4, log_every=2, eval__every=4, eval__val_tokens=0,
                    checkpoint__every=4)
    hook = _flaky(calls, {4: _Killed()})
    with pytest.raises(_Killed):
        run(c, tmp_path, evaluations=[hook])
    run(c, tmp_path, evaluations=[hook])
    assert calls == [(0, False), (4, True), (4, True)]
    assert _eval_rows(tmp_path) == [(0, 0.0, "-"), (4, 4.0, "-")]


def test_a_failed_evaluation_of_an_older_step_is_named_at_resume(token_dir, tmp_path, caplog):
    calls = []
    c = tiny_config(token_dir, train__steps=8, log_every=2, eval__every=4, eval__val_tokens=0,
                    checkpoint__every=4)
    hook = _flaky(calls, {4: RuntimeError("the hub went away")})
    run(c, tmp_path, evaluations=[hook])
    with caplog.at_level(logging.WARNING, logger="prefixlm"):
        run(c, tmp_path, evaluations=[hook])
    assert calls == [(0, False), (4, False), (8, True)]  # step 4's model is gone: no retry
    assert "hook 'eval' failed at step(s) [4]" in caplog.text


# ---- preemption -----------------------------------------------------------------------------------
def test_several_processes_agree_on_sigterm_only_every_n_steps(monkeypatch):
    """The agreement is an all-gather that waits for the device: with several processes it
    runs every checkpoint.preemption_check_every steps, not every step; one process checks its
    own flag after every step."""
    import types

    from prefixlm.train import hooks as hooks_lib

    agreed = []
    monkeypatch.setattr(hooks_lib.hosts, "any_process", lambda flag: agreed.append(flag) or flag)
    flag = types.SimpleNamespace(requested=False)
    hook = hooks_lib.Preemption(flag, every=4)
    state = types.SimpleNamespace(step=0, total=100, stop=False, done=False)
    monkeypatch.setattr(hooks_lib.jax, "process_count", lambda: 2)
    for step in range(1, 11):
        state.step = step
        flag.requested = step >= 5  # SIGTERM arrives during step 5
        if hook.due(state):
            hook(state)
        if state.stop:
            break
    assert len(agreed) == 2 and state.step == 8  # agreed at 4 (no) and 8 (stop)
    monkeypatch.setattr(hooks_lib.jax, "process_count", lambda: 1)
    state.stop = False
    assert all(hook.due(types.SimpleNamespace(step=s)) for s in range(1, 9))
