"""prefixlm.train."""
