"""prefixlm.model."""
