"""Issue 21, class 1: one safe way to open a run's files (prefixlm.core.safe_files). Unit level, on
temporary directories: no symlink followed for writing, anything but a regular file refused in
one line before it is opened (a FIFO never blocks), nothing the run did not create deleted or
replaced, and a full disk at the lock or at a metrics append is one line. Each test failed on
main before the issue (the case it names is in its docstring); anything that could hang on main
runs in a subprocess with a timeout."""

import errno
import json
import os
import threading

import pytest

from prefixlm.core.errors import UnsafePathError, UserError
from prefixlm.run import lock, sinks
from prefixlm.run import workdir as workdir_lib


def _safe_files():
    """Imported where used, so that each test fails on its own on a tree without it."""
    from prefixlm.core import safe_files

    return safe_files

HANG_TIMEOUT = 20


def _victim(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


# ---- symlinks are never followed for writing ----------------------------------------------------
def test_a_symlinked_run_lock_is_refused_not_truncated(tmp_path):
    """Before: `ln -s FILE W/run.lock` had the lock's JSON written into FILE."""
    victim, workdir = _victim(tmp_path), tmp_path / "run"
    workdir.mkdir()
    (workdir / lock.LOCK).symlink_to(victim)
    with pytest.raises(UnsafePathError) as info:
        lock.LocalLock(workdir).acquire()
    assert "is a symlink" in _one_line(info.value) and str(workdir / lock.LOCK) in str(info.value)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "kernels.json"])
def test_a_symlink_where_the_run_replaces_a_file_is_refused_and_kept(tmp_path, name):
    """Before: write_text_atomic renamed a new file over the user's symlink."""
    victim = _victim(tmp_path)
    (tmp_path / name).symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        workdir_lib.write_text_atomic(workdir_lib.run_path(tmp_path) / name, "{}\n")
    assert (tmp_path / name).is_symlink() and victim.read_text() == "precious\n"


def test_a_metrics_append_never_goes_through_a_symlink(tmp_path):
    """Before: JsonlSink opened metrics.jsonl with open("a"), following a link swapped in."""
    sink = sinks.JsonlSink(tmp_path, resume_step=0)
    victim = _victim(tmp_path)
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        sink.write(1, {"step": 1, "loss": 1.0})
    assert victim.read_text() == "precious\n"


def test_a_symlink_swapped_in_after_the_check_is_not_followed(tmp_path, monkeypatch):
    """O_NOFOLLOW: the name check passing and then a symlink appearing still refuses."""
    safe_files = _safe_files()
    victim = _victim(tmp_path)
    target = tmp_path / "metrics.jsonl"
    monkeypatch.setattr(safe_files, "check_regular", lambda *a, **k: True)
    target.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        safe_files.append_text(target, "row\n")
    assert victim.read_text() == "precious\n"


# ---- anything but a regular file is refused before it is opened --------------------------------
def _without_blocking(call, fifo):
    """``call()``'s exception (or None) in a thread; a call still blocked in open() on the FIFO
    after HANG_TIMEOUT is released by opening the FIFO's other end, and the test fails."""
    out = []

    def target():
        try:
            call()
            out.append(None)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out.append(e)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_TIMEOUT)
    if thread.is_alive():
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # unblocks a reader or a writer
        os.close(fd)
        thread.join(5)
        pytest.fail(f"blocked on the FIFO {fifo} for {HANG_TIMEOUT} s")
    return out[0]


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "run.lock"])
def test_a_fifo_in_the_workdir_is_refused_without_blocking(tmp_path, name):
    """Before: a FIFO at W/metrics.jsonl or W/config.json blocked start-up for ever; a FIFO
    run.lock was a traceback (ftruncate: EINVAL)."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    call = {"config.json": lambda: workdir_lib.read_config_json(fifo),
            "metrics.jsonl": lambda: workdir_lib.read_rows(fifo),
            "run.lock": lambda: lock.LocalLock(tmp_path).acquire()}[name]
    error = _without_blocking(call, fifo)
    assert isinstance(error, UnsafePathError), repr(error)
    assert "is a FIFO" in _one_line(error) and str(fifo) in str(error)


@pytest.mark.parametrize("make", ["directory", "fifo", "dangling_symlink"])
def test_check_regular_names_what_is_there(tmp_path, make):
    safe_files = _safe_files()
    path = tmp_path / "x"
    if make == "directory":
        path.mkdir()
    elif make == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(tmp_path / "missing")
    with pytest.raises(UnsafePathError) as info:
        safe_files.check_regular(path, follow_symlinks=True)
    assert str(path) in _one_line(info.value)
    assert not safe_files.check_regular(tmp_path / "absent")


def test_reading_follows_a_symlink_to_a_regular_file(tmp_path):
    """Data directories may link their files from elsewhere: reading changes nothing."""
    real = tmp_path / "real.json"
    real.write_text('{"a": 1}')
    (tmp_path / "link.json").symlink_to(real)
    assert json.loads(_safe_files().read_text(tmp_path / "link.json")) == {"a": 1}


# ---- a full disk is one line ------------------------------------------------------------------
def _full_disk(monkeypatch):
    def write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", write)


def test_disk_full_at_the_lock_write_is_one_line(tmp_path, monkeypatch):
    """Before: os.write's OSError (ENOSPC) escaped as a traceback."""
    held = lock.LocalLock(tmp_path / "run")
    _full_disk(monkeypatch)
    with pytest.raises(UserError) as info:
        held.acquire()
    line = _one_line(info.value)
    assert "ENOSPC" in line and str(tmp_path / "run" / lock.LOCK) in line
    monkeypatch.undo()
    assert held.fd is None  # released: a rerun after freeing space takes it
    again = lock.LocalLock(tmp_path / "run")
    again.acquire()
    again.release()


def test_disk_full_at_a_metrics_append_is_one_line(tmp_path, monkeypatch):
    """Before: the append's OSError escaped as a traceback from the training loop."""
    sink = sinks.JsonlSink(tmp_path, resume_step=0)
    _full_disk(monkeypatch)
    with pytest.raises(UserError) as info:
        sink.write(2, {"step": 2, "loss": 1.0})
    line = _one_line(info.value)
    assert "ENOSPC" in line and str(tmp_path / "metrics.jsonl") in line


def test_a_short_write_is_completed(tmp_path, monkeypatch):
    """os.write may write less than asked: the rest follows, the row is whole."""
    safe_files, real = _safe_files(), os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:3])))
    safe_files.append_text(tmp_path / "m.jsonl", '{"step": 1}\n')
    monkeypatch.undo()
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("name", ["metrics.jsonl", "changes.jsonl", "wandb_run_id"])
def test_the_layout_check_refuses_a_symlinked_run_file_before_any_write(tmp_path, name):
    """Before: a symlinked metrics.jsonl passed the layout check; the run read through it and
    renamed a new file over the link after writing config.json."""
    from prefixlm.run import preflight

    victim = _victim(tmp_path)
    (tmp_path / name).symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        preflight.check_layout(tmp_path)


def test_the_write_probe_never_writes_through_a_planted_symlink(tmp_path):
    """Before: the checkpoints/ probe was `.prefixlm-write-probe-<pid>`, written with
    write_text: a symlink planted at that name had its target overwritten with 'probe'."""
    from prefixlm.run import checkpoint as ckpt_lib

    victim = _victim(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f"{ckpt_lib.PROBE}-{os.getpid()}").symlink_to(victim)
    ckpt_lib.check_writable(tmp_path)
    assert victim.read_text() == "precious\n"
