"""The vocabulary: the Llama 3 tokenizer and each token's byte-prefix set.

- ``tokenizer.load("llama3")``: the real Llama 3 tokenizer, offline (from ``llama-models``);
  ``token_bytes`` gives each id's bytes.
- ``prefixes.build(token_bytes)``: the dense padded index of P(s), the tokens whose bytes are a
  strict prefix of token s's bytes, cached on disk.
"""
