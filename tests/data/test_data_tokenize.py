"""Tokenize CLI: exact tokens per document, worker-count independence, resume, bad inputs."""

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixlm.data import shards, tokenize

EOS = 128001

AWKWARD = [
    "Plain English prose. Two sentences.",
    "Windows line endings\r\nsecond line\r\n\r\nthird paragraph\r\n",
    "Unicode: naïve café, 日本語のテキスト, Ελληνικά, עברית, emoji 👩‍👩‍👧‍👦🎉, "
    "combining e\u0301, zero\u200bwidth, NBSP\u00a0here, math ∑∫√.",
    "This page spells <|end_of_text|> and <|begin_of_text|> and <|eot_id|> "
    "and <|reserved_special_token_5|>, which must stay plain text.",
    None,
    "",
    "   \n\t  ",  # whitespace is a (weird) document, not an empty one
    "numbers 1234567890 3.14159 1,000,000 and code: def f(x):\n    return x**2  # ok",
    "long " + "document with many repeated words and some variety 12345. " * 3000,
    "'s 't 're SHOUTING'LL don't  double  spaces\u3000ideographic   trailing   ",
]


def reference_encoding():
    """An independent tiktoken Encoding, built here rather than through prefixlm.vocab.tokenizer."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from prefixlm.vocab.tokenizer import LLAMA3_PATTERN, llama3_ranks_path

    ranks = load_tiktoken_bpe(str(llama3_ranks_path()))
    return tiktoken.Encoding(name="test-llama3", pat_str=LLAMA3_PATTERN,
                             mergeable_ranks=ranks, special_tokens={})


def write_parquet(path, texts, row_group_size=None):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()),
                             "id": [f"doc{i}" for i in range(len(texts))]}),
                   path, row_group_size=row_group_size)
    return path


def read_split(out, split):
    stats = shards.read_stats(out)
    return np.concatenate([np.fromfile(f, dtype=shards.DTYPE)
                           for f, _ in shards.split_files(out, split, stats)] or [np.zeros(0)])


def tree_bytes(root):
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "parts"}


def many_docs(n, seed):
    rng = np.random.default_rng(seed)
    words = ["the", "river", "theorem", "élan", "東京", "proof", "light", "data", "\n\n", "42"]
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 200)))) for _ in range(n)]


def test_tokens_equal_tiktoken_per_document(tmp_path, llama3):
    src = write_parquet(tmp_path / "in" / "a.parquet", AWKWARD, row_group_size=3)
    stats = tokenize.tokenize(str(src), tmp_path / "out", val_fraction=0.0, progress=False)
    enc = reference_encoding()
    want = []
    for t in AWKWARD:
        if t:
            want += enc.encode(t, allowed_special=set(), disallowed_special=()) + [EOS]
    got = read_split(tmp_path / "out", "train")
    assert got.tolist() == want
    assert stats["skipped"] == 2  # None and ""
    assert stats["documents"] == len(AWKWARD) - 2
    assert stats["tokens"] == len(want)
    assert stats["splits"]["validation"]["tokens"] == 0
    assert np.count_nonzero(got == EOS) == stats["documents"]  # spelled specials stayed text
    assert stats["tokenizer_hash"] == llama3.vocab_hash


def test_validation_split_is_a_content_hash_holdout(tmp_path):
    docs = many_docs(400, seed=1)
    src = write_parquet(tmp_path / "a.parquet", docs + docs[:50])  # 50 exact duplicates
    stats = tokenize.tokenize(str(src), tmp_path / "out", val_fraction=0.1, progress=False)
    n_val = stats["splits"]["validation"]["documents"]
    held = [d for d in docs + docs[:50] if tokenize.is_validation(d, 0.1)]
    assert n_val == len(held) and 15 < n_val < 90
    enc = reference_encoding()
    want = [t for d in held for t in enc.encode_ordinary(d) + [EOS]]
    assert read_split(tmp_path / "out", "validation").tolist() == want
    train_docs = {d for d in docs if not tokenize.is_validation(d, 0.1)}
    assert not train_docs & set(held)  # duplicates never straddle the split


def test_worker_counts_give_identical_shards(tmp_path):
    for i in range(3):
        write_parquet(tmp_path / "in" / f"{i:03d}.parquet", many_docs(300, seed=i),
                      row_group_size=50)
    kw = dict(val_fraction=0.05, shard_rows=100, progress=False)
    s1 = tokenize.tokenize(str(tmp_path / "in" / "*.parquet"), tmp_path / "w1", workers=1, **kw)
    s2 = tokenize.tokenize(str(tmp_path / "in" / "*.parquet"), tmp_path / "w2", workers=2, **kw)
    assert len(s1["shards"]) == 9  # 3 files x 300 rows / (2 row groups of 50 per 100-row unit)
    assert s1 == s2
    assert tree_bytes(tmp_path / "w1") == tree_bytes(tmp_path / "w2")


def test_resume_after_simulated_crash(tmp_path):
    for i in range(2):
        write_parquet(tmp_path / "in" / f"{i:03d}.parquet", many_docs(200, seed=10 + i),
                      row_group_size=40)
    glob = str(tmp_path / "in" / "*.parquet")
    kw = dict(val_fraction=0.05, shard_rows=40, progress=False)
    ref = tokenize.tokenize(glob, tmp_path / "ref", **kw)
    out = tmp_path / "out"
    tokenize.tokenize(glob, out, **kw)
    kept = out / "parts" / f"{ref['shards'][0]['name']}.json"
    mtime = kept.stat().st_mtime_ns
    # A crash mid-run: no stats.json, some units without a part record, one shard half-written
    # under its final name (its part record never landed), a leftover temp file.
    (out / "stats.json").unlink()
    for s in ref["shards"][3:]:
        (out / "parts" / f"{s['name']}.json").unlink()
    half = out / "train" / f"{ref['shards'][4]['name']}.bin"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    (out / "train" / f"{ref['shards'][5]['name']}.bin.tmp").write_bytes(b"\x01\x02")
    with pytest.raises(FileNotFoundError, match="interrupted"):
        shards.read_stats(out)
    again = tokenize.tokenize(glob, out, **kw)
    assert again == ref
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    assert kept.stat().st_mtime_ns == mtime  # finished units were not redone
    assert not list(out.rglob("*.tmp"))


def test_kill_and_rerun_gives_identical_output(tmp_path):
    for i in range(2):
        write_parquet(tmp_path / "in" / f"{i:03d}.parquet", many_docs(3000, seed=20 + i),
                      row_group_size=100)
    glob = str(tmp_path / "in" / "*.parquet")
    args = ["--input", glob, "--shard-rows", "100", "--val-fraction", "0.01", "--quiet"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "prefixlm.data.tokenize", "--output", str(out),
           "--workers", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "parts").glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if killed:
        assert not (out / "stats.json").exists()
        assert len(list((out / "parts").glob("*.json"))) < 60
    rc = subprocess.run(cmd, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    tokenize.main(["--output", str(tmp_path / "ref"), "--workers", "1", *args])
    assert json.loads((out / "stats.json").read_text()) == json.loads(
        (tmp_path / "ref" / "stats.json").read_text())
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_truncated_parquet_is_refused_by_name(tmp_path, capsys):
    write_parquet(tmp_path / "in" / "000_good.parquet", many_docs(50, seed=3))
    bad = write_parquet(tmp_path / "in" / "001_bad.parquet", many_docs(50, seed=4))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    glob = str(tmp_path / "in" / "*.parquet")
    with pytest.raises(tokenize.CorruptParquetError, match="001_bad.parquet"):
        tokenize.tokenize(glob, tmp_path / "out", progress=False)
    assert tokenize.main(["--input", glob, "--output", str(tmp_path / "out"), "--quiet"]) == 2
    assert "001_bad.parquet" in capsys.readouterr().err
    assert not (tmp_path / "out" / "stats.json").exists()
    stats = tokenize.tokenize(glob, tmp_path / "skip", skip_corrupt=True, val_fraction=0,
                              progress=False)
    assert [c["file"] for c in stats["corrupt"]] == [str(bad)]
    assert stats["documents"] == 50
    # Rerunning a directory with --skip-corrupt reuses shards finished before.
    tokenize.tokenize(str(tmp_path / "in" / "000_good.parquet"), tmp_path / "out", progress=False)
    part = tmp_path / "out" / "parts" / "000_good-0000.json"
    mtime = part.stat().st_mtime_ns
    assert tokenize.tokenize(glob, tmp_path / "out", skip_corrupt=True, progress=False)["corrupt"]
    assert part.stat().st_mtime_ns == mtime


def test_missing_text_column_and_no_inputs(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(tokenize.CorruptParquetError, match=r"x\.parquet.*'text'"):
        tokenize.tokenize(str(tmp_path / "x.parquet"), tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        tokenize.tokenize(str(tmp_path / "nothing*.parquet"), tmp_path / "out", progress=False)


@pytest.mark.parametrize("column", [pa.array([b"bytes", b"more"], pa.binary()),
                                    pa.array([1, 2], pa.int64())], ids=["binary", "int64"])
def test_a_text_column_that_is_not_strings_is_one_line(tmp_path, capsys, column):
    """Before: a traceback from inside the worker (bytes.encode / int has no len)."""
    src = tmp_path / "in" / "odd.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"text": column}), src)
    rc = tokenize.main(["--input", str(src), "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "odd.parquet" in err and "column 'text'" in err and str(column.type) in err
    assert not (tmp_path / "out").exists()  # refused before any output


def test_shards_record_a_checksum_of_their_bytes(tmp_path):
    import hashlib

    import xxhash

    src = write_parquet(tmp_path / "in" / "a.parquet", many_docs(60, seed=5))
    stats = tokenize.tokenize(str(src), tmp_path / "out", val_fraction=0.2, progress=False)
    for split in shards.SPLITS:
        entry = stats["shards"][0][split]
        data = (tmp_path / "out" / entry["file"]).read_bytes()
        assert entry["tokens"] > 0 and entry["checksum"] == "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)
        assert shards.file_checksum(tmp_path / "out" / entry["file"], "sha256") == (
            "sha256:" + hashlib.sha256(data).hexdigest())


def test_cli_help_explains():
    r = subprocess.run([sys.executable, "-m", "prefixlm.data.tokenize", "--help"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 0
    for flag in ("--input", "--output", "--workers", "--skip-corrupt", "--val-fraction"):
        assert flag in r.stdout


class FullDisk:
    """A shard file whose writes (or the flush inside close) fail with ENOSPC, like a full disk."""

    def __init__(self, path, fail_on):
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fail_on = fail_on

    def write(self, data):
        if self._fail_on == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)

    def close(self):
        self._file.close()
        if self._fail_on == "close":
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fail_on", ["write", "close"])
def test_disk_full_stops_the_run_naming_the_output_even_with_skip_corrupt(
        tmp_path, monkeypatch, capsys, fail_on):
    """Before: ENOSPC was reported as 'unreadable parquet'; with --skip-corrupt the units were
    cached as corrupt and the run exited 0 with a 'finished' stats.json missing their tokens."""
    for i in range(2):
        write_parquet(tmp_path / "in" / f"{i:03d}.parquet", many_docs(60, seed=40 + i))
    glob = str(tmp_path / "in" / "*.parquet")
    out = tmp_path / "out"
    real_open = shards.open_output
    monkeypatch.setattr(shards, "open_output", lambda path: FullDisk(path, fail_on))
    for extra in ([], ["--skip-corrupt"]):
        rc = tokenize.main(["--input", glob, "--output", str(out), "--workers", "1", "--quiet",
                            *extra])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "ENOSPC" in err and str(out / "train") in err and "parquet" not in err
        assert not (out / "stats.json").exists()
        assert not list((out / "parts").glob("*.json")) and not list(out.rglob("*.tmp"))
    # Space freed: the same command finishes with every token.
    monkeypatch.setattr(shards, "open_output", real_open)
    stats = tokenize.tokenize(glob, out, skip_corrupt=True, progress=False)
    assert stats["corrupt"] == [] and stats["documents"] == 120


def test_units_skipped_as_corrupt_are_retried(tmp_path):
    """Before: a unit once recorded as corrupt stayed skipped even after the file was fixed."""
    good = many_docs(30, seed=5)
    src = write_parquet(tmp_path / "in" / "a.parquet", good)
    intact = src.read_bytes()
    # A bad page (the footer still reads, so the unit is planned and fails while tokenizing),
    # same size, so the unit's signature is unchanged when the file is repaired.
    src.write_bytes(intact[:4] + b"\xff" * 200 + intact[204:])
    glob = str(src)
    assert tokenize.tokenize(glob, tmp_path / "out", skip_corrupt=True,
                             progress=False)["documents"] == 0
    src.write_bytes(intact)  # re-downloaded
    stats = tokenize.tokenize(glob, tmp_path / "out", skip_corrupt=True, progress=False)
    assert stats["corrupt"] == [] and stats["documents"] == 30


@pytest.mark.parametrize("flag,value", [("--batch-rows", "0"), ("--shard-rows", "-1"),
                                        ("--workers", "0"), ("--val-fraction", "1.5")])
def test_numeric_arguments_are_checked_before_any_output(tmp_path, capsys, flag, value):
    """Before: --batch-rows 0 read no rows and 'finished' with 0 tokens."""
    src = write_parquet(tmp_path / "in" / "a.parquet", many_docs(5, seed=6))
    rc = tokenize.main(["--input", str(src), "--output", str(tmp_path / "out"), "--quiet",
                        flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_shards_record_vocab_size_and_max_id(tmp_path, llama3):
    src = write_parquet(tmp_path / "in" / "a.parquet", AWKWARD)
    stats = tokenize.tokenize(str(src), tmp_path / "out", val_fraction=0.0, progress=False)
    assert stats["vocab_size"] == llama3.vocab_size
    tokens = read_split(tmp_path / "out", "train")
    assert stats["shards"][0]["train"]["max_id"] == int(tokens.max()) == EOS
    assert stats["shards"][0]["validation"]["max_id"] == -1
