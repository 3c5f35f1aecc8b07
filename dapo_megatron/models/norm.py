"""RMSNorm for the Megatron-Core local layer spec, usable with sequence parallelism.

Megatron-Core's ``WrappedTorchNorm`` refuses sequence parallelism. Under SP a norm sees only its
rank's slice of the sequence, so its weight gradient is partial; Megatron's
``finalize_model_grads`` all-reduces it over the TP group for parameters tagged
``sequence_parallel = True``, which is all this class adds to ``torch.nn.RMSNorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with Megatron's constructor signature and SP tagging."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
