"""prefixlm.run."""
