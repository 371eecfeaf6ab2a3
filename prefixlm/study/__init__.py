"""prefixlm.study.runs."""
