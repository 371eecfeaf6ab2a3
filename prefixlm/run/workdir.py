"""The run directory, local or ``gs://``: paths, atomic writes, config.json and metrics sinks.

Everything a run writes besides checkpoints goes through here, so object storage (no appends, no
renames) and local disks (atomic rename) are handled in one place.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time

import ml_collections
import numpy as np
from etils import epath

from prefixlm.core import safe_files, schemas
from prefixlm.core.errors import ConfigError  # not via prefixlm.config, which imports JAX


def run_path(workdir) -> epath.Path:
    """``workdir`` as an ``etils.epath.Path``: a local path (made absolute) or ``gs://...``.

    Everything written into a run directory (metrics.jsonl, config.json, TensorBoard, and the
    checkpoints through orbax) goes through this path layer, so ``--workdir=gs://bucket/run``
    works like a local directory. (``pathlib`` cannot: it folds ``gs://`` into ``gs:/``.)
    """
    text = os.fspath(workdir)
    if not text.strip():
        raise ConfigError("--workdir is empty; name the run directory (a local path or "
                          "gs://bucket/dir), it is never the current directory by default")
    if not safe_files.is_remote(text):
        return epath.Path(text).absolute()
    scheme = text.split("://", 1)[0]
    try:
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
            raise KeyError(scheme)
        return epath.Path(text)
    except KeyError:
        raise ConfigError(
            f"{text!r}: '://' makes a path object storage, and {scheme + '://'!r} is not a "
            "storage scheme this install knows (gs:// needs gcsfs); a local path cannot contain "
            "'://': rename it") from None


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Replaces ``path``'s contents at once: a reader sees the old or the new file, never half.
    Only a missing name or a regular file is replaced (``safe_files.replace_text``)."""
    safe_files.replace_text(path if safe_files.is_remote(path) else os.fspath(path), text)


# Fields that change memory, speed or bookkeeping but not what is trained: they may differ
# between a run and its resume. Everything else is the run's identity. (grad_accum and the mesh
# change the order of float sums, so a resume under new ones is exact to rounding, not bits.
# data.worker_count is identity: grain's saved iterator state has another layout per count.)
# data.path is where the data is, not what it is: data.fingerprint (``pin_data``) is identity.
NOT_IDENTITY = ("name", "preset", "log_every", "progress", "peak_flops", "grad_accum",
                "xla_flags", "model.attention", "model.attention_fallback", "model.remat",
                "model.remat_policy",
                "objective.chunk_size", "data.prefetch_threads", "data.path",
                "eval.", "checkpoint.", "mesh.", "log.", "profile.")


# Identity fields that --allow_changes can never change: they define which run this is (its
# name, its init and data order, its objective and model, its data), so a change would relabel
# training done under other values. data.worker_count is here too: grain's saved iterator state
# has another layout per worker count, so no checkpoint would restore. Every other identity
# field (train.*, optim.*, data.seq_len, ...) may change when named in --allow_changes.
IMMUTABLE = ("seed", "data_seed", "objective.", "model.", "data.fingerprint",
             "data.worker_count")


def is_immutable(field: str) -> bool:
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in IMMUTABLE)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity(config) -> dict:
    """The fields of a resolved config that change results, flattened ("optim.lr": 0.003)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    tree = json.loads(json.dumps(tree, default=str))  # tuples -> lists, as stored
    return {k: v for k, v in flatten(tree).items()
            if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in NOT_IDENTITY)}


def data_fingerprint(path) -> str | None:
    """What the token directory ``path`` holds, independent of where it is: a digest of its
    stats.json's tokenizer hash, dtype and every shard's token counts and content checksums
    (which the pipeline verifies against the files before training on them). None when there is
    no readable stats.json (the data check that follows names the problem). Shards tokenized
    before checksums were recorded are told apart by their token counts only."""
    import hashlib

    from prefixlm.data import shards

    try:
        stats = shards.read_stats(path)
        record = {"tokenizer_hash": stats.get("tokenizer_hash"), "dtype": stats.get("dtype"),
                  "shards": [{split: {k: shard[split].get(k) for k in ("tokens", "checksum")}
                              for split in shards.SPLITS if isinstance(shard.get(split), dict)}
                             for shard in stats["shards"]]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    text = json.dumps(record, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _pinned(path: str) -> str:
    """A local data path as a real path (one directory whatever the current directory); an
    object-store path (gs://...) as given, since realpath would make it a local one."""
    return str(path) if safe_files.is_remote(path) else os.path.realpath(os.path.expanduser(str(path)))


def pin_data(config) -> ml_collections.ConfigDict:
    """The resolved config with its data pinned: ``data.path`` and ``data.val_path`` as real
    paths (a relative path means one directory whatever the current directory of a resume) and
    ``data.fingerprint``, the content's identity (``data_fingerprint``). So the same data under
    another path resumes, and other data under the same path is another run."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.path = _pinned(c.data.path)
    if c.data.get("val_path"):
        c.data.val_path = _pinned(c.data.val_path)
    c.data.fingerprint = data_fingerprint(c.data.path)
    return c


@functools.cache
def _defaults() -> dict:
    """Today's default of every identity field (configs/base.py), for records that predate a
    field; {} where the configs package is not importable."""
    try:
        from configs import base
    except ImportError:
        return {}
    return identity(base.get_config())


def in_todays_terms(saved: dict, new: dict, data_path: str | None = None) -> dict:
    """A saved identity as today's code would record that run: a field added since it was
    written, whose value now is the field's default, takes that value (the run was trained
    under it before it could be named); a ``data.path`` from before data fingerprints stands for
    the data now at that path when it is the same directory (``data_path``: today's real path),
    and a ``data.val_path`` recorded as typed, before paths were pinned, is that path pinned."""
    out = dict(saved)
    if out.get("data.val_path"):
        out["data.val_path"] = _pinned(out["data.val_path"])
    defaults = _defaults()
    for k, v in new.items():
        if k not in out and k in defaults and defaults[k] == v:
            out[k] = v
    legacy_path = out.pop("data.path", None)
    if "data.fingerprint" not in out and "data.fingerprint" in new and legacy_path is not None:
        same = data_path is not None and os.path.realpath(str(legacy_path)) == data_path
        out["data.fingerprint"] = (new["data.fingerprint"] if same
                                   else f"the data at {legacy_path}")
    return out


def identity_diff(saved: dict, new: dict, data_path: str | None = None) -> dict:
    """{field: [saved value, new value]} for every identity field that differs."""
    saved = in_todays_terms(saved, new, data_path)
    return {k: [saved.get(k), new.get(k)] for k in sorted(set(saved) | set(new))
            if saved.get(k) != new.get(k)}


def saved_identity(workdir) -> dict | None:
    """The identity recorded in ``config.json`` (None for a fresh directory)."""
    path = run_path(workdir) / "config.json"
    return identity(read_config_json(path)) if path.exists() else None


def read_config_json(path) -> dict:
    """A run's config.json as a dict, checked against ``schemas.CONFIG``: SchemaError (one
    line naming the file and the field) when it is not JSON or not a config; UnsafePathError
    when it is not a regular file (a FIFO is never opened)."""
    return schemas.read_json(run_path(path), schemas.CONFIG, fix=(
        "restore it from a backup, or move it aside (the identity saved with the checkpoints "
        "still guards a resume)"))


def identity_changes(saved: dict, config) -> dict:
    """{field: [saved value, new value]} for every identity field that differs."""
    return identity_diff(saved, identity(config), config.data.get("path"))


def check_identity(workdir, saved: dict | None, config, allow_changes=()) -> dict:
    """Refuses to resume ``workdir`` under a config that would train something else.

    ``saved`` is the identity stored with the newest checkpoint (or config.json's). Returns the
    changes that ``allow_changes`` (field names) permits; raises ConfigError naming every other
    differing field with both values. Runs on every process, so all of them stop together.
    """
    if saved is None:
        return {}
    changes = identity_changes(saved, config)
    fixed = {k: v for k, v in changes.items() if is_immutable(k)}
    if fixed:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in fixed.items())
        data = (" (data.fingerprint is the content of data.path: its shards and tokenizer; "
                "the same shards under another path resume)" if "data.fingerprint" in fixed
                else "")
        raise ConfigError(
            f"{workdir} holds another run ({shown}){data}; seed, data_seed, objective.*, "
            "model.*, the data and data.worker_count define a run and cannot change, even with "
            "--allow_changes: use a new --workdir")
    refused = {k: v for k, v in changes.items() if k not in set(allow_changes)}
    if refused:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"{workdir} holds a run trained with other settings ({shown}); resume it with its "
            f"own config, use a new --workdir, or record a deliberate change with "
            f"--allow_changes={','.join(refused)}")
    return changes


def read_rows(path) -> list[dict]:
    """The rows of a metrics.jsonl (``schemas.METRICS_ROW``), dropping a torn last line (a
    write cut short by a full disk or a kill: the row it held is logged again after resume);
    any other bad line is a SchemaError naming the file, the line and the field."""
    return schemas.read_jsonl(run_path(path), schemas.METRICS_ROW)


def save_config(workdir, config, changes: dict | None = None, step: int = 0) -> None:
    """Writes ``config.json`` (the config now in force) and appends deliberate identity changes,
    with the step they took effect, to ``changes.jsonl``, so the record of how the run was
    trained survives the overwrite. Call only after every check has passed."""
    root = run_path(workdir)
    if changes:
        log_path = root / "changes.jsonl"
        old = safe_files.read_text(log_path) if log_path.exists() else ""
        entry = json.dumps({"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "changes": changes})
        write_text_atomic(log_path, old + entry + "\n")
    write_text_atomic(root / "config.json", config.to_json_best_effort(indent=2) + "\n")


def load_config(workdir) -> ml_collections.ConfigDict:
    path = run_path(workdir) / "config.json"
    if not safe_files.check_regular(path, follow_symlinks=True):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir")
    return ml_collections.ConfigDict(read_config_json(path))



def summarize(workdir, windows: int = 4) -> str:
    """A one-paragraph account of a run's metrics.jsonl: mean loss per stretch of steps."""
    rows = [r for r in read_rows(run_path(workdir) / "metrics.jsonl") if "loss" in r]
    if not rows:
        return f"{workdir}: no metrics yet"
    parts = np.array_split(np.arange(len(rows)), min(windows, len(rows)))
    stretch = [f"steps {rows[p[0]]['step']}-{rows[p[-1]]['step']}: loss "
               f"{np.mean([rows[i]['loss'] for i in p]):.3f} nll "
               f"{np.mean([rows[i]['nll'] for i in p]):.3f}" for p in parts]
    val = [f"{r['step']}: {r['val/nll']:.3f}" for r in rows if "val/nll" in r]
    speed = [r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec")]
    out = f"{workdir}: " + "; ".join(stretch)
    if val:
        out += "\nvalidation nll by step: " + ", ".join(val)
    if speed:
        out += f"\nthroughput: {np.median(speed):.0f} tokens/s (median over log lines)"
    return out


