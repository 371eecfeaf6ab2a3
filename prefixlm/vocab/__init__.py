"""prefixlm.vocab."""
