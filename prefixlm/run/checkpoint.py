"""Orbax checkpoints of a run: parameters, optimizer state + step + RNG, and the data iterator.

Layout: ``DIR/checkpoints/<step>/{params,train,data}``. The three items are separate so that
export and evaluation can restore ``params`` alone (``restore_params``) without building an
optimizer or a data pipeline, and so the data iterator's state goes through grain's own orbax
handler (one JSON file per JAX process).

Saves are asynchronous: ``save`` returns once arrays are copied to host memory (so the train
step may donate and overwrite them) and orbax writes in a background thread. A checkpoint
directory only appears under its final name once complete, so a run killed mid-save resumes
from the previous checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

from prefixlm.core import errors, safe_files
from prefixlm.run import hosts
from prefixlm.run import workdir as workdir_lib
from prefixlm.run.manifest import MANIFEST, verify, write_manifest

log = logging.getLogger("prefixlm.run.checkpoint")


def _checkpoints_dir(workdir: str | os.PathLike) -> epath.Path:
    """``WORKDIR/checkpoints``, local (absolute) or remote (``gs://``; pathlib would mangle it)."""
    return workdir_lib.run_path(workdir) / "checkpoints"


class _FinalizedSteps:
    """orbax's standard step names (``<step>``), listing only the steps orbax finalized (its
    metadata file is there). orbax alone takes any integer-named directory for a step, so a
    user's ``checkpoints/3/`` would be deleted by ``max_to_keep``: stray names are never
    touched."""

    def __init__(self):
        self._standard = ocp.step.standard_name_format()

    def build_name(self, step: int) -> str:
        return self._standard.build_name(step)

    def find_all(self, base_path):
        return [m for m in self._standard.find_all(base_path)
                if (epath.Path(m.path) / "_CHECKPOINT_METADATA").exists()]

    def find_step(self, base_path, step: int):
        return self._standard.find_step(base_path, step)


def _manager(directory: epath.Path, *, max_to_keep: int | None = None,
             async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        # The step directory is made in the caller's thread, so an unwritable checkpoints/
        # raises in save(); made in orbax's thread, the failure left the save waiting for ever.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=not read_only,
        read_only=read_only,
        step_name_format=_FinalizedSteps(),
    )
    return ocp.CheckpointManager(os.fspath(directory), options=options)


ITEMS = ("params", "train", "data")  # what a complete training checkpoint holds


class CheckpointError(errors.UserError, RuntimeError):
    """No intact checkpoint to restore, or none can be saved where asked: one line, exit 2."""


def _step_dirs(directory: epath.Path) -> list[int]:
    """Step numbers of the checkpoint directories under ``directory``.

    Only a directory whose name is a plain integer (``40``, not ``0040`` or ``40.bak``) is a
    step; anything else (a file, a user's copy) is named in a warning and left alone, so a stray
    name never blocks a resume.
    """
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.iterdir():
        if p.name.isdigit() and str(int(p.name)) == p.name and p.is_dir():
            steps.append(int(p.name))
        elif not p.name.endswith(ORBAX_TMP) and not p.name.startswith(PROBE):
            log.warning("ignoring %s: not a checkpoint step (a step is a directory named by "
                        "its integer step)", p)
    return sorted(steps)


ORBAX_TMP = ".orbax-checkpoint-tmp"  # a save in progress (or cut short): orbax cleans it up
PROBE = ".prefixlm-write-probe"


def check_writable(workdir: str | os.PathLike) -> None:
    """Raises CheckpointError unless ``WORKDIR/checkpoints`` can be written, before the first
    step: a save that fails inside orbax's background threads can otherwise hang the process.
    Writes and removes one probe file (object storage: one object) in the nearest existing
    directory; permissions alone would not tell (root ignores them, read-only mounts do not)."""
    directory = _checkpoints_dir(workdir)
    target = directory
    while not target.exists() and target.parent != target:
        target = target.parent
    if not target.is_dir():
        raise CheckpointError(f"cannot save checkpoints in {directory}: {target} is a file, not "
                              "a directory; move it aside or use another --workdir")
    try:
        if safe_files.is_remote(target):
            probe = target / f"{PROBE}-{os.getpid()}"
            probe.write_text("probe")
            probe.unlink()
        else:  # a new name (O_EXCL): a symlink planted at a guessable name is never written
            fd, name = tempfile.mkstemp(prefix=PROBE, dir=os.fspath(target))
            os.close(fd)
            os.unlink(name)
    except Exception as e:  # noqa: BLE001 - any storage error means the saves would fail
        raise CheckpointError(f"cannot save checkpoints in {directory}: {target} is not "
                              f"writable ({type(e).__name__}: {_first_line(e)}); fix its "
                              "permissions or mount, or use another --workdir") from e


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def is_complete(step_dir: epath.Path, items=ITEMS) -> bool:
    """Orbax finalized this step (its metadata file exists) and every item directory is there.

    An empty or half-copied ``checkpoints/99/`` (a user's ``mkdir``, a sync that died) is not a
    checkpoint, whatever orbax's step listing says.
    """
    return (step_dir / "_CHECKPOINT_METADATA").exists() and all(
        (step_dir / item).is_dir() for item in items)


def _quarantine(directory: epath.Path, step: int, why: str) -> None:
    """Moves a bad step out of orbax's sight (``checkpoints_bad/<step>``), keeping the evidence;
    orbax would otherwise refuse to save that step again. Process 0 only."""
    if jax.process_index() != 0:
        return
    bad = directory.parent / "checkpoints_bad"
    bad.mkdir(parents=True, exist_ok=True)
    target = bad / f"{step}"
    if target.exists():
        target = bad / f"{step}.{int(time.time())}"
    src = directory / str(step)
    if safe_files.is_remote(src):
        src.rmtree()  # object storage has no rename; the warning below is the record
    else:
        os.replace(src, target)
    log.warning("checkpoint %s is unusable (%s); moved aside to %s", src, why, target)


class Checkpointer:
    """A CheckpointManager for one training run (``DIR/checkpoints``), with health checks.

    Trust: a step is trusted only with a manifest (file sizes and sha256) that the process which
    saved it wrote after orbax committed it; a process never writes one for a step it did not
    save. ``restore_latest`` walks the steps newest first: a step that is incomplete, differs
    from its manifest, does not restore, or holds non-finite parameters is moved aside
    (``checkpoints_bad/``) with a warning and the previous one is tried, so corruption costs one
    checkpoint interval, not the run. A step without a manifest (the saving run died first) is
    restored, checked (finite parameters, its identity) and adopted or moved aside. Only a
    genuine config mismatch (another process count) refuses in one line.

    A save that fails, synchronously or in orbax's background thread, raises CheckpointError
    naming the path (exit 2), from ``save``, ``wait`` or ``close``: never a hang.
    """

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int, async_save: bool = True,
                 identity: dict | None = None, allow_changes=(), data_path: str | None = None):
        self.directory = _checkpoints_dir(workdir)
        self.manager = _manager(self.directory, max_to_keep=max_to_keep, async_save=async_save)
        self.expected_identity = identity  # what an unverified step's identity must match
        self.allow_changes = set(allow_changes)
        self.data_path = data_path  # today's real data.path, for identities older than it
        self._mine: set[int] = set()  # steps this process saved whose manifest is not written
        self._failed = False

    def latest_step(self) -> int | None:
        """The newest complete step (not verified; ``restore_latest`` verifies)."""
        steps = [s for s in _step_dirs(self.directory) if is_complete(self.directory / str(s))]
        return steps[-1] if steps else None

    def _finish_manifests(self) -> None:
        """Writes the manifest of every step this process saved and orbax has committed."""
        mine, self._mine = self._mine, set()
        if jax.process_index() != 0:
            return
        for s in sorted(mine):
            step_dir = self.directory / str(s)
            if is_complete(step_dir):  # max_to_keep may have removed it already
                write_manifest(step_dir)

    def _save_error(self, step: int, e: BaseException) -> CheckpointError:
        self._failed = True
        return CheckpointError(
            f"checkpoint {self.directory / str(step)} could not be saved ({type(e).__name__}: "
            f"{_first_line(e)}); free space or fix permissions on {self.directory}, then run the "
            "same command again to resume from the last good checkpoint")

    def _refuse_stray(self, step: int) -> None:
        """Stops (CheckpointError, one line) before a save that would land on a name this run
        did not make: orbax would replace a stray ``checkpoints/<step>`` (a file, a link, a
        user's folder) with its step directory. Every step directory the run knows was either
        restored, moved aside or never existed, so anything there now is not the run's."""
        target = self.directory / str(step)
        if safe_files.is_remote(target) or not os.path.lexists(target):
            return
        kind = ("a symlink" if os.path.islink(target) else "a directory"
                if os.path.isdir(target) else "a file")
        raise CheckpointError(
            f"checkpoint step {step} would be saved at {target}, which holds {kind} this run did "
            "not write; it is left as it is: move it aside, then run the same command again to "
            "resume from the last checkpoint")

    def save(self, step: int, state: dict, data_iterator, identity: dict | None = None) -> None:
        """Saves ``state`` ({"params", "opt_state", "step", "rng"}), the iterator and the run's
        identity (the config fields that change results) at ``step``."""
        import grain.checkpoint

        self._refuse_stray(step)
        self.wait()  # the previous async save is committed (or raises): hash it
        self._finish_manifests()
        items = dict(
            params=ocp.args.StandardSave(state["params"]),
            train=ocp.args.StandardSave({k: v for k, v in state.items() if k != "params"}),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        if identity is not None:
            items["identity"] = ocp.args.JsonSave(identity)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - whatever orbax raised, the save is lost
            raise self._save_error(step, e) from e
        self._mine.add(step)

    def restore(self, step: int, abstract_state: dict, data_iterator) -> dict:
        """Restores into ``abstract_state``'s shapes/shardings; sets the iterator's state."""
        self.restore_data(step, data_iterator)
        return self.restore_arrays(step, abstract_state)

    def restore_data(self, step: int, data_iterator) -> None:
        """Sets the iterator's state from this process's own file of ``step`` (grain keeps one
        per process). A local read, no collective: it goes first, so a file that fails on one
        process fails before any process enters orbax's collective restore of the arrays."""
        import grain.checkpoint

        grain.checkpoint.CheckpointHandler().restore(self.directory / str(step) / "data",
                                                     item=data_iterator)

    def restore_arrays(self, step: int, abstract_state: dict) -> dict:
        """The state's arrays of ``step`` (a collective restore on every process)."""
        abstract_train = {k: v for k, v in abstract_state.items() if k != "params"}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            train=ocp.args.StandardRestore(abstract_train),
        ))
        return {"params": out["params"], **out["train"]}

    def identity(self, step: int) -> dict | None:
        """The identity saved with ``step`` (None for checkpoints older than identities)."""
        if not (self.directory / str(step) / "identity").is_dir():
            return None
        out = self.manager.restore(step, args=ocp.args.Composite(
            identity=ocp.args.JsonRestore()))
        return dict(out["identity"])

    def _judge(self) -> tuple[int, list]:
        """Process 0 picks the newest step whose files are whole: (step or -1, [(bad, why)]).
        A storage error is raised on every process (the others would wait for process 0)."""
        chosen, faults, error = -1, [], None
        if jax.process_index() == 0:
            for s in reversed(_step_dirs(self.directory)):
                step_dir = self.directory / str(s)
                try:
                    why = (None if is_complete(step_dir)
                           else "incomplete: no orbax metadata or items") or verify(step_dir)
                except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
                    error = CheckpointError(f"cannot check checkpoint {step_dir} ({e}); fix the "
                                            "storage, or move the step aside, and resume")
                    break
                if why is None:
                    chosen = s
                    break
                faults.append((s, why))
        if _agreed_fault(str(error) if error else None) is not None:
            raise error or CheckpointError(f"process 0 cannot check the checkpoints in "
                                           f"{self.directory} (see its log)")
        return int(hosts.from_process_0(chosen)), faults

    def _set_aside(self, faults: list) -> None:
        if jax.process_index() == 0:
            for s, why in faults:
                _quarantine(self.directory, s, why)
        hosts.barrier("prefixlm-checkpoint-quarantine")
        if int(hosts.from_process_0(len(faults))):
            self.manager.reload()

    def _check_process_count(self, step: int) -> None:
        """The one restore failure that is the user's config: another number of processes
        (grain saved one iterator file per process). Refused, the step kept."""
        names = [p.name for p in (self.directory / str(step) / "data").iterdir()]
        counts = {n.rsplit("-of-", 1)[1].removesuffix(".json") for n in names if "-of-" in n}
        if counts and str(jax.process_count()) not in counts:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} was saved by {'/'.join(counts)} "
                f"processes and this run has {jax.process_count()}; the data iterator's state "
                "is per process. Resume with the process count it was saved with")

    def _unverified_fault(self, step: int) -> str | None:
        """Why a step without a manifest cannot be adopted (its identity), or None."""
        try:
            saved = self.identity(step)
        except Exception as e:  # noqa: BLE001 - an unreadable identity is corruption
            return f"no manifest and its identity does not restore ({_first_line(e)})"
        if saved is None or self.expected_identity is None:
            return None
        changes = workdir_lib.identity_diff(saved, self.expected_identity, self.data_path)
        differ = sorted(k for k in changes if k not in self.allow_changes)
        return f"no manifest and its identity differs ({', '.join(differ)})" if differ else None

    def _try_restore(self, step: int, abstract_state: dict, data_iterator):
        """(state, None) when ``step`` restores and passes its checks, else (None, why).

        Every process takes the same path through the same collectives whatever fails where:
        each fallible stage ends in an agreement (``hosts.any_process``), so a step that fails
        on one process only (its own data file corrupt) fails on all of them alike, and no
        process goes on to a collective (the finite check, the identity restore) that another
        skipped."""
        state, why = None, None
        try:
            self.restore_data(step, data_iterator)
        except Exception as e:  # noqa: BLE001 - the step's fault (its identity matched)
            why = f"its data-iterator state does not restore ({type(e).__name__}: " \
                  f"{_first_line(e)})"
        if (why := _agreed_fault(why)) is not None:
            return None, why
        try:
            state = self.restore_arrays(step, abstract_state)
        except Exception as e:  # noqa: BLE001 - the step's fault (its identity matched)
            why = f"does not restore ({type(e).__name__}: {_first_line(e)})"
        if (why := _agreed_fault(why)) is not None:
            return None, why
        if not params_finite(state["params"]):  # a global reduction: one answer everywhere
            return None, "non-finite parameters"
        verified = bool(hosts.from_process_0((self.directory / str(step) / MANIFEST).exists()))
        if not verified:
            if (why := _agreed_fault(self._unverified_fault(step))) is not None:
                return None, why
            log.warning("checkpoint %s has no manifest (the run that saved it stopped first); "
                        "restored, checked (finite parameters, identity) and adopted",
                        self.directory / str(step))
        return state, None

    def restore_latest(self, abstract_state: dict, data_iterator):
        """(step, state) of the newest intact checkpoint, or None when there is none at all.

        Process 0 judges the files and every process restores the step it chose; a step that
        fails on any process is moved aside on all and the previous one is tried, so all
        resume from the same step.
        """
        if not bool(hosts.from_process_0(bool(_step_dirs(self.directory)))):
            return None
        faults: list = []
        while True:
            chosen, bad = self._judge()
            self._set_aside(bad)
            faults += bad
            if chosen < 0:
                raise CheckpointError(
                    f"no intact checkpoint in {self.directory}: "
                    + "; ".join(f"step {s}: {w}" for s, w in faults)
                    + f". The bad steps are in {self.directory.parent / 'checkpoints_bad'}; "
                    "rerun with --restart to move the old record aside and start again")
            self._check_process_count(chosen)
            state, why = self._try_restore(chosen, abstract_state, data_iterator)
            if why is None:  # an answer every process shares (_agreed_fault)
                return chosen, state
            bad = [(chosen, why)]
            self._set_aside(bad)
            faults += bad

    def wait(self) -> None:
        """Blocks until the pending async save is committed; raises CheckpointError if it
        failed (never retried: the next save or close would wait on it for ever)."""
        if self._failed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(max(self._mine, default=-1), e) from e

    def close(self) -> None:
        """Commits the last save and writes its manifest. After a failed save nothing is
        waited for (orbax's threads may never finish)."""
        if self._failed:
            return
        self.wait()
        self._finish_manifests()
        self.manager.close()


def _agreed_fault(why: str | None) -> str | None:
    """One answer on every process: None when no process found a fault, else the first one
    found (naming its process), so all of them take the same path afterwards."""
    if jax.process_count() == 1:
        return why
    for i, text in enumerate(hosts.gather_text(why or "")):
        if text:
            return text if i == 0 else f"on process {i}: {text}"
    return None


@jax.jit
def _all_finite(tree) -> jax.Array:
    import jax.numpy as jnp

    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def params_finite(params) -> bool:
    """Every parameter is finite: checked before each save (so no checkpoint is poisoned by an
    update that overflowed while the loss still looked fine) and after each restore. One jitted
    global reduction: every process gets the same answer, with one device-to-host read."""
    return bool(_all_finite(params))


def all_steps(workdir: str | os.PathLike) -> list[int]:
    """Complete checkpoint steps of a run, oldest first."""
    directory = _checkpoints_dir(workdir)
    return [s for s in _step_dirs(directory) if is_complete(directory / str(s), ("params",))]


def restore_params(workdir: str | os.PathLike, abstract_params, step: int | None = None):
    """(params, step): the parameters alone of checkpoint ``step`` (None = newest intact)."""
    directory = _checkpoints_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} does not exist: {workdir} holds no checkpoints; train with "
            f"`python -m prefixlm.main --config=... --workdir={workdir}` first")
    steps = all_steps(workdir)
    if not steps:
        bad = directory.parent / "checkpoints_bad"
        raise FileNotFoundError(
            f"{directory} holds no finished checkpoint"
            + (f"; the unusable ones were moved aside to {bad}" if bad.is_dir() else ""))
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; "
                                f"available: {steps}")
    candidates = [step] if step is not None else list(reversed(steps))
    mngr = _manager(directory, read_only=True)
    faults = []
    try:
        for s in candidates:
            why = verify(directory / str(s))
            if why is None:
                try:
                    out = mngr.restore(s, args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract_params)))
                    if not params_finite(out["params"]):
                        raise FloatingPointError("non-finite parameters")
                    if faults:
                        log.warning("skipped corrupt checkpoint(s) %s; using step %d", faults, s)
                    return out["params"], int(s)
                except Exception as e:  # noqa: BLE001 - try the previous step
                    why = f"restore failed: {type(e).__name__}: {_first_line(e)}"
            faults.append(f"step {s}: {why}")
        raise CheckpointError(f"no intact checkpoint in {directory}: {'; '.join(faults)}")
    finally:
        mngr.close()


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of ``tree`` (with ``shardings`` when given) for a restore target."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
