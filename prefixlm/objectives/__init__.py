"""The training objectives: one-hot CE, label smoothing and the prefix-aware families.

Entry points: ``build(name, token_bytes, eps=..., ...)`` returns an ``Objective`` whose
``chunked_loss`` is the fused, exact loss; ``FAMILIES`` is the registry of families by name.
Modules: ``registry`` (families, hyperparameters, validation), ``families`` (the seven
objectives' targets), ``fused_loss`` (the chunked loss that never materialises q),
``eps_schedule`` (eps over training).
"""

from prefixlm.objectives.families import build
from prefixlm.objectives.registry import FAMILIES

__all__ = ["FAMILIES", "build"]
