"""prefixlm.evaluation."""
