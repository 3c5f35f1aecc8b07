"""Fused causal attention for the local (non-TransformerEngine) layer spec.

Megatron-Core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix
(measured on an H100: MFU 0.27 at sequence 2048 vs 0.42-0.50 with fused attention). Our
sequences are right-padded and causal, so padding never influences a valid token and no padding
mask is needed: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` gives the
same result with flash/memory-efficient kernels on GPU and a fused kernel on CPU. An explicit
attention mask falls back to Megatron's implementation.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPACausalAttention(DotProductAttention):
    """``DotProductAttention`` computed by ``scaled_dot_product_attention`` (causal, GQA-aware)."""

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.config.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout,
            is_causal=True,
            scale=self.softmax_scale,
            enable_gqa=q.size(1) != k.size(1),
        )
        # [b, heads, s, hn] -> [s, b, heads * hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)


def local_core_attention() -> type:
    return SDPACausalAttention
