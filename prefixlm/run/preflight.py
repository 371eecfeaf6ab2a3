"""What a run checks about its workdir before it writes anything (after the config resolved).

``claimed(workdir, config, restart=...)`` is the one entry: it holds the workdir's lock
(prefixlm.run.lock) for the run and, under it, checks in this order, each failure one line
(ConfigError or CheckpointError: exit 2):

1. the layout: every name the run writes is of the right kind (a directory where a directory
   belongs, a regular file where a file belongs: never a symlink or a FIFO, see
   prefixlm.core.safe_files) and config.json parses;
2. ``--restart``: the old record (metrics, evaluations, checkpoints, bad checkpoints, config)
   moves into ``WORKDIR/restarted-<time>/``; nothing is deleted, and a restart that a kill cut
   short is finished by the next start (before step 1), so it is all or nothing;
3. history is evidence: metrics.jsonl with rows past step 0 but no checkpoint to resume from
   is refused (a silent restart would truncate the record), unless ``--restart``;
4. ``checkpoints/`` is writable (a save failing inside orbax must not be the first sign);
5. the optional sinks (TensorBoard, W&B) can work: a failing one is dropped with a warning
   (the config it returns has it off), or, with ``log.require=True``, the run stops here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax
import ml_collections

from prefixlm.config import ConfigError
from prefixlm.core import safe_files
from prefixlm.run import checkpoint, hosts, lock, sinks
from prefixlm.run import workdir as workdir_lib

log = logging.getLogger("prefixlm.run.preflight")

FILES = ("metrics.jsonl", "config.json", "changes.jsonl", "kernels.json", "wandb_run_id")
# (tensorboard/ is the sink check's: a file there costs the sink, not the run)
DIRS = ("checkpoints", "checkpoints_bad", "eval", "profile")
RESTARTED = "restarted-"  # prefix of the folders --restart moves an old record into


def check_layout(workdir) -> None:
    """Each name the run writes has the right kind; config.json (if any) parses."""
    root = workdir_lib.run_path(workdir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file, not a directory; use another path")
    for name in FILES + DIRS:
        path = root / name
        if not path.exists():
            continue
        if name in FILES and path.is_dir():
            raise ConfigError(f"{path} is a directory where the run keeps a file; move it "
                              "aside (or use another --workdir)")
        if name in DIRS and not path.is_dir():
            raise ConfigError(f"{path} is a file where the run keeps a directory; move it "
                              "aside (or use another --workdir)")
        if name in FILES:
            safe_files.check_regular(path)  # a symlink, FIFO or device: one line, unopened
    if (root / "config.json").exists():
        workdir_lib.read_config_json(root / "config.json")


def history_steps(workdir) -> int:
    """The last step metrics.jsonl records (0 when there is none)."""
    path = workdir_lib.run_path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((int(r.get("step", 0)) for r in workdir_lib.read_rows(path)
                if isinstance(r.get("step", 0), int | float)), default=0)


def check_history(workdir) -> None:
    """Refuses a workdir whose metrics record training but whose checkpoints are gone."""
    last = history_steps(workdir)
    if last > 0 and not checkpoint.all_steps(workdir):
        root = workdir_lib.run_path(workdir)
        bad = root / "checkpoints_bad"
        where = f" (the unusable ones are in {bad})" if bad.exists() else ""
        raise ConfigError(
            f"{root / 'metrics.jsonl'} records training to step {last} but {root / 'checkpoints'}"
            f" holds no checkpoint to resume from{where}; starting again would overwrite that "
            "record. Rerun with --restart to move the old record aside and start at step 0")


JOURNAL = ".restart-moving.json"  # in a restarted-* folder while its move is under way


def move_aside(workdir) -> str | None:
    """Moves everything of the previous run into WORKDIR/restarted-<time>/ (nothing deleted);
    the folder's path, or None when there was nothing to move.

    All or nothing across a kill: the names to move are written to the folder's journal
    (JOURNAL) before the first one moves, and any start that finds a journal finishes that move
    (``finish_interrupted_restart``) before it looks at the workdir, so a restart cut short never
    leaves half the old record beside the new run."""
    root = workdir_lib.run_path(workdir)
    if not root.is_dir():
        return None
    names = sorted(p.name for p in root.iterdir()
                   if p.name not in (lock.LOCK, lock.LEASE) and not p.name.startswith(RESTARTED))
    if not names:
        return None
    stamp = RESTARTED + time.strftime("%Y%m%d-%H%M%S")
    target, n = root / stamp, 1
    while target.exists():  # a restart within the same second, or a folder of that name
        target, n = root / f"{stamp}-{n}", n + 1
    target.mkdir()
    workdir_lib.write_text_atomic(target / JOURNAL, json.dumps({"names": names}) + "\n")
    _move_names(root, target, names)
    return os.fspath(target)


def _move_names(root, target, names) -> None:
    """Moves each of ``names`` still in ``root`` into ``target``, then drops the journal."""
    for name in names:
        src = root / name
        if not (src.exists() or os.path.islink(os.fspath(src))):
            continue  # moved before a kill
        if safe_files.is_remote(root):
            _copy_tree(src, target / name)
            if src.is_dir():
                src.rmtree()
            else:
                src.unlink()
        else:
            os.replace(src, target / name)
    (target / JOURNAL).unlink()
    log.warning("--restart: moved the previous record of %s (%s) to %s", root,
                ", ".join(names), target)


def finish_interrupted_restart(workdir) -> None:
    """Completes a ``--restart`` that a kill cut short (its folder still holds the journal)."""
    root = workdir_lib.run_path(workdir)
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.name.startswith(RESTARTED)):
        journal = folder / JOURNAL
        if not journal.exists():
            continue
        try:
            names = json.loads(journal.read_text())["names"]
            if not (isinstance(names, list) and all(isinstance(n, str) and "/" not in n
                                                    and n not in ("", ".", "..")
                                                    for n in names)):
                raise ValueError("names is not a list of file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{journal}: a --restart was cut short and its journal cannot be read ({e}); "
                f"move the rest of the old record into {folder} by hand and delete the "
                "journal") from None
        log.warning("finishing a --restart that was cut short: moving the rest of the old "
                    "record into %s", folder)
        _move_names(root, folder, names)


def _copy_tree(src, dst) -> None:
    """Object storage has no rename: copy, then the caller deletes."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            _copy_tree(child, dst / child.name)
    else:
        src.copy(dst)


def drop_failing_sinks(workdir, config):
    """The config with each optional sink that cannot work turned off (a warning per sink);
    ConfigError when ``log.require`` is set."""
    if "log" not in config:
        return config
    found = sinks.problems(workdir, config.log)
    if not found:
        return config
    shown = "; ".join(f"{k}: {why}" for k, why in found.items())
    if config.log.get("require", False):
        raise ConfigError(f"{shown} (log.require=True makes every enabled sink required; fix "
                          "it, or drop log.require to run without it)")
    log.warning("%s; training goes on without it (log.require=True would stop here)", shown)
    config = ml_collections.ConfigDict(config.to_dict())
    for field in found:
        config.log[field.split(".", 1)[1]] = "" if field == "log.wandb" else False
    return config


def _check(workdir, config, restart: bool):
    """Steps 1-5 of the module docstring, on process 0 (it owns the files)."""
    finish_interrupted_restart(workdir)
    check_layout(workdir)
    if restart:
        move_aside(workdir)
    check_history(workdir)
    checkpoint.check_writable(workdir)
    return drop_failing_sinks(workdir, config)


@contextlib.contextmanager
def claimed(workdir, config, *, restart: bool = False):
    """Holds the workdir's lock for the body and yields the config to run (checked)."""
    with lock.hold(workdir):
        error = None
        if jax.process_index() == 0:
            try:
                config = _check(workdir, config, restart)
            except Exception as e:  # noqa: BLE001 - raised below on every process alike
                error = e
        if bool(hosts.from_process_0(error is not None)):
            raise error or ConfigError(f"{workdir}: process 0 refused the workdir (see its log)")
        if jax.process_count() > 1:
            hosts.barrier("prefixlm-preflight")  # the others wait for a --restart's move
        yield config
