"""Per-step manifests of checkpoint files: what the saving process wrote, so that a restore can
tell a corrupt file (zeroed, truncated, random bytes) from a good one.

A manifest is written only by the process that saved the step, after orbax committed it: its
presence vouches for the step. A step without one is not trusted blindly (see
``checkpoint.Checkpointer.restore_latest``).
"""

from __future__ import annotations

import hashlib
import json
import os

from etils import epath

from prefixlm.core import safe_files, schemas
from prefixlm.core.errors import SchemaError, UnsafePathError
from prefixlm.run import workdir as workdir_lib

MANIFEST = "prefixlm_manifest.json"  # per step: file sizes and sha256, written once committed


def _files(root: epath.Path):
    """Every file under ``root`` (epath has no recursive glob on object storage)."""
    for path in sorted(root.iterdir(), key=lambda p: p.name):
        if path.is_dir():
            yield from _files(path)
        else:
            yield path


def _file_digests(step_dir: epath.Path, with_hash: bool) -> dict[str, list]:
    """{relative path: [size, sha256 or None]} of every file of a finalized step."""
    out = {}
    for path in _files(step_dir):
        rel = os.fspath(path)[len(os.fspath(step_dir)):].lstrip("/")
        if rel == MANIFEST or rel.endswith(".tmp"):
            continue
        data = safe_files.read_bytes(path)  # a FIFO planted in a step is refused, not read
        out[rel] = [len(data), hashlib.sha256(data).hexdigest() if with_hash else None]
    return out


def write_manifest(step_dir: epath.Path) -> None:
    """Records size and sha256 of every file of a finalized checkpoint, so that a later restore
    can tell a corrupt file (zeroed, truncated, random bytes) from a good one. On object
    storage, sizes only: reading a checkpoint back to hash it would cost a full download."""
    manifest = {"files": _file_digests(step_dir, with_hash=not safe_files.is_remote(step_dir))}
    workdir_lib.write_text_atomic(step_dir / MANIFEST, json.dumps(manifest))


def verify(step_dir: epath.Path) -> str | None:
    """None when the step's files match its manifest (or it has none: the restore checks those
    steps instead), else what differs. A manifest that is not ``schemas.MANIFEST`` (``null``,
    torn, garbage) or a file that is not a regular one makes the step corrupt: the caller moves
    it aside like any other bad step, and never blames the storage."""
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        expected = schemas.read_json(path, schemas.MANIFEST, fix="the step is corrupt")["files"]
        actual = _file_digests(step_dir, with_hash=any(v[1] for v in expected.values()))
    except (SchemaError, UnsafePathError) as e:
        return f"unreadable {MANIFEST} ({e})" if isinstance(e, SchemaError) else str(e)
    for rel, (size, digest) in expected.items():
        if rel not in actual:
            return f"{rel} is missing"
        if actual[rel][0] != size:
            return f"{rel} has {actual[rel][0]} bytes, {size} were written"
        if digest and actual[rel][1] != digest:
            return f"{rel} does not match the sha256 recorded at save time"
    return None
