"""prefixlm.compile."""
