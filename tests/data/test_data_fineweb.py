"""FineWeb-Edu download through the real huggingface_hub 2.4 client; only its HTTP is faked.

``huggingface_hub.set_client_factory`` installs an ``httpx2.Client`` whose ``MockTransport``
plays the hub: the revision endpoint (``/api/datasets/REPO/revision/REV``), the tree listing
(``/api/datasets/REPO/tree/REV/PATH``) and file downloads (``/datasets/REPO/resolve/REV/PATH``
with ``Range``, ``ETag``, ``X-Repo-Commit``, ``Content-Length``/``Content-Range``). So wrong
arguments to the library, an unpinned revision or a non-resumed download fail here.
"""

import hashlib
import io
import json
import time

import httpx2
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from prefixlm.data import budget, fineweb

N_FILES, ROWS, TOKENS_PER_ROW = 12, 20, 50
SHA1, SHA2 = "1" * 40, "2" * 40


def parquet_bytes(i: int, rows: int = ROWS) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({
        "text": [f"file {i} row {r} " + "padding " * 40 for r in range(rows)],
        "dump": [f"CC-MAIN-2013-{i:02d}"] * rows,
        "token_count": pa.array([TOKENS_PER_ROW] * rows, pa.int64()),
    }), buf)
    return buf.getvalue()


class FakeHub:
    """The three hub endpoints fineweb uses, over a dict of files per commit."""

    def __init__(self):
        files = {f"{fineweb.FOLDER}/{i:03d}_00000.parquet": parquet_bytes(i)
                 for i in range(N_FILES)}
        self.commits = {SHA1: files}
        self.branches = {"main": SHA1}
        self.requests: list[httpx2.Request] = []
        self.drop_after: int | None = None  # bytes served before the connection drops
        self.drops_left = 0
        self.serve_junk = False
        self.offline = False

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if self.offline:
            raise httpx2.ConnectError("[Errno 101] Network is unreachable", request=request)
        path = request.url.path
        api = f"/api/datasets/{fineweb.REPO_ID}/"
        if path.startswith(api + "revision/"):
            rev = path.removeprefix(api + "revision/")
            sha = self.branches.get(rev, rev if rev in self.commits else None)
            if sha is None:
                return httpx2.Response(404, headers={"X-Error-Code": "RevisionNotFound",
                                                     "X-Error-Message": "Invalid rev id"},
                                       json={"error": "Invalid rev id"})
            return httpx2.Response(200, json={"id": fineweb.REPO_ID, "sha": sha,
                                              "private": False, "tags": []})
        if path.startswith(api + "tree/"):
            rev, _, folder = path.removeprefix(api + "tree/").partition("/")
            assert rev in self.commits, f"tree listed at {rev!r}, not a pinned commit sha"
            return httpx2.Response(200, json=[
                {"type": "file", "path": p, "size": len(data), "oid": "0" * 40,
                 "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                         "pointerSize": 134}}
                for p, data in sorted(self.commits[rev].items()) if p.startswith(folder + "/")])
        resolve = f"/datasets/{fineweb.REPO_ID}/resolve/"
        if path.startswith(resolve):
            rev, _, name = path.removeprefix(resolve).partition("/")
            assert rev in self.commits, f"file fetched at {rev!r}, not a pinned commit sha"
            data = self.commits[rev][name]
            if self.serve_junk:
                data = data[:-1] + b"!"
            etag = hashlib.sha256(data).hexdigest()
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": rev, "Accept-Ranges": "bytes"}
            start, status = 0, 200
            if "range" in request.headers:
                start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            headers["Content-Length"] = str(len(body))
            if self.drop_after is not None and self.drops_left > 0:
                self.drops_left -= 1
                cut = self.drop_after

                def dropping():
                    yield body[:cut]
                    raise httpx2.ReadError("connection reset by peer")

                return httpx2.Response(status, headers=headers, content=dropping())
            return httpx2.Response(status, headers=headers, content=body)
        return httpx2.Response(404, json={"error": f"no route {path}"})

    def fetched(self):
        """(revision, file name, Range header) of every download request."""
        out = []
        for r in self.requests:
            if "/resolve/" in r.url.path:
                rev, _, name = r.url.path.split("/resolve/")[1].partition("/")
                out.append((rev, name.rsplit("/", 1)[1], r.headers.get("range")))
        return out


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handler), follow_redirects=True))
    monkeypatch.setattr(fineweb, "hub_reachable", lambda *a, **k: (True, ""))
    monkeypatch.setattr(fineweb, "RESUME_WAIT_S", 0.0, raising=False)
    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub's backoff, too
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield fake
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


PER_FILE = ROWS * TOKENS_PER_ROW


def test_downloads_just_enough_spread_files_pinned_and_resumes(tmp_path, hub):
    out = tmp_path / "out"
    assert fineweb.main(["--output", str(out), "--tokens", str(3.5 * PER_FILE), "--margin",
                         "1", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    names = [f["path"].rsplit("/", 1)[1] for f in m["files"]]
    assert m["revision"] == SHA1 and m["complete"] is True
    assert len(names) == 4 and m["token_count"] == 4 * PER_FILE
    assert {"000_00000.parquet", "006_00000.parquet"} <= set(names)  # spread, not the first four
    for f in m["files"]:
        assert (out / f["path"]).read_bytes() == hub.commits[SHA1][f["path"]]
    assert [rev for rev, _, _ in hub.fetched()] == [SHA1] * 4
    assert not list(out.rglob("*.part"))
    # Rerun with a bigger budget: the four verified files are kept, only new ones fetched.
    fineweb.download(out, 6 * PER_FILE, margin=1.0, progress=False)
    assert len(hub.fetched()) == 6


def test_recorded_revision_is_reused_and_a_bad_one_is_one_line(tmp_path, hub, capsys):
    """Before: nothing pinned what was downloaded; a rerun after main moved mixed snapshots."""
    out = tmp_path / "out"
    fineweb.download(out, PER_FILE, margin=1.0, progress=False)
    hub.commits[SHA2] = {p: parquet_bytes(i, rows=ROWS + 1)
                         for i, p in enumerate(sorted(hub.commits[SHA1]))}
    hub.branches["main"] = SHA2
    m = fineweb.download(out, 3 * PER_FILE, margin=1.0, progress=False)
    assert m["revision"] == SHA1 and {rev for rev, _, _ in hub.fetched()} == {SHA1}
    m = fineweb.download(tmp_path / "new", PER_FILE, margin=1.0, progress=False)
    assert m["revision"] == SHA2
    assert fineweb.main(["--output", str(tmp_path / "x"), "--revision", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope" in err


def test_dropped_connection_resumes_from_the_part_file(tmp_path, hub, capsys):
    """Before: hf_hub_download restarted every file from byte 0 (a per-process .incomplete)."""
    out = tmp_path / "out"
    name = "000_00000.parquet"
    size = len(hub.commits[SHA1][f"{fineweb.FOLDER}/{name}"])
    hub.drop_after, hub.drops_left = 500, fineweb.RESUME_ATTEMPTS  # every attempt drops
    assert fineweb.main(["--output", str(out), "--tokens", "1", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unreachable" in err and "resume" in err
    part = out / fineweb.FOLDER / f"{name}.part"
    assert size > fineweb.RESUME_ATTEMPTS * 500
    assert part.stat().st_size == fineweb.RESUME_ATTEMPTS * 500  # each retry appended
    assert hub.fetched() == [(SHA1, name, None), (SHA1, name, "bytes=500-"),
                             (SHA1, name, "bytes=1000-")]
    # The network is back: the next run asks for the rest only and verifies the whole file.
    hub.requests.clear()
    assert fineweb.main(["--output", str(out), "--tokens", "1", "--quiet"]) == 0
    assert hub.fetched() == [(SHA1, name, f"bytes={fineweb.RESUME_ATTEMPTS * 500}-")]
    local = out / fineweb.FOLDER / name
    assert local.stat().st_size == size and not part.exists()
    assert local.read_bytes() == hub.commits[SHA1][f"{fineweb.FOLDER}/{name}"]


def test_network_loss_is_found_in_the_cause_chain(tmp_path, hub, capsys):
    """Before: LocalEntryNotFoundError (cause: ConnectError) ended in a traceback."""
    try:
        try:
            raise httpx2.ConnectError("[Errno 101] Network is unreachable")
        except httpx2.ConnectError as e:
            raise LocalEntryNotFoundError("cannot find the requested file") from e
    except LocalEntryNotFoundError as wrapped:
        assert fineweb.is_network_error(wrapped)
    assert not fineweb.is_network_error(ValueError("bad parquet"))
    hub.offline = True
    t0 = time.perf_counter()
    assert fineweb.main(["--output", str(tmp_path / "out"), "--quiet"]) == 3
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unreachable" in err and "--input" in err


def test_corrupted_download_is_refetched_then_reported(tmp_path, hub, capsys):
    out = tmp_path / "out"
    fineweb.download(out, 1, margin=1.0, progress=False)
    local = out / fineweb.FOLDER / "000_00000.parquet"
    local.write_bytes(local.read_bytes()[:-1] + b"!")  # same size, wrong sha256
    fineweb.download(out, 1, margin=1.0, progress=False)
    assert [n for _, n, _ in hub.fetched()] == ["000_00000.parquet"] * 2
    assert local.read_bytes() == hub.commits[SHA1][f"{fineweb.FOLDER}/000_00000.parquet"]
    local.unlink()
    hub.serve_junk = True  # a broken mirror
    assert fineweb.main(["--output", str(out), "--tokens", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "000_00000.parquet: downloaded twice but sha256" in err
    assert len(err.strip().splitlines()) == 1


def test_free_space_is_checked_before_downloading(tmp_path, hub, monkeypatch, capsys):
    """Before: ~8.6 GB were fetched into whatever space there was."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fineweb.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    assert fineweb.main(["--output", str(tmp_path / "out"), "--tokens", str(3 * PER_FILE),
                         "--margin", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "short" in err and "only 0.00 GB is free" in err and len(err.strip().splitlines()) == 1
    assert hub.fetched() == []


def test_preflight_fails_fast_on_unresolvable_host(monkeypatch):
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    ok, why = fineweb.hub_reachable("https://no-such-host.invalid", timeout=2)
    assert not ok and "no-such-host.invalid" in why


def test_local_input_uses_the_same_selection(tmp_path):
    folder = tmp_path / "hub" / fineweb.FOLDER
    folder.mkdir(parents=True)
    for i in range(N_FILES):
        (folder / f"{i:03d}_00000.parquet").write_bytes(parquet_bytes(i))
    out = tmp_path / "local"
    m = fineweb.select_local(out, str(folder / "*.parquet"), 2 * PER_FILE, margin=1.0)
    assert [f["path"].rsplit("/", 1)[1] for f in m["files"]] == ["000_00000.parquet",
                                                                 "006_00000.parquet"]
    assert (out / fineweb.FOLDER / "006_00000.parquet").is_symlink()


def test_spread_order_is_a_permutation():
    for n in (1, 2, 3, 7, 98, 100):
        order = fineweb.spread_order(n)
        assert sorted(order) == list(range(n))
    assert fineweb.spread_order(8)[:4] == [0, 4, 2, 6]


def test_check_measures_llama3_tokens_and_says_how_many_more_files(tmp_path, capsys):
    """Before: the margin was GPT-2 token_count x 1.15 and nothing measured the Llama 3 count."""
    from prefixlm.data import tokenize

    folder = tmp_path / "hub" / fineweb.FOLDER
    folder.mkdir(parents=True)
    for i in range(N_FILES):
        (folder / f"{i:03d}_00000.parquet").write_bytes(parquet_bytes(i))
    out, toks = tmp_path / "local", tmp_path / "tokens"
    fineweb.select_local(out, str(folder / "*.parquet"), 2 * PER_FILE, margin=1.0)
    tokenize.tokenize(f"{out}/{fineweb.FOLDER}/*.parquet", toks, val_fraction=0.0,
                      progress=False)
    train = json.loads((toks / "stats.json").read_text())["splits"]["train"]["tokens"]
    ratio = train / (2 * PER_FILE)  # the 2 files' GPT-2 token_count
    need = train + int(2.5 * PER_FILE * ratio)  # 2.5 more files' worth of Llama 3 tokens
    args = ["--output", str(out), "--tokens", str(need), "--check", str(toks)]
    assert fineweb.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "about 3 more files" in err, err
    c = budget.check_tokens(out, toks, need)
    assert c["more_files"] == 3 and c["ratio"] == pytest.approx(ratio)
    # The suggested --margin fetches exactly those files; tokenized, the check passes.
    m = fineweb.select_local(out, str(folder / "*.parquet"), need, margin=c["margin"])
    assert len(m["files"]) == 5
    tokenize.tokenize(f"{out}/{fineweb.FOLDER}/*.parquet", toks, val_fraction=0.0,
                      progress=False)
    assert fineweb.main(args) == 0
    assert "enough" in capsys.readouterr().out
    # A download not yet tokenized is named, not measured wrongly.
    fineweb.select_local(out, str(folder / "*.parquet"), need * 2, margin=c["margin"])
    assert fineweb.main(args) == 2
    assert "not tokenized" in capsys.readouterr().err
