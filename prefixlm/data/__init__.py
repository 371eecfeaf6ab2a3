"""The training data: FineWeb-Edu download, exact Llama 3 tokenization into shards, the grain
input pipeline, and the small offline corpus of the demo.

- ``fineweb``: ``python -m prefixlm.data.fineweb`` downloads just enough parquet files for a
  token budget (spread over crawl dumps).
- ``tokenize``: ``python -m prefixlm.data.tokenize`` turns parquet into uint32 token shards with
  a held-out validation split (``stats.json``).
- ``shards``: reading and checking shards; ``pipeline``: the grain iterator (exact resume).
- ``budget``: does a split hold the run's tokens.
- ``corpus.prepare_demo()``: the embedded offline corpus, as shards, for ``make demo`` and tests.
"""
