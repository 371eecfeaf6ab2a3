"""The training side under faults and bad input (issue 12): poisoned parameters are never saved,
a corrupt newest checkpoint falls back to the previous one, a failed evaluation costs no
training, the run's identity is kept, a second SIGTERM cannot lose the final save, and user
errors exit 2 in one line. Tiny model, 34-id vocabulary, seq 16 (see test_train.py)."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import (
    ROOT,
    _params,
    _strip,
    _subprocess_env,
    read_metrics,
    run,
    tiny_config,
    tiny_tokenizer,
    write_token_dir,
)

from prefixlm import config as config_lib
from prefixlm.evaluation import harness
from prefixlm.run import checkpoint as ckpt_lib
from prefixlm.train import driver
from prefixlm.train.loop import Evaluation


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_dir(tmp_path_factory.mktemp("tokens"), tiny_tokenizer().vocab_hash)


def _abstract_params(c):
    from flax import nnx

    from prefixlm.model import llama as model_lib

    _, abstract = model_lib.abstract_split(config_lib.model_config(c))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.to_pure_dict(abstract))


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ---- poisoned updates ---------------------------------------------------------------------------
def test_non_finite_parameters_are_never_saved(token_dir, tmp_path):
    """lr=3e38 makes every parameter inf after one update while that step's loss is finite."""
    c = tiny_config(token_dir, optim__lr=3e38, optim__warmup_steps=0, checkpoint__every=1,
                    optim__clip_norm=0.0)
    with pytest.raises(FloatingPointError, match=r"non-finite parameters after step (\d+) "
                                                 r"\(the loss was still finite\)") as err:
        run(c, tmp_path)
    saved = _steps(tmp_path) if (tmp_path / "checkpoints").exists() else []
    assert f"last good checkpoint is step {saved[-1] if saved else None}" in str(err.value)
    for step in saved:  # whatever was saved before the overflow is finite
        params = ckpt_lib.restore_params(tmp_path, _abstract_params(c), step)[0]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# ---- corrupt checkpoints ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(token_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref")
    c = tiny_config(token_dir, train__steps=12, log_every=2, checkpoint__every=4,
                    eval__every=0)
    run(c, workdir)
    return c, workdir


def _largest_file(directory):
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _zero(path):
    path.write_bytes(b"\0" * path.stat().st_size)


def _random(path):
    path.write_bytes(np.random.RandomState(0).bytes(path.stat().st_size))


@pytest.mark.parametrize("fault", ["zeroed", "deleted", "random_bytes", "empty_newer_dir"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, fault,
                                                                     caplog):
    c, ref_dir = reference

    class Crash(Exception):
        pass

    def crash(step):
        if step == 10:  # checkpoints 4 and 8 exist
            raise Crash

    with pytest.raises(Crash):
        run(c, tmp_path, step_hook=crash)
    params_dir = tmp_path / "checkpoints" / "8" / "params"
    if fault == "zeroed":
        _zero(_largest_file(params_dir))
    elif fault == "deleted":
        _largest_file(params_dir).unlink()
    elif fault == "random_bytes":
        _random(_largest_file(params_dir))
    else:
        (tmp_path / "checkpoints" / "99").mkdir()
    run(c, tmp_path)
    assert _strip(read_metrics(tmp_path)) == _strip(read_metrics(ref_dir))
    (s1, p1), (s2, p2) = _params(tmp_path), _params(ref_dir)
    assert s1 == s2 == 12
    for a, b in zip(p1, p2, strict=True):
        np.testing.assert_array_equal(a, b)
    if fault != "empty_newer_dir":
        assert (tmp_path / "checkpoints_bad" / "8").is_dir()
        assert "checkpoint" in caplog.text and "unusable" in caplog.text


def test_every_finalized_checkpoint_carries_a_manifest(reference):
    _, workdir = reference
    for step in _steps(workdir):
        step_dir = workdir / "checkpoints" / str(step)
        assert (step_dir / ckpt_lib.MANIFEST).exists()
        assert ckpt_lib.verify(step_dir) is None
    # load_model (evaluate/export) also skips a step that fails its manifest
    assert ckpt_lib.all_steps(workdir)[-1] == 12


# ---- evaluation failures ----------------------------------------------------------------------
def _failing_hook(stop_on_error=False):
    def fn(model, step, final):
        if step == 6:
            raise RuntimeError("the hub went away")
        return {"eval/score": 1.0}

    return Evaluation("eval", fn, every=6, at_start=True, stop_on_error=stop_on_error)


def test_a_failed_evaluation_costs_no_training(token_dir, tmp_path):
    c = tiny_config(token_dir, train__steps=12, log_every=2, checkpoint__every=0,
                    eval__every=6, eval__val_tokens=0)
    run(c, tmp_path, evaluations=[_failing_hook()])
    rows = {r["step"]: r for r in read_metrics(tmp_path)}
    assert rows[0]["eval/score"] == 1.0 and rows[12]["eval/score"] == 1.0
    assert "the hub went away" in rows[6]["eval/error"]
    assert 6 in _steps(tmp_path) and 12 in _steps(tmp_path)


def test_a_failed_evaluation_stops_only_when_asked_and_after_saving(token_dir, tmp_path):
    c = tiny_config(token_dir, train__steps=12, log_every=2, checkpoint__every=0,
                    eval__every=6, eval__val_tokens=0)
    with pytest.raises(RuntimeError, match="the hub went away"):
        run(c, tmp_path, evaluations=[_failing_hook(stop_on_error=True)])
    assert _steps(tmp_path) == [6]


# ---- run identity -------------------------------------------------------------------------------
def _short(token_dir, **kw):
    base = dict(train__steps=4, log_every=2, checkpoint__every=2, eval__every=0)
    return tiny_config(token_dir, **{**base, **kw})


def test_identity_lives_with_the_checkpoints(token_dir, tmp_path):
    run(_short(token_dir), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(config_lib.ConfigError, match=r"objective.name: 'prefix_norm' -> 'ce'"):
        run(_short(token_dir, family="ce"), tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"data.seq_len: 16 -> 8"):
        run(_short(token_dir, data__seq_len=8), tmp_path)


def test_result_changing_fields_are_refused_unless_allowed_and_recorded(token_dir, tmp_path):
    run(_short(token_dir), tmp_path)
    for field, kw in [("optim.lr", dict(optim__lr=1e-3)), ("optim.b1", dict(optim__b1=0.8)),
                      ("optim.weight_decay", dict(optim__weight_decay=0.0))]:
        with pytest.raises(config_lib.ConfigError, match=f"--allow_changes={field}"):
            run(_short(token_dir, **kw), tmp_path)
    run(_short(token_dir, train__steps=6, optim__lr=1e-3), tmp_path,
        allow_changes=["train.steps", "optim.lr"])
    change = json.loads((tmp_path / "changes.jsonl").read_text().splitlines()[-1])
    assert change["step"] == 4
    assert change["changes"]["optim.lr"] == [1e-2, 1e-3]
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-3


def test_memory_only_fields_may_change_on_resume(token_dir, tmp_path):
    run(_short(token_dir), tmp_path)
    run(_short(token_dir, train__steps=4, objective__chunk_size=8, model__remat=True),
        tmp_path)


def test_a_failed_first_command_leaves_no_trace(token_dir, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError):
        run(_short(token_dir, data__path=str(tmp_path / "missing")), workdir)
    assert not (workdir / "config.json").exists()
    run(_short(token_dir), workdir)  # the corrected command is not refused
    assert (workdir / "config.json").exists()


# ---- signals --------------------------------------------------------------------------------------
def test_a_second_sigterm_during_the_final_save_loses_nothing(token_dir, tmp_path, monkeypatch):
    original_close = ckpt_lib.Checkpointer.close

    def close_under_fire(self):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler insists while we save
        original_close(self)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "close", close_under_fire)

    def preempt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    c = tiny_config(token_dir, train__steps=12, log_every=5, checkpoint__every=0,
                    eval__every=0, checkpoint__async_save=True)
    last = run(c, tmp_path, step_hook=preempt)  # SIGTERM between log steps: stops at 3
    assert last["preempted_at"] == 3
    assert _steps(tmp_path) == [3]
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))


# ---- the CLI's exit-code contract ---------------------------------------------------------------
def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "prefixlm.main", *args],
                          env=_subprocess_env(1), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/ce.py:tiny", "--config.foo=1"], "foo"),
    (["--config=configs/ce.py:tiny,bogus=1"], "unknown config key 'bogus'"),
    (["--config=configs/ce.py:tiny", "--config.optim.b1=2.0"], "optim.b1=2.0 must be in [0, 1)"),
])
def test_cli_config_errors_exit_2_in_one_line(tmp_path, args, message):
    proc = _cli(*args, f"--workdir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(user_lines(proc.stderr)) <= 3, proc.stderr


def user_lines(stderr: str) -> list[str]:
    """stderr without the lines the accelerator plugins print at import (not ours)."""
    noise = ("cudart_stub.cc", "All log messages before absl::InitializeLog()")
    return [ln for ln in stderr.strip().splitlines() if not any(n in ln for n in noise)]


def test_cli_refuses_a_study_config_on_the_cpu_backend(tmp_path):
    proc = _cli("--config=configs/prefix_norm.py", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert "ACCEL=cuda" in proc.stderr and "--allow_cpu" in proc.stderr


@pytest.mark.parametrize("change, message", [
    (dict(optim__b2=1.0), r"optim.b2=1.0 must be in \[0, 1\)"),
    (dict(optim__eps=0.0), r"optim.eps=0.0 must be a finite number > 0"),
    (dict(optim__weight_decay=-100.0), r"optim.weight_decay=-100.0 must be"),
    (dict(model__norm_eps=0.0), r"model.norm_eps=0.0 must be"),
    (dict(model__rope_theta=-1.0), r"model.rope_theta=-1.0 must be"),
    (dict(data_seed=-5), r"data_seed=-5 must be"),
    (dict(profile__steps="5"), r"profile.steps='5' must look like START,END"),
])
def test_every_numeric_field_is_range_checked(token_dir, change, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.resolve(tiny_config(token_dir, **change), num_devices=1, process_count=1)


# ---- bad input found before training ------------------------------------------------------------
def test_unknown_eval_tasks_fail_before_training(token_dir):

    c = config_lib.resolve(tiny_config(token_dir, eval__tasks="piqa_local,no_such_task",
                                       eval__every=10), 1, 1)
    with pytest.raises(config_lib.ConfigError, match="no_such_task"):
        harness.validate_tasks(c)
    bad_limits = tiny_config(token_dir, eval__tasks="piqa_local", eval__every=10,
                             eval__limits="piqa=0")
    with pytest.raises(config_lib.ConfigError, match="positive"):
        harness.validate_tasks(config_lib.resolve(bad_limits, 1, 1))


def test_data_that_does_not_match_the_run_is_a_config_error(tmp_path):
    """A tokenizer-hash mismatch (shards made with another vocabulary) is DataError: exit 2 with
    one line from the CLI, not a traceback."""
    other = write_token_dir(tmp_path / "other", "not-the-tiny-vocabulary-hash")
    with pytest.raises(driver.DataError, match="data.path="):
        run(tiny_config(other, train__steps=2, eval__every=0), tmp_path / "run")
    assert issubclass(driver.DataError, config_lib.ConfigError)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_checkpoint_that_fails_to_restore_falls_back(token_dir, tmp_path, monkeypatch):
    """Its identity matches the run (checked before), so a step that does not restore is the
    step's fault: it is moved aside, named, and the previous one is used (issue 17)."""
    run(_short(token_dir), tmp_path)
    original = ckpt_lib.Checkpointer.restore_arrays

    def broken(self, step, abstract_state):
        if step == 4:
            raise KeyError("exhausted")
        return original(self, step, abstract_state)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "restore_arrays", broken)
    run(_short(token_dir, train__steps=4), tmp_path)
    assert (tmp_path / "checkpoints_bad" / "4").is_dir()
    assert _steps(tmp_path) == [2, 4]  # step 4 trained again from step 2


def test_another_process_count_is_refused_and_the_step_kept(token_dir, tmp_path):
    """The one restore failure that is the user's config: grain saved one file per process."""
    run(_short(token_dir), tmp_path)
    for step in (2, 4):
        data = tmp_path / "checkpoints" / str(step) / "data"
        (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
        manifest = data.parent / ckpt_lib.MANIFEST  # as a 2-process run would have written it
        files = json.loads(manifest.read_text())["files"]
        files["data/process_0-of-2.json"] = files.pop("data/process_0-of-1.json")
        manifest.write_text(json.dumps({"files": files}))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"saved by 2 processes and this run has"):
        run(_short(token_dir), tmp_path)
    assert _steps(tmp_path) == [2, 4] and not (tmp_path / "checkpoints_bad").exists()


def test_the_grain_worker_count_is_part_of_the_identity(token_dir, tmp_path):
    run(_short(token_dir), tmp_path)
    with pytest.raises(config_lib.ConfigError, match="data.worker_count: 0 -> 1"):
        run(_short(token_dir, data__worker_count=1), tmp_path)


def test_a_tokenizer_that_cannot_load_is_a_config_error(token_dir, tmp_path):
    from prefixlm.train import trainer as step_lib

    with pytest.raises(config_lib.ConfigError, match="data.tokenizer='/no/such/tokenizer'"):
        step_lib.load_tokenizer("/no/such/tokenizer")
