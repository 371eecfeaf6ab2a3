"""Download just enough FineWeb-Edu ``sample/100BT`` parquet files for a token budget.

``python -m prefixlm.data.fineweb --output data/fineweb --tokens 2e9``
then ``python -m prefixlm.data.tokenize --input 'data/fineweb/sample/100BT/*.parquet' ...``

* **Which files.** The files of ``sample/100BT`` are listed with their sizes (one API call) and
  taken in a *spread* order (0, 1/2, 1/4, 3/4, 1/8, ... of the sorted list), because each file
  covers only a few crawl dumps: any prefix of that order mixes dumps from across the list, where
  the first N files would not.
* **How many.** Files are planned from their size at ``BYTES_PER_TOKEN`` and then counted exactly
  once on disk: each parquet's ``token_count`` column (GPT-2 tokens, as FineWeb reports them) is
  summed, and files are added until the sum reaches ``tokens * --margin``. The default margin
  1.15 covers Llama 3's larger vocabulary, which needs ~10-15% fewer tokens for the same text,
  so 2e9 Llama 3 tokens need ~2.3e9 GPT-2 tokens of text.
* **Resumable and verified.** ``hf_hub_download(local_dir=...)`` resumes partial downloads; a
  file already present with the listed size (and LFS sha256 unless ``--no-sha``) is not fetched
  again; a mismatch is fetched once more and then reported by name.
* **Offline.** With no route to the hub it says so in one line, with the ``--input`` alternative,
  and exits 3. ``--input 'LOCAL/*.parquet'`` applies the same selection to files already on disk
  (linked into ``--output``), so the rest of the recipe is unchanged.

``DIR/manifest.json`` records the chosen files, sizes, sha256 and token counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import socket
import sys
import urllib.parse

REPO_ID = "HuggingFaceFW/fineweb-edu"
FOLDER = "sample/100BT"
# Bytes of (zstd/snappy) parquet per GPT-2 token, from sample/10BT: ~2.15 GB files of ~0.7e9
# tokens. Only a first guess; token_count columns decide.
BYTES_PER_TOKEN = 3.0
DEFAULT_MARGIN = 1.15


class HubUnreachable(RuntimeError):
    """No network route to the hub (DNS, connect or timeout failure)."""


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


def _is_network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or bool(
        names & {"ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException",
                 "TransportError", "ConnectionError", "OfflineModeIsEnabled"})


def list_files(repo_id: str = REPO_ID, folder: str = FOLDER) -> list[dict]:
    """``[{"path", "size", "sha256"}]`` of the folder's parquet files, sorted by path."""
    from huggingface_hub import HfApi

    try:
        entries = list(HfApi().list_repo_tree(repo_id, path_in_repo=folder, repo_type="dataset"))
    except Exception as e:
        if _is_network_error(e):
            raise HubUnreachable(f"{type(e).__name__}: {e}") from e
        raise
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


def download(
    output: str | os.PathLike,
    tokens: float,
    *,
    margin: float = DEFAULT_MARGIN,
    repo_id: str = REPO_ID,
    folder: str = FOLDER,
    check_sha: bool = True,
    progress: bool = True,
) -> dict:
    """Fetches files in spread order until their token_count reaches tokens * margin."""
    import huggingface_hub
    from tqdm.auto import tqdm

    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = list_files(repo_id, folder)
    order = [files[i] for i in spread_order(len(files))]
    target = tokens * margin
    planned = est = 0
    for f in order:  # first guess from sizes, for the progress bar
        if est >= target:
            break
        est += f["size"] / BYTES_PER_TOKEN
        planned += 1
    chosen, total = [], 0
    bar = tqdm(total=planned, unit="file", desc=f"fineweb-edu {folder}", disable=not progress)
    for info in order:
        if total >= target:
            break
        local = out / info["path"]
        problem = _verified(local, info, check_sha)
        for attempt in range(2):
            if problem is None:
                break
            try:
                huggingface_hub.hf_hub_download(repo_id, info["path"], repo_type="dataset",
                                                local_dir=out, force_download=attempt > 0)
            except Exception as e:
                if _is_network_error(e):
                    raise HubUnreachable(f"{type(e).__name__}: {e}") from e
                raise
            problem = _verified(local, info, check_sha)
        if problem is not None:
            raise OSError(f"{local}: downloaded twice but {problem}; delete it and rerun")
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
    return _write_manifest(out, repo_id, folder, tokens, margin, chosen, total)


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


def _write_manifest(out, repo, folder, tokens, margin, chosen, total) -> dict:
    manifest = {"repo": repo, "folder": folder, "tokens_requested": tokens, "margin": margin,
                "token_count": total, "files": sorted(chosen, key=lambda f: f["path"])}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
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
    p.add_argument("--no-sha", action="store_true", help="check sizes only, not sha256")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.input:
        m = select_local(args.output, args.input, args.tokens, margin=args.margin)
    else:
        ok, why = hub_reachable()
        try:
            if not ok:
                raise HubUnreachable(why)
            m = download(args.output, args.tokens, margin=args.margin,
                         check_sha=not args.no_sha, progress=not args.quiet)
        except HubUnreachable as e:
            print(f"error: the Hugging Face Hub is unreachable ({str(e).splitlines()[0]}); "
                  f"to use FineWeb-Edu parquet files you already have, pass --input "
                  f"'PATH/*.parquet'", file=sys.stderr)
            return 3
    print(f"{args.output}: {len(m['files'])} files, {m['token_count']:,} GPT-2 tokens; next: "
          f"python -m prefixlm.data.tokenize --input '{args.output}/{FOLDER}/*.parquet' "
          f"--output DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
