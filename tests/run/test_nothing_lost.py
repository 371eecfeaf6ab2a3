"""Issue 17, "nothing lost, round three": no hangs when a save fails, no trusted corruption, one
run per workdir, history as evidence, identity that cannot be relabelled, optional sinks that
fail soft before anything is written, and one-line errors for every bad input. Each test here
failed on the main branch before the issue. Tiny model and data as in test_train.py; anything
that could hang runs in a subprocess with a timeout."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest
import test_multiprocess
from test_faults import _steps, user_lines
from test_multiprocess import _argv, _compilation_cache, _env  # noqa: F401 (autouse fixture)
from test_train import (
    ROOT,
    _params,
    _strip,
    read_metrics,
    run,
    tiny_config,
    tiny_tokenizer,
    write_token_dir,
)

from prefixlm import config as config_lib
from prefixlm.core.errors import UserError
from prefixlm.run import checkpoint as ckpt_lib
from prefixlm.run import lock, preflight

TIMEOUT = 120  # a hang fails the test, not the suite


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """(tokenizer file, vocabulary size, token directory) for command-line runs."""
    import base64

    from prefixlm.vocab import tokenizer as tokenizer_lib

    root = tmp_path_factory.mktemp("cli")
    ranks = [bytes([b]) for b in range(256)] + test_multiprocess.MERGES
    model = root / "tiny.model"
    model.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                             for i, t in enumerate(ranks)))
    tok = tokenizer_lib.load(str(model))
    return model, tok.vocab_size, write_token_dir(root / "tokens", tok.vocab_hash,
                                                  n_train=4000, n_val=600, n_ids=len(ranks))


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_dir(tmp_path_factory.mktemp("tokens"), tiny_tokenizer().vocab_hash)


def _short(token_dir, **kw):
    base = dict(train__steps=4, log_every=2, checkpoint__every=2, eval__every=0)
    return tiny_config(token_dir, **{**base, **kw})


@contextlib.contextmanager
def read_only(path):
    """``path`` made unwritable even for root: chattr +i where the filesystem has it, else
    chmod (enough for other users). Skips where neither makes it read-only."""
    path.chmod(0o555)
    immutable = shutil.which("chattr") is not None and subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        try:
            (path / ".probe").write_text("x")
            (path / ".probe").unlink()
            pytest.skip("cannot make a read-only directory here (root without chattr)")
        except OSError:
            pass
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def _cli(cli, workdir, *extra, timeout=TIMEOUT):
    return subprocess.run(_argv(cli, workdir, *extra), env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_exit_2(proc, *needles):
    lines = user_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- never hang -----------------------------------------------------------------------------------
def test_checkpoints_as_a_file_is_refused_before_the_first_step(cli, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a directory")
    line = _one_line_exit_2(_cli(cli, workdir), f"{workdir / 'checkpoints'}")
    assert "is a file where the run keeps a directory" in line
    assert not (workdir / "config.json").exists()


def test_a_read_only_workdir_is_refused_before_the_first_step(cli, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with read_only(workdir):
        proc = _cli(cli, workdir)
    _one_line_exit_2(proc, "cannot", f"{workdir}")


SAVE_FAILS_MID_RUN = """
import os, pathlib, shutil, sys, subprocess
import test_train as h
from prefixlm.run import checkpoint
token_dir, workdir, mode, sync = sys.argv[1:5]
workdir = pathlib.Path(workdir)

def break_storage(step):
    if step != 3:
        return
    ckpts = workdir / "checkpoints"
    if mode == "file":  # the directory is replaced by a file under the run's feet
        os.replace(ckpts, workdir / "checkpoints.moved")
        ckpts.write_text("in the way")
    else:  # the mount goes read-only
        subprocess.run(["chattr", "+i", str(ckpts)], check=True)

c = h.tiny_config(token_dir, train__steps=8, log_every=2, checkpoint__every=2, eval__every=0,
                  checkpoint__async_save=(sync == "async"))
try:
    h.run(c, workdir, step_hook=break_storage)
except checkpoint.CheckpointError as e:
    print("CheckpointError:", e)
    sys.exit(2)
finally:
    if mode == "readonly":
        subprocess.run(["chattr", "-i", str(workdir / "checkpoints")])
"""


@pytest.mark.parametrize("mode", ["file", "readonly"])
@pytest.mark.parametrize("sync", ["async", "sync"])
def test_a_save_that_fails_mid_run_ends_the_process_naming_the_path(token_dir, tmp_path, mode,
                                                                     sync):
    if mode == "readonly":
        probe = tmp_path / "probe"
        probe.mkdir()
        with read_only(probe):
            pass  # skips here when read-only directories cannot be made
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SAVE_FAILS_MID_RUN, str(token_dir),
                           str(workdir), mode, sync], env=_env() | {
                               "PYTHONPATH": f"{ROOT}:{os.environ['PREFIXLM_TESTS_PATH']}"},
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # async: the save of step 2 may still be writing when the storage breaks (found by wait())
    steps = "(2|4)" if sync == "async" else "4"
    assert re.search(f"checkpoint {re.escape(str(workdir / 'checkpoints'))}/{steps} could not "
                     "be saved", proc.stdout), proc.stdout


# ---- never trust an unverified step ---------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(token_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref")
    c = tiny_config(token_dir, train__steps=12, log_every=2, checkpoint__every=4,
                    eval__every=0)
    run(c, workdir)
    return c, workdir


class Crash(Exception):
    pass


def _crash_at(n):
    def hook(step):
        if step == n:
            raise Crash

    return hook


def _assert_same_as_reference(reference, workdir):
    _, ref_dir = reference
    assert _strip(read_metrics(workdir)) == _strip(read_metrics(ref_dir))
    (s1, p1), (s2, p2) = _params(workdir), _params(ref_dir)
    assert s1 == s2 == 12
    for a, b in zip(p1, p2, strict=True):
        assert (a == b).all()


def _poison_step(workdir, c, step):
    """Rewrites ``step`` as a well-formed checkpoint with NaN parameters and no manifest, as a
    run that died between orbax's commit and its manifest would leave a corrupt one."""
    import grain

    from prefixlm.train.trainer import Trainer, data_iterator

    trainer = Trainer.create(config_lib.resolve(c), tiny_tokenizer())
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=10, async_save=False)
    it = data_iterator(config_lib.resolve(c), trainer.tokenizer)
    state = ckpt.restore(step, trainer.abstract_state, it)
    identity = ckpt.identity(step)
    shutil.rmtree(workdir / "checkpoints" / str(step))
    ckpt.manager.reload()
    state["params"] = jax.tree.map(lambda x: x * float("nan"), state["params"])
    ckpt.manager.save(step, args=ckpt_lib.ocp.args.Composite(
        params=ckpt_lib.ocp.args.StandardSave(state["params"]),
        train=ckpt_lib.ocp.args.StandardSave({k: v for k, v in state.items() if k != "params"}),
        data=grain.checkpoint.CheckpointSave(it),
        identity=ckpt_lib.ocp.args.JsonSave(identity)), force=True)
    ckpt.manager.wait_until_finished()  # and no close(): no manifest


def test_an_unverified_step_with_nan_parameters_is_quarantined(reference, tmp_path, caplog):
    c, _ = reference
    with pytest.raises(Crash):
        run(c, tmp_path, step_hook=_crash_at(10))
    _poison_step(tmp_path, c, 8)
    assert not (tmp_path / "checkpoints" / "8" / ckpt_lib.MANIFEST).exists()
    run(c, tmp_path)
    assert (tmp_path / "checkpoints_bad" / "8").is_dir()
    assert "non-finite parameters" in caplog.text
    _assert_same_as_reference(reference, tmp_path)


@pytest.mark.parametrize("loss", ["zeroed", "deleted"])
def test_a_step_that_lost_its_manifest_with_its_files_falls_back(reference, tmp_path, loss):
    """Before: "intact but does not restore ... data.worker_count", and no fallback."""
    c, _ = reference
    with pytest.raises(Crash):
        run(c, tmp_path, step_hook=_crash_at(10))
    step_dir = tmp_path / "checkpoints" / "8"
    (step_dir / ckpt_lib.MANIFEST).unlink()
    files = sorted((p for p in (step_dir / "params").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    if loss == "zeroed":
        files[-1].write_bytes(b"\0" * files[-1].stat().st_size)
    else:
        files[-1].unlink()
    run(c, tmp_path)
    assert (tmp_path / "checkpoints_bad" / "8").is_dir()
    _assert_same_as_reference(reference, tmp_path)


def test_a_refused_run_never_writes_a_manifest_for_a_step_it_did_not_save(token_dir, tmp_path):
    run(_short(token_dir), tmp_path)
    manifest = tmp_path / "checkpoints" / "4" / ckpt_lib.MANIFEST
    manifest.unlink()  # as if the saving run died before writing it
    with pytest.raises(config_lib.ConfigError):
        run(_short(token_dir, optim__lr=1e-4), tmp_path)  # refused: identity changed
    assert not manifest.exists()
    run(_short(token_dir, train__steps=6), tmp_path, allow_changes=["train.steps"])
    assert not manifest.exists()  # adopted after its checks, still not vouched for
    assert (tmp_path / "checkpoints" / "6" / ckpt_lib.MANIFEST).exists()  # its own save is


@pytest.mark.parametrize("stray", ["file_0040", "dir_0040", "file_12"])
def test_stray_names_under_checkpoints_never_block_a_resume(token_dir, tmp_path, stray, caplog):
    run(_short(token_dir), tmp_path)
    kind, name = stray.split("_")
    path = tmp_path / "checkpoints" / name
    if kind == "file":
        path.write_text("stray")
    else:
        path.mkdir()
    run(_short(token_dir, train__steps=6), tmp_path, allow_changes=["train.steps"])
    assert f"ignoring {path}" in caplog.text
    assert path.exists() and 6 in _steps(tmp_path)


# ---- one run per workdir --------------------------------------------------------------------------
def test_the_same_command_started_twice_refuses_the_second(cli, tmp_path):
    workdir = tmp_path / "run"
    cmd = _argv(cli, workdir, "--config.train.steps=100000", "--config.data.allow_repeat=True", "--config.eval.every=0",
                "--config.checkpoint.every=0")
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((workdir / lock.LOCK).exists() and (workdir / lock.LOCK).read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                timeout=TIMEOUT)
        line = _one_line_exit_2(second, f"pid {first.pid} on host {os.uname().nodename}")
        assert "in use by another run" in line
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            first.kill()
            first.communicate()


def test_the_local_lock_dies_with_its_holder(tmp_path):
    held = lock.LocalLock(tmp_path)
    held.acquire()
    with pytest.raises(config_lib.ConfigError, match=f"pid {os.getpid()} on host"):
        lock.LocalLock(tmp_path).acquire()
    held.release()
    again = lock.LocalLock(tmp_path)
    again.acquire()  # released (as the kernel does when a holder dies): free again
    again.release()


def test_the_object_storage_lease_on_a_local_fake(tmp_path):
    """gs:// has no flock: a lease object with holder, token and expiry (read back to confirm)."""
    first = lock.Lease(tmp_path, ttl=60, confirm=0)
    first.acquire()
    held = json.loads((tmp_path / lock.LEASE).read_text())
    assert held["pid"] == os.getpid() and held["expires"] > time.time()
    with pytest.raises(config_lib.ConfigError, match=f"pid {os.getpid()} on host"):
        lock.Lease(tmp_path, ttl=60, confirm=0).acquire()
    first.release()
    assert not (tmp_path / lock.LEASE).exists()
    stale = lock.Lease(tmp_path, ttl=0.01, confirm=0)  # a holder that died: its lease expires
    stale.acquire()
    stale._stop.set()
    time.sleep(0.05)
    taker = lock.Lease(tmp_path, ttl=60, confirm=0)
    taker.acquire()
    assert json.loads((tmp_path / lock.LEASE).read_text())["token"] == taker.token
    stale.release()  # not its lease any more: leaves it alone
    assert (tmp_path / lock.LEASE).exists()
    taker.release()


# ---- history is evidence --------------------------------------------------------------------------
def test_history_without_checkpoints_is_refused_unless_restart(token_dir, tmp_path):
    run(_short(token_dir), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(config_lib.ConfigError, match=r"records training to step 4 but .*"
                                                     r"--restart"):
        run(_short(token_dir), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # not truncated
    run(_short(token_dir), tmp_path, restart=True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith(preflight.RESTARTED)]
    assert len(moved) == 1
    assert (moved[0] / "metrics.jsonl").read_text() == before  # nothing deleted
    assert (moved[0] / "config.json").exists()
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]
    assert _steps(tmp_path) == [2, 4]


# ---- identity is identity -------------------------------------------------------------------------
@pytest.mark.parametrize("field, kw", [
    ("seed", dict(seed=1)), ("data_seed", dict(data_seed=3)),
    ("objective.eps", dict(objective__eps=0.2)), ("model.d_ff", dict(model__d_ff=96)),
    ("data.fingerprint", "other_data"),
])
def test_fields_that_define_the_run_cannot_change_even_when_allowed(token_dir, tmp_path, field,
                                                                    kw):
    run(_short(token_dir), tmp_path)
    if kw == "other_data":  # other shards (the same ones elsewhere resume: test_identity.py)
        other = write_token_dir(tmp_path / "other", tiny_tokenizer().vocab_hash, n_train=9000)
        kw = dict(data__path=str(other))
    with pytest.raises(config_lib.ConfigError, match=f"{field}: .* cannot change"):
        run(_short(token_dir, **kw), tmp_path, allow_changes=[field])
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0


# ---- optional services fail soft, before anything is written --------------------------------------
def _no_wandb_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc


@pytest.mark.parametrize("sink", ["tensorboard_is_a_file", "wandb_without_a_key"])
def test_a_failing_optional_sink_costs_a_warning_not_the_run(token_dir, tmp_path, sink,
                                                             monkeypatch, caplog):
    workdir = tmp_path / "run"
    kw = {}
    if sink == "wandb_without_a_key":
        _no_wandb_key(monkeypatch, tmp_path)
        kw = dict(log__wandb="prefixlm-test")
    else:
        workdir.mkdir()
        (workdir / "tensorboard").write_text("a file where the events would go")
    run(_short(token_dir, **kw), workdir)
    assert "training goes on without it" in caplog.text
    assert [r["step"] for r in read_metrics(workdir)] == [2, 4]


def test_a_required_sink_that_cannot_work_stops_before_anything_is_written(token_dir, tmp_path,
                                                                           monkeypatch):
    _no_wandb_key(monkeypatch, tmp_path)
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match="log.wandb: no W&B API key .*log.require"):
        run(_short(token_dir, log__wandb="prefixlm-test", log__require=True), workdir)
    assert not (workdir / "config.json").exists() and not (workdir / "metrics.jsonl").exists()
    run(_short(token_dir, log__wandb="prefixlm-test"), workdir)  # the corrected command runs


def test_a_sink_that_fails_when_built_is_dropped(token_dir, tmp_path, monkeypatch, caplog):
    from prefixlm.run import sinks

    def broken(*a, **k):
        raise RuntimeError("the service is down")

    monkeypatch.setattr(sinks, "TensorBoardSink", broken)
    run(_short(token_dir), tmp_path)
    assert "log.tensorboard could not start (RuntimeError: the service is down)" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]


# ---- every input error is one line, exit 2 --------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(eval__batch_size=0), r"eval.batch_size=0 must be an integer >= 1"),
    (dict(train__tokens=-100, train__steps=None), r"train.tokens=-100 must be an integer >= 1"),
    (dict(train__tokens=10, train__steps=None), r"train.tokens=10 is less than one batch"),
    (dict(data__prefetch_threads=-3), r"data.prefetch_threads=-3 must be an integer >= 0"),
    (dict(data__worker_count=-1), r"data.worker_count=-1 must be an integer >= 0"),
    (dict(eval__num_fewshot=-1), r"eval.num_fewshot=-1 must be an integer >= 0"),
    (dict(eval__limit=0), r"eval.limit=0 must be an integer >= 1"),
    (dict(checkpoint__max_to_keep=0), r"checkpoint.max_to_keep=0 must be"),
    (dict(optim__clip_norm=float("nan")), r"optim.clip_norm=nan must be a finite number >= 0"),
    (dict(peak_flops=float("inf")), r"peak_flops=inf must be a finite number >= 0"),
])
def test_numeric_fields_out_of_range_are_refused(token_dir, change, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.resolve(tiny_config(token_dir, **change), num_devices=1, process_count=1)


def test_every_numeric_field_has_a_range_in_one_table():
    """A new numeric field in configs/base.py without a RANGES entry fails here."""
    from configs import base
    from prefixlm.run import workdir as workdir_lib

    by_registry = {"objective.eps", "objective.temperature", "objective.eps_decay_fraction",
                   "objective.eps_hold_fraction"}  # objectives.validate checks these
    fields = workdir_lib.flatten(base.get_config().to_dict())
    numeric = {k for k, v in fields.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    placeholders = {"train.batch_size", "train.steps", "optim.warmup_steps", "eval.limit"}
    missing = (numeric | placeholders) - set(config_lib.RANGES) - by_registry
    assert not missing, f"numeric fields without a range in config.RANGES: {sorted(missing)}"


def _write_config(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"),
    ("syntax", "line 2: '(' was never closed"),
    ("no_get_config", "has no get_config() function"),
])
def test_a_config_file_that_cannot_load_is_one_line(tmp_path, case, needle):
    path = tmp_path / "cfg.py"
    if case == "syntax":
        path.write_text("x = 1\ny = (\n")
    elif case == "no_get_config":
        path.write_text("x = 1\n")
    proc = subprocess.run([sys.executable, "-m", "prefixlm.main", f"--config={path}",
                           f"--workdir={tmp_path / 'run'}"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    _one_line_exit_2(proc, needle, str(path))


@pytest.mark.parametrize("fault, message", [
    ("metrics_is_a_dir", "metrics.jsonl is a directory where the run keeps a file"),
    ("checkpoints_bad_is_a_file", "checkpoints_bad is a file where the run keeps a directory"),
    ("config_is_corrupt", "config.json: not JSON"),
    ("config_is_a_list", r"config.json: \[1\] is not an object"),
])
def test_a_workdir_of_the_wrong_shape_is_one_line(token_dir, tmp_path, fault, message):
    tmp_path.mkdir(exist_ok=True)
    if fault == "metrics_is_a_dir":
        (tmp_path / "metrics.jsonl").mkdir()
    elif fault == "checkpoints_bad_is_a_file":
        (tmp_path / "checkpoints_bad").write_text("x")
    else:
        (tmp_path / "config.json").write_text("{not json" if "corrupt" in fault else "[1]")
    with pytest.raises(UserError, match=message):
        run(_short(token_dir), tmp_path)


def test_binary_metrics_are_read_as_torn_lines(token_dir, tmp_path):
    run(_short(token_dir), tmp_path)
    with (tmp_path / "metrics.jsonl").open("ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    run(_short(token_dir, train__steps=6), tmp_path, allow_changes=["train.steps"])
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6]


@pytest.mark.parametrize("state", ["no_checkpoints", "only_quarantined", "no_workdir"])
def test_export_without_a_usable_checkpoint_is_one_line(token_dir, tmp_path, state, capsys):
    from prefixlm import export

    workdir = tmp_path / "run"
    if state != "no_workdir":
        run(_short(token_dir, checkpoint__every=0), workdir)
        if state == "only_quarantined":
            bad = workdir / "checkpoints_bad"
            bad.mkdir()
            os.replace(workdir / "checkpoints" / "4", bad / "4")
        else:
            shutil.rmtree(workdir / "checkpoints")
    rc = export.main(["--workdir", str(workdir), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    if state == "only_quarantined":
        assert "moved aside to" in err[0] and "checkpoints_bad" in err[0]


# ==== issue 21, round four (the safe-files, schema and data parts; unit tests of the same classes
# are in test_safe_files.py and test_schemas.py) ================================================
# ---- class 1: one safe way to open a run's files, end to end ----------------------------------
@pytest.mark.parametrize("fault", ["symlinked_lock", "fifo_metrics", "fifo_config"])
def test_a_hostile_workdir_entry_is_one_line_before_anything_is_written(cli, tmp_path, fault):
    """Before: a symlinked run.lock had the lock's JSON written into its target; a FIFO at
    W/metrics.jsonl or W/config.json blocked start-up for ever (here: the timeout)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    name = {"symlinked_lock": lock.LOCK, "fifo_metrics": "metrics.jsonl",
            "fifo_config": "config.json"}[fault]
    if fault == "symlinked_lock":
        (workdir / name).symlink_to(victim)
    else:
        os.mkfifo(workdir / name)
    line = _one_line_exit_2(_cli(cli, workdir, timeout=60), str(workdir / name))
    assert ("is a symlink" if fault == "symlinked_lock" else "is a FIFO") in line
    assert victim.read_text() == "precious\n"
    assert {p.name for p in workdir.iterdir()} <= {name, lock.LOCK}  # nothing else written


def test_a_save_that_would_land_on_a_stray_file_stops_and_keeps_it(token_dir, tmp_path):
    """Before: a stray FILE named like a future step (W/checkpoints/2) was replaced by orbax's
    step directory at step 2, though stray names are to be ignored."""
    stray = tmp_path / "checkpoints" / "2"
    stray.parent.mkdir(parents=True)
    stray.write_text("my notes\n")
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        run(_short(token_dir), tmp_path)
    line = str(info.value)
    assert "\n" not in line and str(stray) in line and "move it aside" in line
    assert stray.read_text() == "my notes\n"


def test_max_to_keep_never_deletes_a_stray_integer_folder(tmp_path):
    """Before: orbax took any integer-named folder for a step, so max_to_keep deleted a user's
    W/checkpoints/3/ (with everything in it) at the next save."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from etils import epath

    stray = tmp_path / "checkpoints" / "3"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine\n")
    mngr = ckpt_lib._manager(epath.Path(tmp_path / "checkpoints"), max_to_keep=1,
                             async_save=False)
    try:
        for step in (6, 8):
            mngr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave({"w": jnp.ones(2)})), force=True)
        assert mngr.all_steps() == [8]
    finally:
        mngr.close()
    assert (stray / "notes.txt").read_text() == "mine\n"


# ---- class 5 (the data part): the checksum cache and tokenize -----------------------------------
def test_the_checksum_cache_is_not_fooled_by_a_restored_mtime(tmp_path):
    """Before: the cache was keyed by (size, mtime): a shard edited and given back its mtime (as
    `cp -p` or `rsync -t` do) was trusted without hashing."""
    from test_data_pipeline import _poke, _record_checksums, make_tokens

    from prefixlm.data import pipeline, shards

    root = tmp_path / "tok"
    path = make_tokens(root, [50, 60])
    _record_checksums(root)
    pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)  # hashed once, cached
    _poke(root / "train" / "s0.bin", 3, 7, keep_mtime=True)  # same size, same mtime
    with pytest.raises(shards.ShardChecksumError, match=r"s0\.bin"):
        pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)


def _tiny_model(path, drop_merges=0):
    import base64

    ranks = [bytes([b]) for b in range(256)] + test_multiprocess.MERGES
    ranks = ranks[:len(ranks) - drop_merges]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return str(path)


@pytest.fixture
def finished_token_dir(tmp_path):
    """(input glob, output dir, tokenizer A) of a finished tokenization with tokenizer A."""
    from test_data_tokenize import many_docs, write_parquet

    from prefixlm.data import tokenize

    write_parquet(tmp_path / "in" / "a.parquet", many_docs(20, seed=1))
    glob, out = str(tmp_path / "in" / "*.parquet"), tmp_path / "out"
    model = _tiny_model(tmp_path / "a.model")
    tokenize.tokenize(glob, out, tokenizer_name=model, workers=1, progress=False)
    return glob, out, model


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _tokenize_cli(capsys, *argv):
    from prefixlm.data import tokenize

    rc = tokenize.main([*argv, "--workers", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_tokenize_with_a_missing_tokenizer_changes_nothing(finished_token_dir, tmp_path, capsys):
    """Before: `--output FINISHED_DIR --tokenizer /nonexistent` deleted stats.json before the
    tokenizer loaded, then printed a traceback; training on the directory was then refused."""
    glob, out, _ = finished_token_dir
    before = _snapshot(out)
    rc, err = _tokenize_cli(capsys, "--input", glob, "--output", str(out),
                            "--tokenizer", str(tmp_path / "nonexistent"))
    assert rc == 2 and len(err) == 1 and "nonexistent" in err[0], err
    assert _snapshot(out) == before


def test_tokenize_refuses_another_tokenizers_directory_unless_overwrite(finished_token_dir,
                                                                         tmp_path, capsys):
    """Before: tokenizing into a directory made with another tokenizer silently replaced all
    its shards."""
    from prefixlm.data import shards

    glob, out, _ = finished_token_dir
    before = _snapshot(out)
    other = _tiny_model(tmp_path / "b.model", drop_merges=1)
    rc, err = _tokenize_cli(capsys, "--input", glob, "--output", str(out), "--tokenizer", other)
    assert rc == 2 and len(err) == 1, err
    assert "another tokenizer" in err[0] and "--overwrite" in err[0] and str(out) in err[0]
    assert _snapshot(out) == before
    rc, err = _tokenize_cli(capsys, "--input", glob, "--output", str(out), "--tokenizer", other,
                            "--overwrite")
    assert rc == 0, err
    assert shards.read_stats(out)["tokenizer"] == other


def test_tokenize_removes_only_its_own_leftovers(finished_token_dir, capsys):
    """Before: every `*/*.tmp` under --output was deleted, whoever made it."""
    glob, out, model = finished_token_dir
    (out / "notes").mkdir()
    (out / "notes" / "draft.tmp").write_text("mine\n")
    (out / "train" / "a-0000.bin.tmp").write_bytes(b"\0" * 8)  # a killed run's own leftover
    rc, err = _tokenize_cli(capsys, "--input", glob, "--output", str(out), "--tokenizer", model)
    assert rc == 0, err
    assert (out / "notes" / "draft.tmp").read_text() == "mine\n"
    assert not (out / "train" / "a-0000.bin.tmp").exists()
