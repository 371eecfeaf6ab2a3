"""Where metrics go: one ``Sink`` interface, three sinks (metrics.jsonl, TensorBoard, W&B).

``metrics.jsonl`` is the record: plots, the report and resume read it. TensorBoard and Weights &
Biases are views, each optional: a missing package or a failing service costs a warning, never
the run. ``problems`` checks them before anything is written (the run then drops a failing one
with a warning, or stops in one line with ``log.require=True``); a sink that still fails when
built or written is dropped with a warning. ``MetricsWriter`` fans one row out to every enabled
sink on process 0 only.

Resume semantics (all sinks): rows past the restored step were logged after the checkpoint the
run resumes from and will be logged again, so the jsonl drops them, TensorBoard purges them
(``purge_step``) and W&B resumes the same run id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
from typing import Protocol

from prefixlm.core import safe_files
from prefixlm.core.safe_files import is_remote
from prefixlm.run.workdir import read_rows, run_path, write_text_atomic

log = logging.getLogger("prefixlm.run.sinks")


class Sink(Protocol):
    def write(self, step: int, row: dict) -> None: ...
    def close(self) -> None: ...


def jsonable(v):
    """A JSON value for a metric: numbers as float/int, non-finite floats as strings."""
    if v is None or isinstance(v, str | bool | int):
        return v
    v = float(v)
    return v if math.isfinite(v) else str(v)


class JsonlSink:
    """``DIR/metrics.jsonl``: appended locally (``tail -f`` works); rewritten whole on object
    storage, which cannot append (the file stays small: one line per log step)."""

    def __init__(self, workdir, resume_step: int):
        self.path = run_path(workdir) / "metrics.jsonl"
        self.remote = is_remote(self.path)
        self.rows: list[dict] = []
        if self.path.exists():
            self.rows = [r for r in read_rows(self.path) if r.get("step", 0) <= resume_step]
            self._rewrite()  # also drops a torn tail, so the next append starts a fresh line

    def _rewrite(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, step: int, row: dict) -> None:
        """Appends one row. A full disk or a file swapped for a symlink or FIFO stops the run in
        one line (``safe_files``); a row cut short is a torn last line, dropped on resume."""
        self.rows.append(row)
        if self.remote:
            self._rewrite()
        else:
            safe_files.append_text(self.path, json.dumps(row) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """``DIR/tensorboard`` events. For a remote workdir the events are written to a local
    temporary directory and copied whole after each row (TensorBoard reads them from there)."""

    def __init__(self, workdir, resume_step: int):
        from tensorboardX import SummaryWriter

        self.target = run_path(workdir) / "tensorboard"
        self.local = tempfile.mkdtemp(prefix="prefixlm-tb-") if is_remote(self.target) else None
        self.tb = SummaryWriter(self.local or os.fspath(self.target), purge_step=resume_step + 1)

    def write(self, step: int, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        self.tb.flush()
        self._sync()

    def _sync(self) -> None:
        if self.local is None:
            return
        self.target.mkdir(parents=True, exist_ok=True)
        for f in pathlib.Path(self.local).rglob("*"):
            if f.is_file():
                dest = self.target / f.relative_to(self.local).as_posix()
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())

    def close(self) -> None:
        self.tb.close()
        self._sync()
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)
            self.local = None


class WandbSink:
    """A Weights & Biases run (``log.wandb=PROJECT``). The run id is derived from the workdir
    and kept in ``DIR/wandb_run_id``, so a resumed run continues the same W&B run. ``mode``
    is W&B's: "online", "offline" (sync later with ``wandb sync``) or "" for its default
    (the ``WANDB_MODE`` environment variable)."""

    def __init__(self, workdir, resume_step: int, *, project: str, config: dict, name: str,
                 entity: str = "", mode: str = ""):
        import wandb

        workdir = run_path(workdir)
        id_file = workdir / "wandb_run_id"
        if id_file.exists():
            run_id = safe_files.read_text(id_file).strip()
        else:
            run_id = hashlib.sha1(os.fspath(workdir).encode()).hexdigest()[:16]
            write_text_atomic(id_file, run_id + "\n")
        local = None if is_remote(workdir) else os.fspath(workdir)
        self.run = wandb.init(project=project, entity=entity or None, name=name, id=run_id,
                              resume="allow", config=config, dir=local, mode=mode or None,
                              reinit="finish_previous")
        self.resume_step = resume_step

    def write(self, step: int, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"
                      and isinstance(v, int | float) and not isinstance(v, bool)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_key_known() -> bool:
    """An API key W&B can find without asking (env or ~/.netrc); the service itself is only
    reached when the sink is built."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _tensorboard_problem(workdir) -> str | None:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return "tensorboardX is not installed (pip install tensorboardX)"
    target = run_path(workdir) / "tensorboard"
    if target.exists() and not target.is_dir():
        return f"{target} is a file, not a directory"
    return None


def _wandb_problem(log_config) -> str | None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return "wandb is not installed (pip install wandb)"
    mode = log_config.get("wandb_mode", "") or os.environ.get("WANDB_MODE", "")
    if mode not in ("offline", "disabled") and not _wandb_key_known():
        return ("no W&B API key (set WANDB_API_KEY or run `wandb login`, or set "
                "log.wandb_mode=offline)")
    return None


def problems(workdir, log_config) -> dict[str, str]:
    """{config field that enables the sink: why it cannot work} for each enabled optional sink,
    found without writing anything (called before the run's first file)."""
    get = (lambda k, d: log_config.get(k, d)) if log_config is not None else (lambda k, d: d)
    out = {}
    if get("tensorboard", True) and (why := _tensorboard_problem(workdir)):
        out["log.tensorboard"] = why
    if get("wandb", "") and (why := _wandb_problem(log_config)):
        out["log.wandb"] = why
    return out


class MetricsWriter:
    """Sends each row to metrics.jsonl and, when enabled and installed, TensorBoard and W&B.

    Only process 0 writes (``enabled``). ``log_config`` is the run config's ``log`` section:
    ``tensorboard`` (bool), ``wandb`` (project, "" = off), ``wandb_entity``, ``wandb_mode``.
    """

    def __init__(self, workdir, resume_step: int, enabled: bool, log_config=None,
                 run_config: dict | None = None, name: str = ""):
        self.enabled = enabled
        self.sinks: list[Sink] = []
        self.jsonl: JsonlSink | None = None
        if not enabled:
            return
        self.jsonl = JsonlSink(workdir, resume_step)
        self.sinks.append(self.jsonl)
        get = (lambda k, d: log_config.get(k, d)) if log_config is not None else (lambda k, d: d)
        builders = []
        if get("tensorboard", True):
            builders.append(("log.tensorboard", lambda: TensorBoardSink(workdir, resume_step)))
        if get("wandb", ""):
            builders.append(("log.wandb", lambda: WandbSink(
                workdir, resume_step, project=get("wandb", ""), config=run_config or {},
                name=name, entity=get("wandb_entity", ""), mode=get("wandb_mode", ""))))
        for field, build in builders:
            try:
                self.sinks.append(build())
            except Exception as e:  # noqa: BLE001 - an optional view never costs the run
                if get("require", False):
                    raise
                log.warning("%s could not start (%s: %s); continuing without it", field,
                            type(e).__name__, str(e).strip().splitlines()[0][:200] if str(e)
                            .strip() else "")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: jsonable(v) for k, v in metrics.items()}}
        for sink in list(self.sinks):
            if sink is self.jsonl:
                sink.write(step, row)  # the record: a failure here must stop the run
                continue
            try:
                sink.write(step, row)
            except Exception as e:  # noqa: BLE001 - a view failing never costs the run
                log.warning("%s failed (%s); continuing without it", type(sink).__name__, e)
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
