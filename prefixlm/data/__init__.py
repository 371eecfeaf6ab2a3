"""FineWeb-Edu download, tokenization into shards, and the grain input pipeline."""
