"""prefixlm.objectives."""
