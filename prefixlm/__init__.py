"""prefixlm: prefix-aware label smoothing for Llama-3-style language models in JAX/Flax."""

__version__ = "0.1.0"
