"""prefixlm.core."""
