"""grain pipeline: windows reproduce the stream, disjoint process shards, exact resume."""

import json
import os

import numpy as np
import pytest

from prefixlm.data import budget, pipeline, shards

HASH = "0123456789abcdef"


def make_tokens(root, shard_sizes, *, val_sizes=(), tokenizer_hash=HASH):
    """A token directory holding one stream of unique values 0, 1, 2, ... split into shards.

    Unique tokens let a test tell exactly which stream positions a batch came from.
    """
    root.mkdir(parents=True, exist_ok=True)
    entries, nxt = [], 0
    val_sizes = list(val_sizes) + [0] * (len(shard_sizes) - len(val_sizes))
    for i, (n, nv) in enumerate(zip(shard_sizes, val_sizes, strict=True)):
        entry = {"name": f"s{i}"}
        for split, size in (("train", n), ("validation", nv)):
            (root / split).mkdir(exist_ok=True)
            f = f"{split}/s{i}.bin"
            base = nxt if split == "train" else 10**9 + nxt
            np.arange(base, base + size, dtype=shards.DTYPE).tofile(root / f)
            entry[split] = {"file": f, "documents": 1, "tokens": size}
        nxt += n
        entries.append(entry)
    splits = {s: {"documents": len(entries), "tokens": sum(e[s]["tokens"] for e in entries)}
              for s in shards.SPLITS}
    stats = {"format": shards.FORMAT, "tokenizer": "test", "tokenizer_hash": tokenizer_hash,
             "splits": splits, "shards": entries, "documents": 0, "tokens": 0, "skipped": 0}
    (root / "stats.json").write_text(json.dumps(stats))
    return str(root)


def window_ids(batch, seq_len):
    """Window index of each row (stream position of its first input / seq_len)."""
    starts = batch["inputs"][:, 0]
    assert (starts % seq_len == 0).all()
    return (starts // seq_len).tolist()


def collect(it, n=None):
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_windows_reproduce_the_stream(tmp_path):
    sizes = [7, 1, 30, 5, 40]  # tiny shards so windows span 2-4 of them
    path = make_tokens(tmp_path / "tok", sizes)
    L, N = 8, sum(sizes)
    batches = collect(pipeline.build_iterator(path, seq_len=L, batch_size=1, seed=0,
                                              num_epochs=1, shuffle=False))
    assert len(batches) == (N - 1) // L == pipeline.num_windows(path, L)
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (1, L)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
    inputs = np.concatenate([b["inputs"][0] for b in batches])
    targets = np.concatenate([b["targets"][0] for b in batches])
    n = len(batches) * L
    np.testing.assert_array_equal(inputs, np.arange(0, n))  # every stream token once as input
    np.testing.assert_array_equal(targets, np.arange(1, n + 1))  # and once as a target
    assert n + 1 <= N  # the short tail is dropped, never padded


def test_shuffled_epoch_is_a_permutation_and_epochs_differ(tmp_path):
    path = make_tokens(tmp_path / "tok", [100, 101, 99])
    L, B = 4, 3
    nw = pipeline.num_windows(path, L)
    it = pipeline.build_iterator(path, seq_len=L, batch_size=B, seed=7, num_epochs=2)
    ids = [i for b in collect(it) for i in window_ids(b, L)]
    assert len(ids) == (2 * nw) // B * B
    first = ids[:nw]
    assert sorted(first) == list(range(nw)) and first != sorted(first)
    assert ids[nw : nw + 20] != first[:20]  # reshuffled in epoch 2
    again = pipeline.build_iterator(path, seq_len=L, batch_size=B, seed=7, num_epochs=2)
    assert [i for b in collect(again) for i in window_ids(b, L)] == ids
    other = pipeline.build_iterator(path, seq_len=L, batch_size=B, seed=8, num_epochs=1)
    assert [i for b in collect(other) for i in window_ids(b, L)] != first[: len(ids) // 2]


@pytest.mark.parametrize("num_epochs", [1, None])
def test_process_shards_are_disjoint_and_cover(tmp_path, num_epochs):
    path = make_tokens(tmp_path / "tok", [203, 150])
    L, B, P = 4, 2, 3
    nw = pipeline.num_windows(path, L)  # 88 windows: not a multiple of P * B
    per_process = []
    for p in range(P):
        it = pipeline.build_iterator(path, seq_len=L, batch_size=B, seed=1, process_index=p,
                                     process_count=P, num_epochs=num_epochs)
        n = None if num_epochs else 2 * nw // (P * B)  # about two epochs of the endless stream
        per_process.append([i for b in collect(it, n) for i in window_ids(b, L)])
    if num_epochs == 1:
        assert len({len(x) for x in per_process}) == 1  # same number of batches everywhere
        assert len(per_process[0]) == nw // (P * B) * B == pipeline.steps_per_epoch(
            path, seq_len=L, batch_size=B, process_count=P) * B
    # Interleave back into the global order: consecutive global positions go to p = i % P.
    glob = [per_process[i % P][i // P] for i in range(P * len(per_process[0]))]
    for e in range(len(glob) // nw + 1):
        epoch = glob[e * nw : (e + 1) * nw]
        assert len(set(epoch)) == len(epoch)  # disjoint within an epoch
        if len(epoch) == nw:
            assert sorted(epoch) == list(range(nw))  # and every window is used
    if num_epochs == 1:
        assert len(glob) == nw // (P * B) * (P * B)


def test_restored_iterator_yields_the_same_batches(tmp_path):
    path = make_tokens(tmp_path / "tok", [500, 300])
    kw = dict(seq_len=16, batch_size=4, seed=3, process_index=1, process_count=2)
    it = pipeline.build_iterator(path, **kw)
    collect(it, 5)
    state = it.get_state()
    want = collect(it, 30)  # crosses an epoch boundary (24 windows per process per epoch)
    fresh = pipeline.build_iterator(path, **kw)
    fresh.set_state(json.loads(json.dumps(state)))  # what a checkpoint stores
    got = collect(fresh, 30)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])


def test_orbax_checkpoint_roundtrip(tmp_path):
    import orbax.checkpoint as ocp

    path = make_tokens(tmp_path / "tok", [400])
    kw = dict(seq_len=8, batch_size=2, seed=5)
    it = pipeline.build_iterator(path, **kw)
    collect(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=pipeline.checkpoint_args(it)))
        mngr.wait_until_finished()
    want = collect(it, 4)
    fresh = pipeline.build_iterator(path, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(3, args=ocp.args.Composite(
            data=pipeline.checkpoint_args(fresh, restore=True)))
    got = collect(restored["data"], 4)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_multiprocess_workers_match_in_process_and_resume(tmp_path):
    path = make_tokens(tmp_path / "tok", [300])
    kw = dict(seq_len=8, batch_size=2, seed=2, num_epochs=1)
    want = collect(pipeline.build_iterator(path, **kw))
    it = pipeline.build_iterator(path, worker_count=1, **kw)
    got = collect(it, 5)
    state = it.get_state()
    got += collect(it)
    assert [b["inputs"].tolist() for b in got] == [b["inputs"].tolist() for b in want]
    del it
    resumed = pipeline.build_iterator(path, worker_count=1, **kw)
    resumed.set_state(state)
    assert [b["inputs"].tolist() for b in collect(resumed)] == [
        b["inputs"].tolist() for b in want[5:]]


def test_validation_split(tmp_path):
    path = make_tokens(tmp_path / "tok", [100, 100], val_sizes=[30, 20])
    batches = collect(pipeline.build_iterator(path, seq_len=7, batch_size=1, seed=0,
                                              split="validation", num_epochs=1, shuffle=False))
    assert len(batches) == 49 // 7
    assert batches[0]["inputs"][0].tolist() == list(range(10**9, 10**9 + 7))
    assert pipeline.num_tokens(path, "validation") == 50


def test_refuses_other_tokenizer_and_unfinished_dirs(tmp_path):
    path = make_tokens(tmp_path / "tok", [100])
    with pytest.raises(ValueError, match="tokenizer_hash.*does not match.*ffff"):
        pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0,
                                expected_tokenizer_hash="ffff")
    pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0, expected_tokenizer_hash=HASH)
    with pytest.raises(FileNotFoundError, match="prefixlm.data.tokenize"):
        pipeline.build_iterator(str(tmp_path / "nope"), seq_len=4, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.build_iterator(path, seq_len=50, batch_size=2, seed=0)
    (tmp_path / "tok" / "train" / "s0.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=r"s0\.bin: expected 100 tokens"):
        pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)


def test_real_tokenized_stream_end_to_end(tmp_path, llama3):
    """tokenize -> pipeline on real text: unshuffled windows decode back to the documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefixlm.data import tokenize

    docs = [f"Document {i}: the quick brown fox, naïve café, <|end_of_text|>." for i in range(40)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet", row_group_size=10)
    tokenize.tokenize(str(tmp_path / "a.parquet"), tmp_path / "tok", val_fraction=0.0,
                      shard_rows=10, progress=False)
    L = 16
    batches = collect(pipeline.build_iterator(
        str(tmp_path / "tok"), seq_len=L, batch_size=1, seed=0, num_epochs=1, shuffle=False,
        expected_tokenizer_hash=llama3.vocab_hash))
    stream = np.concatenate([batches[0]["inputs"][0][:1]] + [b["targets"][0] for b in batches])
    text = llama3.decode_bytes(stream.tolist()).decode()
    assert text.startswith("Document 0: the quick brown fox, naïve café, <|end_of_text|>."
                           "<|end_of_text|>Document 1:")
    full = np.concatenate([np.fromfile(f, dtype=shards.DTYPE)
                           for f, _ in shards.split_files(tmp_path / "tok", "train")])
    np.testing.assert_array_equal(stream, full[: len(stream)])
    assert len(full) - len(stream) < L


@pytest.mark.parametrize("bad_id", [200_000, 2**31, 2**32 - 1])
def test_out_of_vocabulary_ids_are_refused_by_shard_and_id(tmp_path, bad_id):
    """Before: id 200000 gave NaN at step 1 and ids >= 2**31 wrapped to negative int32 silently."""
    path = make_tokens(tmp_path / "tok", [50, 60])
    stats_file = tmp_path / "tok" / "stats.json"
    stats = json.loads(stats_file.read_text())
    stats["vocab_size"] = 128256
    stats_file.write_text(json.dumps(stats))
    shard = tmp_path / "tok" / "train" / "s1.bin"
    ids = np.fromfile(shard, dtype=shards.DTYPE)
    ids[17] = bad_id
    ids.tofile(shard)
    with pytest.raises(shards.TokenIdError, match=rf"s1\.bin: token id {bad_id} at position 17"
                       r".*Re-tokenize") as info:
        pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)
    assert isinstance(info.value, ValueError)  # config/data errors exit 2 in main


def test_id_check_uses_the_model_vocab_and_caches_the_max(tmp_path, monkeypatch):
    path = make_tokens(tmp_path / "tok", [100])  # ids 0..99, no vocab_size recorded
    pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0, vocab_size=100)
    cached = json.loads((tmp_path / "tok" / "parts" / "s0.json").read_text())["id_check"]
    assert cached["train"]["max_id"] == 99
    calls = []
    real_memmap = np.memmap
    monkeypatch.setattr(np, "memmap", lambda *a, **k: calls.append(a) or real_memmap(*a, **k))
    pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0, vocab_size=100)
    assert calls == []  # computed once, not on every open
    with pytest.raises(shards.TokenIdError, match="token id 99 at position 99"):
        pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0, vocab_size=99)
    # A replaced shard (new mtime) is checked again rather than trusted from the cache.
    monkeypatch.setattr(np, "memmap", real_memmap)
    f = tmp_path / "tok" / "train" / "s0.bin"
    ids = np.fromfile(f, dtype=shards.DTYPE)
    ids[3] = 2**31 + 5
    ids.tofile(f)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(shards.TokenIdError, match=f"token id {2**31 + 5} at position 3"):
        pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)


def _record_checksums(root):
    """What tokenize records per shard file: its max id and its content checksum."""
    stats = json.loads((root / "stats.json").read_text())
    for shard in stats["shards"]:
        for split in shards.SPLITS:
            f = root / shard[split]["file"]
            ids = np.fromfile(f, dtype=shards.DTYPE)
            shard[split]["max_id"] = int(ids.max()) if ids.size else -1
            shard[split]["checksum"] = shards.file_checksum(f)
    stats["vocab_size"] = 128256
    (root / "stats.json").write_text(json.dumps(stats))


def _poke(f, position, value, keep_mtime=True):
    """Writes one id into a shard in place, same size, the old mtime restored."""
    st = f.stat()
    ids = np.fromfile(f, dtype=shards.DTYPE)
    ids[position] = value
    ids.tofile(f)
    if keep_mtime:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_shard_edited_after_tokenization_is_refused_by_content(tmp_path):
    """Before: the recorded max_id was trusted, so id 200000 written later reached the model."""
    root = tmp_path / "tok"
    path = make_tokens(root, [50, 60])
    _record_checksums(root)
    _poke(root / "train" / "s1.bin", 17, 200_000)
    with pytest.raises(shards.ShardChecksumError,
                       match=r"s1\.bin: content checksum .* the shard was changed after "
                             r"tokenization\. Re-tokenize") as info:
        pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)
    assert isinstance(info.value, ValueError)  # config/data errors exit 2 in main
    assert "\n" not in str(info.value)


def test_each_shard_is_hashed_once_then_trusted_until_it_changes(tmp_path, monkeypatch):
    root = tmp_path / "tok"
    path = make_tokens(root, [50, 60], val_sizes=[10, 0])
    _record_checksums(root)
    hashed = []
    real = shards.file_checksum
    monkeypatch.setattr(shards, "file_checksum", lambda f, *a: hashed.append(f) or real(f, *a))
    scans = []
    real_memmap = np.memmap
    monkeypatch.setattr(np, "memmap", lambda *a, **k: scans.append(a) or real_memmap(*a, **k))
    pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)
    assert sorted(p.name for p in hashed) == ["s0.bin", "s1.bin"] and scans == []
    hashed.clear()
    pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)
    assert hashed == [] and scans == []  # cached by (size, mtime, checksum) in parts/
    monkeypatch.undo()
    _poke(root / "train" / "s0.bin", 3, 7, keep_mtime=False)  # an in-vocabulary edit, new mtime
    with pytest.raises(shards.ShardChecksumError, match=r"s0\.bin"):
        pipeline.build_iterator(path, seq_len=4, batch_size=1, seed=0)


def _run(path, *, steps, batch_size=2, seq_len=4, allow_repeat=False):
    import types

    return types.SimpleNamespace(
        data=types.SimpleNamespace(path=path, seq_len=seq_len, allow_repeat=allow_repeat),
        train=types.SimpleNamespace(steps=steps, batch_size=batch_size))


def test_too_little_data_is_refused_naming_the_shortfall(tmp_path):
    """Before: nothing checked; the last steps silently repeated data."""
    from configs import base

    assert base.get_config().data.allow_repeat is False  # refusing is the default
    path = make_tokens(tmp_path / "tok", [50, 60])  # 110 tokens: 27 windows of 4, 2 documents
    with pytest.raises(budget.NotEnoughData) as info:
        budget.check_enough(_run(path, steps=40))  # 40 x 2 x 4 + 1 = 321 tokens
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg  # one line, exit 2 in main
    assert ("holds 110 tokens, but train.steps=40 x train.batch_tokens=8 needs 321; short by 211 "
            "tokens (about 4 more shard files of 55 tokens, or 4 more documents)") in msg
    assert "data.allow_repeat=True" in msg
    assert budget.check_enough(_run(path, steps=13)) == {  # 26 of 27 windows: enough
        "tokens_needed": 105, "tokens_held": 110, "windows_per_epoch": 27, "epochs": 1}
    with pytest.raises(budget.NotEnoughData):
        budget.check_enough(_run(path, steps=14))  # 28 windows > 27


def test_allow_repeat_trains_on_epochs_and_logs_each_boundary(tmp_path, caplog):
    path = make_tokens(tmp_path / "tok", [50, 60])
    with caplog.at_level("WARNING", logger="prefixlm.data"):
        info = budget.check_enough(_run(path, steps=30, allow_repeat=True))
        assert info["epochs"] == 3 and "reads 3 epochs of 27 windows" in caplog.text
        caplog.clear()
        it = pipeline.build_iterator(path, seq_len=4, batch_size=2, seed=0, prefetch_threads=0)
        batches = collect(it, 30)  # 60 windows: epochs 0, 1 and 2 (27 windows each)
    wraps = [r.getMessage() for r in caplog.records if "wraps" in r.getMessage()]
    assert len(wraps) == 2 and "epoch 1 begins (window 27" in wraps[0]
    assert "epoch 2 begins (window 54" in wraps[1]
    ids = [w for b in batches for w in window_ids(b, 4)]
    assert sorted(ids[:27]) == list(range(27)) == sorted(ids[27:54])  # each epoch: every window
    epochs = [budget.epoch_at_step(s, batch_size=2, windows_per_epoch=27) for s in range(30)]
    assert epochs == [0] * 14 + [1] * 13 + [2] * 3  # step 13 reads windows 26, 27: epoch 0 to 1
