"""The model: a Llama 3 style decoder in Flax NNX and its attention kernels.

Entry points: ``Llama`` and ``ModelConfig`` (from ``llama``); ``attention.resolve`` picks one
kernel per backend (XLA, blockwise, cuDNN, splash) and checks it at start-up.
"""

from prefixlm.model.llama import Llama, ModelConfig

__all__ = ["Llama", "ModelConfig"]
