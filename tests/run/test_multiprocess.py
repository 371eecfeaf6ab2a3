"""``prefixlm.main`` as launch scripts run it: 2 JAX processes on this machine (CPU, gloo
collectives) train exactly like 1 process with the same global batch, only process 0 writes,
checkpoints are collective and resume; SIGTERM exits 143 (not 0, so launch/sweep.sh does not mark
the run DONE); metrics/config/TensorBoard go through the path layer used for gs:// workdirs.

The runs use a 544-id tiktoken vocabulary (256 bytes, 32 merges, 256 specials) so that each
process starts, compiles and trains in seconds on 2 CPU cores."""

import base64
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import write_token_dir

from prefixlm import config as config_lib
from prefixlm.core import safe_files
from prefixlm.run import checkpoint as ckpt_lib
from prefixlm.run import sinks
from prefixlm.run import workdir as workdir_lib
from prefixlm.vocab import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
MERGES = [b"th", b"he", b"the", b" t", b" th", b" the", b"in", b"ing", b"an", b"and", b" a",
          b" an", b" and", b"er", b"re", b"on", b" o", b" on", b"es", b"st", b"est", b"en",
          b"at", b" at", b"or", b"ou", b"it", b" i", b" in", b" it", b"is", b" is"]
COMPARED = ("loss", "nll", "accuracy", "grad_norm", "lr", "tokens")
TIMEOUT = 180  # a hang guard for one launch: a run takes ~10-20 s alone, ~80 s on a loaded 2-core box


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer file, vocabulary size, token directory)."""
    root = tmp_path_factory.mktemp("mp")
    ranks = [bytes([b]) for b in range(256)] + MERGES
    model = root / "tiny.model"  # tokenizer.load takes a path ending in .model (tiktoken ranks)
    model.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                             for i, t in enumerate(ranks)))
    tok = tokenizer_lib.load(str(model))
    data = write_token_dir(root / "tokens", tok.vocab_hash, n_train=4000, n_val=600,
                           n_ids=len(ranks))
    return model, tok.vocab_size, data


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(setup, workdir, *extra):
    model, vocab, data = setup
    return [sys.executable, "-m", "prefixlm.main", "--config=configs/prefix_norm.py:tiny",
            f"--workdir={workdir}", f"--config.data.tokenizer={model}",
            f"--config.model.vocab_size={vocab}", f"--config.data.path={data}",
            "--config.train.batch_size=4", "--config.train.steps=8", "--config.log_every=1",
            "--config.checkpoint.every=4", "--config.eval.every=4",
            "--config.eval.val_tokens=256", "--config.progress=false", *extra]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Launches share compiled programs (a resumed run reuses its first launch's)."""
    global _CACHE
    _CACHE = str(tmp_path_factory.mktemp("jax_cache"))


_CACHE = ""


def _env():
    # One CPU device per process. XLA's CPU compile dominates these runs (6 programs, most of the
    # time of a launch); its cheap mode halves it, and every run here uses the same mode.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true",
               JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def commands(setup, workdir, processes: int = 1, *extra) -> list[list[str]]:
    """The command line of each of ``processes`` JAX processes of one run."""
    if processes == 1:
        return [_argv(setup, workdir, *extra)]
    coord = f"127.0.0.1:{_free_port()}"
    return [_argv(setup, workdir, *extra, f"--coordinator_address={coord}",
                  f"--num_processes={processes}", f"--process_id={i}")
            for i in range(processes)]


def run_all(cmds) -> list[tuple[int, str, str]]:
    """Starts every command at once, waits for all; [(returncode, stdout, stderr)]."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    deadline = time.monotonic() + TIMEOUT
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:  # a process that failed leaves the others waiting in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def metrics(workdir):
    return [json.loads(ln) for ln in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
            .splitlines() if ln.strip()]


def _ok(results):
    for i, (rc, stdout, stderr) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}\n{stdout[-2000:]}\n{stderr[-4000:]}"


def _compare(a_rows, b_rows, rtol):
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for a, b in zip(a_rows, b_rows, strict=True):
        for k in (*COMPARED, "val/loss", "val/nll"):
            if k in a or k in b:
                np.testing.assert_allclose(b[k], a[k], rtol=rtol, err_msg=f"step {a['step']} {k}")


@pytest.fixture(scope="module")
def trained_pair(setup, tmp_path_factory):
    """(1-process run, 2-process run, the 2 processes' results): the same 8 steps, trained
    once for the tests below (each works on a copy)."""
    root = tmp_path_factory.mktemp("pair")
    one, two = root / "one", root / "two"
    # The reference and the 2-process run side by side: together they use the 2 cores better.
    ref, *results = run_all(commands(setup, one, 1) + commands(setup, two, 2))
    _ok([ref, *results])
    return one, two, results


def test_two_processes_train_like_one_and_resume(setup, trained_pair, tmp_path):
    import shutil

    one, two, results = trained_pair
    two = shutil.copytree(two, tmp_path / "two")

    rows = metrics(two)
    # written once, by process 0 only; step 0 holds the validation of the initial model
    assert [r["step"] for r in rows] == list(range(0, 9))
    # Process 0 reads windows 0, 2, ... of the shuffled stream and process 1 windows 1, 3, ...;
    # together they are the same global batches as one process reads, in another row order.
    _compare(metrics(one), rows, rtol=1e-5)
    assert "val/nll" in rows[0] and "val/nll" in rows[4] and "val/nll" in rows[8]

    (_, out0, _), (_, out1, err1) = results
    assert "final: step=8" in out0 and "2 processes, 2 devices" in out0
    assert "final:" not in out1 and "parameters" not in out1, out1  # (gloo prints a line)
    assert "run prefix_norm" not in err1  # process 1 does not log INFO
    assert json.loads((two / "config.json").read_text())["mesh"] == {"data": 2, "fsdp": 1}
    assert len(list((two / "tensorboard").glob("events.out.tfevents*"))) == 1

    # Collective checkpoints: orbax wrote both processes' parts, grain one file per process.
    assert ckpt_lib.all_steps(two) == [4, 8]
    assert sorted(p.name for p in (two / "checkpoints" / "8" / "data").glob("*.json")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]

    # Lose the last checkpoint: both processes resume from step 4 and log steps 5-8 again,
    # identically (same programs, same data position).
    shutil.rmtree(two / "checkpoints" / "8")
    results = run_all(commands(setup, two, 2))
    _ok(results)
    assert "resumed from" in results[0][2] and "at step 4" in results[0][2]
    again = metrics(two)
    assert [{k: r[k] for k in ("step", *COMPARED) if k in r} for r in again] == \
        [{k: r[k] for k in ("step", *COMPARED) if k in r} for r in rows]
    assert ckpt_lib.all_steps(two) == [4, 8]


def test_sigterm_saves_a_checkpoint_and_exits_143(setup, tmp_path):
    """launch/sweep.sh marks a run DONE when prefixlm.main exits 0: a preempted run must not."""
    workdir = tmp_path / "run"
    cmd = _argv(setup, workdir, "--config.train.steps=100000", "--config.data.allow_repeat=True", "--config.checkpoint.every=0",
                "--config.eval.every=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        path = workdir / "metrics.jsonl"
        while not (path.exists() and path.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no metrics within the timeout"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, stdout, stderr[-3000:])
    steps = ckpt_lib.all_steps(workdir)
    assert len(steps) == 1 and 2 <= steps[0] < 100000, steps
    assert f"preempted at step {steps[0]} of 100000" in stdout
    assert metrics(workdir)[-1]["step"] == steps[0]  # (resuming is tested above and in
    # test_train.py; a rerun of the same command continues from this checkpoint)


def test_sigterm_to_one_of_two_processes_stops_both_at_an_agreed_step(setup, tmp_path):
    """Slurm may signal one task first: the processes agree every
    checkpoint.preemption_check_every steps (not every step), save that step collectively and
    both exit 143.

    Issue 21, on the same running job (one job start for both cases): a second --process_id=1
    started beside it stops in one line within 60 s, before it reaches the coordinator (on
    main it aborted both processes of the job and hung itself), and the job goes on."""
    workdir = tmp_path / "run"
    cmds = commands(setup, workdir, 2, "--config.train.steps=100000", "--config.data.allow_repeat=True",
                    "--config.checkpoint.every=0", "--config.eval.every=0",
                    "--config.checkpoint.preemption_check_every=3")
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    try:
        deadline = time.monotonic() + 2 * TIMEOUT
        path = workdir / "metrics.jsonl"
        while not (path.exists() and path.read_text().count("\n") >= 2):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "no metrics within the timeout"
            time.sleep(0.2)
        _duplicate_is_refused(cmds[1], procs)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [143, 143], [o[1][-3000:] for o in outs]
    steps = ckpt_lib.all_steps(workdir)
    assert len(steps) == 1 and steps[0] % 3 == 0, steps
    assert f"preempted at step {steps[0]} of 100000" in outs[0][0]
    assert metrics(workdir)[-1]["step"] == steps[0]


def test_remote_workdir_files_go_through_the_path_layer(tmp_path, monkeypatch):
    """What a gs:// workdir gets (whole-file rewrites, TensorBoard mirrored from a local temp
    directory), exercised on a local path by treating it as remote."""
    assert str(workdir_lib.run_path("gs://bucket/runs/a") / "metrics.jsonl") == \
        "gs://bucket/runs/a/metrics.jsonl"
    assert str(ckpt_lib._checkpoints_dir("gs://bucket/runs/a")) == "gs://bucket/runs/a/checkpoints"
    assert safe_files.is_remote(workdir_lib.run_path("gs://b/r")) and not safe_files.is_remote(tmp_path)
    assert workdir_lib.run_path("rel").is_absolute()

    monkeypatch.setattr(sinks, "is_remote", lambda path: True)
    w = sinks.MetricsWriter(tmp_path, resume_step=0, enabled=True)
    tb = next(s for s in w.sinks if isinstance(s, sinks.TensorBoardSink))
    assert w.jsonl.remote and tb.local is not None
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step, "nll": float("nan")})
        assert len(metrics(tmp_path)) == step  # visible after every line, not only at close
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents*"))
    local = tb.local
    w.close()
    assert not os.path.exists(local)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert metrics(tmp_path)[0]["nll"] == "nan"

    # Resuming from step 2 drops line 3 (it will be logged again).
    w = sinks.MetricsWriter(tmp_path, resume_step=2, enabled=True)
    w.write(3, {"loss": 0.5})
    w.close()
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]

    c = config_lib.resolve(
        __import__("configs.prefix_norm", fromlist=["x"]).get_config("tiny"), 1, 1)
    workdir_lib.save_config(tmp_path, c)
    assert workdir_lib.load_config(tmp_path).name == c.name
    assert not list(tmp_path.glob("*.tmp"))


# ---- issue 21: processes that agree ----------------------------------------------------------
AGREE_S = 60  # each refusal below ends on every process within this (start-up included)


def _timed(cmds, timeout=TIMEOUT):
    t0 = time.monotonic()
    results = run_all(cmds)
    return results, time.monotonic() - t0


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1] if stderr.strip() else ""


def test_a_step_that_fails_to_restore_on_one_process_is_moved_aside_on_all(
        setup, trained_pair, tmp_path):
    """Step 8 without its manifest and with process 1's data-iterator file corrupt: only
    process 1 fails to restore it. Both move it aside, resume from step 4 together and log
    steps 5-8 bit for bit as the first run did (on main: a gloo "collective mismatch" abort
    after ~100 s, on every relaunch)."""
    import shutil

    _, two, _ = trained_pair
    work = shutil.copytree(two, tmp_path / "two")
    (work / "checkpoints" / "8" / ckpt_lib.MANIFEST).unlink()
    (work / "checkpoints" / "8" / "data" / "process_1-of-2.json").write_text("{corrupt")
    results = run_all(commands(setup, work, 2))
    _ok(results)
    err0 = results[0][2]
    assert "at step 4" in err0 and "on process 1" in err0, err0[-3000:]
    assert (work / "checkpoints_bad" / "8").is_dir()
    assert ckpt_lib.all_steps(work) == [4, 8]
    shown = ("step", *COMPARED, "val/loss", "val/nll")
    assert [{k: r[k] for k in shown if k in r} for r in metrics(work)] == \
        [{k: r[k] for k in shown if k in r} for r in metrics(two)]


def test_processes_that_disagree_on_the_config_refuse_together(setup, tmp_path):
    """Process 1 with another optim.lr trained a diverging replica on main (both exit 0);
    another train.steps left both hanging at the end. Both differences are named, by both
    processes, and nothing is written, so the corrected relaunch is a fresh run (equal to one
    process: test_two_processes_train_like_one_and_resume)."""
    cmds = commands(setup, tmp_path / "w", 2)
    cmds[1] += ["--config.optim.lr=0.002", "--config.train.steps=9"]
    results, seconds = _timed(cmds)
    assert seconds < AGREE_S, seconds
    for rc, _, stderr in results:
        assert rc == 2, stderr[-3000:]
        assert "Traceback" not in stderr
        line = _last_line(stderr)
        assert "disagree on the run's config (optim.lr: 0.01 on process 0, 0.002 on process " \
               "1; train.steps: 8 on process 0, 9 on process 1)" in line, stderr[-2000:]
    assert not (tmp_path / "w").exists()  # refused before anything was written


def _duplicate_is_refused(cmd, job):
    """``cmd`` (a copy of one process of the running ``job``) is refused in one line within
    AGREE_S, and the job's processes are still running."""
    results, seconds = _timed([cmd])
    rc, _, stderr = results[0]
    assert rc == 2 and seconds < AGREE_S, (rc, seconds, stderr[-3000:])
    assert "--process_id=1" in _last_line(stderr) and "already running" in stderr
    assert "Traceback" not in stderr
    assert all(p.poll() is None for p in job)  # the job did not notice


def test_data_that_fails_on_one_host_only_stops_every_process(setup, tmp_path):
    """Process 1 reads its own copy of the data (the same stats.json, so the same fingerprint)
    with a shard edited after tokenization: its checksum check fails there only. Both stop in
    one line within 60 s, nothing written (without the agreement, process 0 went on into the
    collective restore and waited for a process that had exited)."""
    import shutil

    from test_identity import token_dir_with_checksums

    from prefixlm.vocab import tokenizer as tokenizer_lib

    model, vocab, _ = setup
    good = token_dir_with_checksums(tmp_path / "good", vocab_hash=tokenizer_lib.load(
        str(model)).vocab_hash, n_train=4000, n_val=600, n_ids=vocab)
    bad = shutil.copytree(good, tmp_path / "bad")
    shard = bad / "train" / "00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[8] ^= 1
    shard.write_bytes(bytes(raw))
    cmds = commands(setup, tmp_path / "w", 2, f"--config.data.path={good}")
    cmds[1].append(f"--config.data.path={bad}")
    results, seconds = _timed(cmds)
    assert seconds < AGREE_S, seconds
    for i, (rc, _, stderr) in enumerate(results):
        assert rc == 2 and "Traceback" not in stderr, stderr[-3000:]
        line = _last_line(stderr)
        assert "content checksum" in line and str(shard) in line, (i, stderr[-2000:])
    assert "process 1 of 2 stopped before training" in _last_line(results[0][2])
    assert not (tmp_path / "w").exists()


def test_a_process_id_out_of_range_is_one_line(setup, tmp_path):
    (cmd,) = commands(setup, tmp_path / "w", 1)
    results, seconds = _timed([cmd + ["--num_processes=2", "--process_id=5",
                                      f"--coordinator_address=127.0.0.1:{_free_port()}"]])
    rc, _, stderr = results[0]
    assert rc == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert "--process_id=5 with --num_processes=2" in _last_line(stderr)
    assert not (tmp_path / "w").exists()
