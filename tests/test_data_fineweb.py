"""FineWeb-Edu download, offline: the hub client is mocked only at its network calls."""

import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from prefixlm.data import fineweb

N_FILES, ROWS, TOKENS_PER_ROW = 12, 20, 50


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local folder laid out like the hub repo, served through list_repo_tree/hf_hub_download."""
    root = tmp_path / "hub"
    folder = root / fineweb.FOLDER
    folder.mkdir(parents=True)
    for i in range(N_FILES):
        pq.write_table(pa.table({
            "text": [f"file {i} row {r}" for r in range(ROWS)],
            "dump": [f"CC-MAIN-2013-{i:02d}"] * ROWS,
            "token_count": pa.array([TOKENS_PER_ROW] * ROWS, pa.int64()),
        }), folder / f"{i:03d}_00000.parquet")
    calls = {"list": 0, "download": []}

    def list_repo_tree(self, repo_id, path_in_repo=None, *, repo_type=None, **kw):
        assert (repo_id, path_in_repo, repo_type) == (fineweb.REPO_ID, fineweb.FOLDER, "dataset")
        calls["list"] += 1
        for f in sorted(folder.iterdir()):
            data = f.read_bytes()
            yield RepoFile(path=f"{path_in_repo}/{f.name}", size=len(data), oid="x",
                           lfs={"size": len(data), "oid": hashlib.sha256(data).hexdigest(),
                                "pointerSize": 130})

    def hf_hub_download(repo_id, filename, *, repo_type=None, local_dir=None, **kw):
        calls["download"].append(filename)
        dest = local_dir / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / filename, dest)
        return str(dest)

    monkeypatch.setattr(HfApi, "list_repo_tree", list_repo_tree)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    monkeypatch.setattr(fineweb, "hub_reachable", lambda *a, **k: (True, ""))
    return root, calls


def test_downloads_just_enough_spread_files_and_resumes(tmp_path, fake_hub):
    _, calls = fake_hub
    out = tmp_path / "out"
    per_file = ROWS * TOKENS_PER_ROW
    assert fineweb.main(["--output", str(out), "--tokens", str(3.5 * per_file), "--margin",
                         "1", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    names = [f["path"].rsplit("/", 1)[1] for f in m["files"]]
    assert len(names) == 4 and m["token_count"] == 4 * per_file
    assert names != [f"{i:03d}_00000.parquet" for i in range(4)]  # spread, not the first four
    assert {"000_00000.parquet", "006_00000.parquet"} <= set(names)
    assert len(calls["download"]) == 4
    # Rerun with a bigger budget: the four verified files are kept, only new ones fetched.
    fineweb.download(out, 6 * per_file, margin=1.0, progress=False)
    assert len(calls["download"]) == 6


def test_corrupted_download_is_refetched_then_reported(tmp_path, fake_hub, monkeypatch):
    root, calls = fake_hub
    out = tmp_path / "out"
    fineweb.download(out, 1, margin=1.0, progress=False)
    local = out / fineweb.FOLDER / "000_00000.parquet"
    local.write_bytes(local.read_bytes()[:-1] + b"!")  # same size, wrong sha256
    fineweb.download(out, 1, margin=1.0, progress=False)
    assert calls["download"] == [f"{fineweb.FOLDER}/000_00000.parquet"] * 2
    assert fineweb._verified(local, {"size": local.stat().st_size, "sha256": hashlib.sha256(
        (root / fineweb.FOLDER / "000_00000.parquet").read_bytes()).hexdigest()}, True) is None
    local.write_bytes(b"short")

    def junk_download(repo_id, filename, *, local_dir=None, **kw):  # a broken mirror
        (local_dir / filename).write_bytes(b"short")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", junk_download)
    with pytest.raises(OSError, match="000_00000.parquet: downloaded twice but size"):
        fineweb.download(out, 1, margin=1.0, progress=False)


def test_unreachable_hub_says_so_in_one_line(tmp_path, fake_hub, monkeypatch, capsys):
    import httpx2

    def offline(self, *a, **k):
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "list_repo_tree", offline)
    assert fineweb.main(["--output", str(tmp_path / "out"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "unreachable" in err and "--input" in err


def test_preflight_fails_fast_on_unresolvable_host(monkeypatch):
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    ok, why = fineweb.hub_reachable("https://no-such-host.invalid", timeout=2)
    assert not ok and "no-such-host.invalid" in why


def test_local_input_uses_the_same_selection(tmp_path, fake_hub):
    root, _ = fake_hub
    out = tmp_path / "local"
    m = fineweb.select_local(out, str(root / fineweb.FOLDER / "*.parquet"), 2 * ROWS * 50,
                             margin=1.0)
    assert [f["path"].rsplit("/", 1)[1] for f in m["files"]] == ["000_00000.parquet",
                                                                 "006_00000.parquet"]
    assert (out / fineweb.FOLDER / "006_00000.parquet").is_symlink()


def test_spread_order_is_a_permutation():
    for n in (1, 2, 3, 7, 98, 100):
        order = fineweb.spread_order(n)
        assert sorted(order) == list(range(n))
    assert fineweb.spread_order(8)[:4] == [0, 4, 2, 6]
