"""Download just enough FineWeb-Edu ``sample/100BT`` parquet files for a token budget.

``python -m prefixlm.data.fineweb --output data/fineweb --tokens 2e9``
then ``python -m prefixlm.data.tokenize --input 'data/fineweb/sample/100BT/*.parquet' ...``

* **Which files.** The files of ``sample/100BT`` are listed with their sizes (one API call) and
  taken in a *spread* order (0, 1/2, 1/4, 3/4, 1/8, ... of the sorted list), because each file
  covers only a few crawl dumps: any prefix of that order mixes dumps from across the list, where
  the first N files would not.
* **How many.** Files are counted by ``token_count`` (GPT-2) up to ``tokens * --margin``; Llama 3
  needs ~10-15% fewer and 0.5% go to validation, so 1.15 left 2e9 x 1.15 x 0.875 x 0.995 = 2.0e9
  train tokens for 2.0e9 needed: now 1.20. After tokenizing, ``--check TOKENS_DIR`` measures the
  ratio and names the files (and ``--margin``) still needed (``prefixlm.data.budget``).
* **Pinned.** Everything is read at one commit: ``--revision`` (sha, branch or tag), else the one
  recorded in ``DIR/manifest.json``, else today's ``main``, resolved to a sha and recorded first.
* **Resumable, verified, sized.** ``hf_hub_download`` cannot resume (huggingface_hub 2.4 writes a
  per-process ``<uuid>.incomplete`` and deletes it when the attempt ends), so files are fetched
  with HTTP ``Range`` through the hub client's session into a stable ``<file>.part``. A file with
  the listed size (and LFS sha256 unless ``--no-sha``) is kept; a mismatch is fetched once more,
  then reported. Free space is checked against the planned bytes first (exit 2).
* **Offline.** No route to the hub, before or during a download (the connection error is looked
  for in the whole cause chain), is one line and exit 3; the ``.part`` is kept for the next run.
  ``--input 'LOCAL/*.parquet'`` applies the same selection to files already on disk.

``DIR/manifest.json`` records the revision and the chosen files, sizes, sha256 and token counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
import time
import urllib.parse

from prefixlm.core import cli, errors
from prefixlm.data import budget
from prefixlm.data.shards import writing

REPO_ID = "HuggingFaceFW/fineweb-edu"
FOLDER = "sample/100BT"
# Bytes of (zstd/snappy) parquet per GPT-2 token, from sample/10BT: ~2.15 GB files of ~0.7e9
# tokens. Only a first guess; token_count columns decide.
BYTES_PER_TOKEN = 3.0
DEFAULT_MARGIN = 1.20
# Resumes in place (from the .part) before exit 3; the next run resumes from the same .part.
RESUME_ATTEMPTS = 3
RESUME_WAIT_S = 2.0


class HubUnreachable(RuntimeError):
    """No network route to the hub (DNS, connect or timeout failure): exit 3."""


class InsufficientSpace(errors.UserError, OSError):
    """The planned download does not fit on the output's filesystem: exit 2."""


class DownloadMismatch(errors.UserError, RuntimeError):
    """A file downloaded twice still differs from the hub's listing: exit 2."""


def spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput order (0, 1/2, 1/4, 3/4, ... of n): every prefix is spread."""
    order, seen = [], set()
    for k in range(2 * n + 2):  # once 2**m >= n, the points j / 2**m hit every index
        x, scale = 0.0, 0.5
        while k:
            x, k, scale = x + (k & 1) * scale, k >> 1, scale / 2
        i = int(x * n)
        if i not in seen:
            seen.add(i)
            order.append(i)
    return order + [i for i in range(n) if i not in seen]


def hub_reachable(endpoint: str | None = None, timeout: float = 5.0) -> tuple[bool, str]:
    """Fast pre-flight: can we resolve and connect to the hub host? (skipped behind a proxy)."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, "proxy configured"
    url = urllib.parse.urlsplit(endpoint or constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"{host}:{port}: {e.strerror or e}"


_NETWORK_ERROR_NAMES = {"ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException",
                        "TransportError", "ConnectionError", "OfflineModeIsEnabled",
                        "RemoteProtocolError", "ReadError", "ReadTimeout"}


def is_network_error(e: BaseException | None) -> bool:
    """Whether ``e`` or any exception in its ``__cause__``/``__context__`` chain is a network one.

    huggingface_hub wraps connection failures (e.g. ``LocalEntryNotFoundError`` whose cause is
    ``httpx2.ConnectError``), so the exception's own type is not enough.
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or (
                names & _NETWORK_ERROR_NAMES):
            return True
        e = e.__cause__ or e.__context__
    return False


def _hub_call(fn, *args, **kwargs):
    """Calls the hub; any network failure (anywhere in the cause chain) is HubUnreachable."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if is_network_error(e):
            raise HubUnreachable(f"{type(e).__name__}: {e}") from e
        raise


def resolve_revision(repo_id: str = REPO_ID, revision: str = "main") -> str:
    """The commit sha that ``revision`` (branch, tag or sha) of the dataset repo points to."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = _hub_call(HfApi().dataset_info, repo_id, revision=revision)
    except HfHubHTTPError as e:
        raise ValueError(
            f"{repo_id}: cannot resolve --revision {revision!r} ({str(e).splitlines()[0]}); pass "
            f"a commit sha, branch or tag of https://huggingface.co/datasets/{repo_id}"
        ) from e
    if not info.sha:
        raise ValueError(f"the hub returned no commit sha for {repo_id}@{revision}")
    return info.sha


def list_files(repo_id: str = REPO_ID, folder: str = FOLDER, revision: str | None = None
               ) -> list[dict]:
    """``[{"path", "size", "sha256"}]`` of the folder's parquet files, sorted by path."""
    from huggingface_hub import HfApi

    entries = _hub_call(lambda: list(HfApi().list_repo_tree(
        repo_id, path_in_repo=folder, repo_type="dataset", revision=revision)))
    files = [{"path": e.path, "size": int(e.size),
              "sha256": e.lfs.sha256 if getattr(e, "lfs", None) else None}
             for e in entries if e.path.endswith(".parquet") and hasattr(e, "size")]
    if not files:
        raise FileNotFoundError(f"hub dataset {repo_id} has no parquet files under {folder}/")
    return sorted(files, key=lambda f: f["path"])


def parquet_tokens(path: str | os.PathLike) -> int:
    """Sum of a FineWeb parquet's ``token_count`` column (reads that column only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        col = pq.read_table(path, columns=["token_count"]).column(0)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise ValueError(f"{path}: cannot read its token_count column ({e}); is it a "
                         "FineWeb-Edu parquet file?") from e
    return int(pc.sum(col).as_py() or 0)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: pathlib.Path, info: dict, check_sha: bool) -> str | None:
    """None if the local file matches the listing, else what is wrong."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != info["size"]:
        return f"size {size} != listed {info['size']}"
    if check_sha and info.get("sha256") and _sha256(path) != info["sha256"]:
        return "sha256 differs from the hub's LFS hash"
    return None


def _part_path(local: pathlib.Path) -> pathlib.Path:
    return local.with_name(local.name + ".part")


def _bytes_missing(local: pathlib.Path, info: dict) -> int:
    """Bytes still to fetch for one file: 0 if it is there, less what a .part already holds."""
    if local.is_file() and local.stat().st_size == info["size"]:
        return 0
    part = _part_path(local)
    have = part.stat().st_size if part.is_file() else 0
    return max(info["size"] - have, 0) if have <= info["size"] else info["size"]


def check_space(out: pathlib.Path, needed: int, what: str) -> None:
    """Raises InsufficientSpace when ``needed`` bytes do not fit in the free space of ``out``."""
    free = shutil.disk_usage(out).free
    if needed > free:
        raise InsufficientSpace(
            f"{out}: {what} needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free "
            f"there ({(needed - free) / 1e9:.2f} GB short); free space, choose another "
            "--output, or lower --tokens"
        )


def fetch_file(repo_id: str, revision: str, info: dict, local: pathlib.Path) -> None:
    """Downloads one file of the repo at ``revision`` to ``local``, resumably.

    Bytes go to ``local.part``; a rerun (or a retry after a dropped connection) asks for the rest
    with ``Range: bytes=N-`` and appends. A server that ignores the range (200 instead of 206)
    restarts the file. The .part is renamed to ``local`` once it has the listed size.
    """
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(repo_id, info["path"], repo_type="dataset", revision=revision)
    part = _part_path(local)
    with writing(local.parent):
        local.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(RESUME_ATTEMPTS):
        have = part.stat().st_size if part.is_file() else 0
        if have > info["size"]:  # not a prefix of this file: start over
            part.unlink()
            have = 0
        try:
            if have < info["size"]:
                headers = build_hf_headers()
                if have:
                    headers["Range"] = f"bytes={have}-"
                with get_session().stream("GET", url, headers=headers,
                                          follow_redirects=True) as response:
                    if response.status_code >= 400:
                        response.read()
                        hf_raise_for_status(response)
                    resumed = have > 0 and response.status_code == 206
                    # Only the file operations are "writing": a ConnectionResetError from the
                    # socket is an OSError too, and must stay a network error.
                    with writing(part):
                        f = open(part, "ab" if resumed else "wb")  # noqa: SIM115 - closed below
                    try:
                        for chunk in response.iter_bytes():  # as received: none lost in a buffer
                            with writing(part):
                                f.write(chunk)
                    finally:
                        with writing(part):
                            f.close()
            break
        except Exception as e:
            if not is_network_error(e):
                raise
            if part.is_file() and part.stat().st_size == info["size"]:
                break  # every byte arrived before the connection broke; the sha256 check decides
            if attempt == RESUME_ATTEMPTS - 1:
                raise HubUnreachable(
                    f"{type(e).__name__}: {e} (while downloading {info['path']}; "
                    f"{part.stat().st_size if part.is_file() else 0} bytes kept in {part}, the "
                    "next run resumes there)") from e
            time.sleep(RESUME_WAIT_S)
    size = part.stat().st_size if part.is_file() else 0
    if size != info["size"]:
        part.unlink(missing_ok=True)
        return  # the caller's check reports the size and fetches once more
    with writing(local):
        os.replace(part, local)


def download(
    output: str | os.PathLike,
    tokens: float,
    *,
    margin: float = DEFAULT_MARGIN,
    repo_id: str = REPO_ID,
    folder: str = FOLDER,
    revision: str | None = None,
    check_sha: bool = True,
    progress: bool = True,
) -> dict:
    """Fetches files in spread order until their token_count reaches tokens * margin.

    ``revision``: a commit sha, branch or tag of the dataset repo; None takes the revision
    recorded in ``output/manifest.json`` by an earlier run, else the current ``main``. It is
    resolved to a commit sha and recorded in the manifest before anything is fetched.
    """
    from tqdm.auto import tqdm

    out = pathlib.Path(output)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        previous = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        previous = {}
    if revision is None and previous.get("repo") == repo_id:
        revision = previous.get("revision")
    sha = resolve_revision(repo_id, revision or "main")
    files = list_files(repo_id, folder, sha)
    order = [files[i] for i in spread_order(len(files))]
    target = tokens * margin
    planned = []
    est = 0.0
    for f in order:  # first guess from sizes, for the progress bar and the disk-space check
        if est >= target:
            break
        est += f["size"] / BYTES_PER_TOKEN
        planned.append(f)
    check_space(out, sum(_bytes_missing(out / f["path"], f) for f in planned),
                f"the planned download ({len(planned)} files, "
                f"{sum(f['size'] for f in planned) / 1e9:.2f} GB"
                " in all, less what is already on disk)")
    _write_manifest(out, repo_id, folder, tokens, margin, [], 0, sha, complete=False)
    chosen, total = [], 0
    bar = tqdm(total=len(planned), unit="file", desc=f"fineweb-edu {folder}", disable=not progress)
    for info in order:
        if total >= target:
            break
        local = out / info["path"]
        problem = _verified(local, info, check_sha)
        for attempt in range(2):
            if problem is None:
                break
            if attempt > 0 or local.is_file():  # a wrong file or .part is not resumed
                local.unlink(missing_ok=True)
                _part_path(local).unlink(missing_ok=True)
            check_space(out, _bytes_missing(local, info), f"{info['path']}")
            fetch_file(repo_id, sha, info, local)
            problem = _verified(local, info, check_sha)
        if problem is not None:
            raise DownloadMismatch(f"{local}: downloaded twice but {problem}; delete it and rerun")
        n = parquet_tokens(local)
        chosen.append({**info, "token_count": n})
        total += n
        if len(chosen) > bar.total:
            bar.total = len(chosen)
        bar.update(1)
        bar.set_postfix(tokens=f"{total / 1e9:.2f}B/{target / 1e9:.2f}B")
    bar.close()
    if total < target:
        print(f"warning: all {len(files)} files hold {total:,} tokens < {target:,.0f}",
              file=sys.stderr)
    return _write_manifest(out, repo_id, folder, tokens, margin, chosen, total, sha)


def select_local(output: str | os.PathLike, input_glob: str, tokens: float, *,
                 margin: float = DEFAULT_MARGIN) -> dict:
    """The same selection over local parquet files, linked into ``output/FOLDER``."""
    from prefixlm.data.tokenize import find_inputs

    out = pathlib.Path(output)
    files = find_inputs(input_glob)
    dest_dir = out / FOLDER
    dest_dir.mkdir(parents=True, exist_ok=True)
    chosen, total = [], 0
    for i in spread_order(len(files)):
        if total >= tokens * margin:
            break
        src = files[i].resolve()
        n = parquet_tokens(src)
        dest = dest_dir / src.name
        if dest.is_symlink() or dest.exists():
            if dest.resolve() != src:
                raise FileExistsError(f"{dest} exists and is not {src}; use another --output")
        else:
            dest.symlink_to(src)
        chosen.append({"path": f"{FOLDER}/{src.name}", "size": src.stat().st_size,
                       "sha256": None, "token_count": n, "source": str(src)})
        total += n
    return _write_manifest(out, f"local:{input_glob}", FOLDER, tokens, margin, chosen, total)


def _write_manifest(out, repo, folder, tokens, margin, chosen, total, revision=None, *,
                    complete=True) -> dict:
    manifest = {"repo": repo, "revision": revision, "folder": folder, "tokens_requested": tokens,
                "margin": margin, "complete": complete, "token_count": total,
                "files": sorted(chosen, key=lambda f: f["path"])}
    path = out / "manifest.json"
    with writing(path):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, path)
    return manifest


@cli.command
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m prefixlm.data.fineweb",
        description=f"Download enough {REPO_ID} {FOLDER} parquet files for a token budget "
        "(files spread across the list, so across crawl dumps), resumably and verified. "
        "Then tokenize them with prefixlm.data.tokenize.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, help="download directory (files land in "
                   f"OUTPUT/{FOLDER}/, plus OUTPUT/manifest.json)")
    p.add_argument("--tokens", type=float, default=2e9, help="Llama 3 token budget")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="fetch until the files' GPT-2 token_count reaches tokens * margin")
    p.add_argument("--input", default=None, metavar="LOCAL_GLOB",
                   help="select from local FineWeb-Edu parquet files instead of the hub")
    p.add_argument("--revision", default=None,
                   help="dataset commit sha, branch or tag (default: the one recorded in "
                   "OUTPUT/manifest.json, else the current main, resolved to a sha and recorded)")
    p.add_argument("--check", metavar="TOKENS_DIR", help="after tokenizing: count TOKENS_DIR's "
                   "Llama 3 train tokens; exit 2 naming the files still needed when short")
    p.add_argument("--no-sha", action="store_true", help="check sizes only, not sha256")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from huggingface_hub.errors import HfHubHTTPError  # e.g. --revision that does not exist

    if not args.tokens > 0 or not args.margin > 0:
        raise errors.ConfigError(f"--tokens and --margin must be > 0, got {args.tokens} and "
                                 f"{args.margin}")
    try:
        if args.check:
            return budget.check_download_main(args.output, args.check, args.tokens)
        if args.input:
            m = select_local(args.output, args.input, args.tokens, margin=args.margin)
        else:
            ok, why = hub_reachable()
            if not ok:
                raise HubUnreachable(why)
            m = download(args.output, args.tokens, margin=args.margin, revision=args.revision,
                         check_sha=not args.no_sha, progress=not args.quiet)
    except HubUnreachable as e:
        print(f"error: the Hugging Face Hub is unreachable ({str(e).splitlines()[0]}); rerun to "
              f"resume, or to use FineWeb-Edu parquet files you already have, pass --input "
              f"'PATH/*.parquet'", file=sys.stderr)
        return 3
    except (ValueError, HfHubHTTPError) as e:  # a --revision the hub lacks, a foreign file
        raise errors.UserError(str(e).splitlines()[0]) from e
    print(f"{args.output}: {len(m['files'])} files, {m['token_count']:,} GPT-2 tokens; next: "
          f"python -m prefixlm.data.tokenize --input '{args.output}/{FOLDER}/*.parquet' "
          f"--output DIR, then the same command with --check DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
