"""Declarative HF <-> Megatron-Core parameter tables, one per architecture family.

A row says: this Megatron parameter is built from these HF tensors by this transform. ``{layer}``
is the *global* layer index (Megatron's module names use the stage-local index; the loader and
exporter translate). Adding an architecture is adding a table, not control flow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from dapo_megatron.conversion.transforms import (
    FUSED_QKV,
    GATED_MLP,
    REPLICATED,
    ROW_PARALLEL,
    VOCAB_PARALLEL,
    Transform,
)
from dapo_megatron.models.hf_arch import ModelArch


@dataclass(frozen=True)
class WeightMapping:
    megatron: str
    hf: tuple[str, ...]
    transform: Transform

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(layer=layer) for n in self.hf)


_L = "decoder.layers.{layer}"
_H = "model.layers.{layer}"

LLAMA: tuple[WeightMapping, ...] = (
    WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB_PARALLEL),
    WeightMapping(f"{_L}.input_layernorm.weight", (f"{_H}.input_layernorm.weight",), REPLICATED),
    WeightMapping(
        f"{_L}.self_attention.linear_qkv.weight",
        (f"{_H}.self_attn.q_proj.weight", f"{_H}.self_attn.k_proj.weight", f"{_H}.self_attn.v_proj.weight"),
        FUSED_QKV,
    ),
    WeightMapping(
        f"{_L}.self_attention.linear_proj.weight", (f"{_H}.self_attn.o_proj.weight",), ROW_PARALLEL
    ),
    WeightMapping(f"{_L}.pre_mlp_layernorm.weight", (f"{_H}.post_attention_layernorm.weight",), REPLICATED),
    WeightMapping(
        f"{_L}.mlp.linear_fc1.weight", (f"{_H}.mlp.gate_proj.weight", f"{_H}.mlp.up_proj.weight"), GATED_MLP
    ),
    WeightMapping(f"{_L}.mlp.linear_fc2.weight", (f"{_H}.mlp.down_proj.weight",), ROW_PARALLEL),
    WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    WeightMapping("output_layer.weight", ("lm_head.weight",), VOCAB_PARALLEL),
)

QWEN2: tuple[WeightMapping, ...] = LLAMA + (
    WeightMapping(
        f"{_L}.self_attention.linear_qkv.bias",
        (f"{_H}.self_attn.q_proj.bias", f"{_H}.self_attn.k_proj.bias", f"{_H}.self_attn.v_proj.bias"),
        FUSED_QKV,
    ),
)

QWEN3: tuple[WeightMapping, ...] = LLAMA + (
    WeightMapping(f"{_L}.self_attention.q_layernorm.weight", (f"{_H}.self_attn.q_norm.weight",), REPLICATED),
    WeightMapping(f"{_L}.self_attention.k_layernorm.weight", (f"{_H}.self_attn.k_norm.weight",), REPLICATED),
)

TABLES: dict[str, tuple[WeightMapping, ...]] = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3}

# TransformerEngine's layer spec fuses the pre-attention / pre-MLP norms into the next linear.
TE_RENAMES = {
    f"{_L}.input_layernorm.weight": f"{_L}.self_attention.linear_qkv.layer_norm_weight",
    f"{_L}.pre_mlp_layernorm.weight": f"{_L}.mlp.linear_fc1.layer_norm_weight",
}


def mappings_for(arch: ModelArch, *, transformer_engine: bool = False) -> tuple[WeightMapping, ...]:
    """The table for ``arch``, adjusted for tied embeddings and the layer spec in use."""
    if arch.family not in TABLES:
        raise ValueError(
            f"no conversion table for architecture family {arch.family!r}; have {sorted(TABLES)}"
        )
    rows = []
    for row in TABLES[arch.family]:
        if row.megatron == "output_layer.weight" and arch.tie_word_embeddings:
            # Tied: the last stage's output layer is a copy of the embedding; HF stores it once.
            row = replace(row, hf=("model.embed_tokens.weight",))
        if transformer_engine and row.megatron in TE_RENAMES:
            row = replace(row, megatron=TE_RENAMES[row.megatron])
        rows.append(row)
    return tuple(rows)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{layer\}", r"(\d+)") + "$")


class NameResolver:
    """Matches concrete parameter names against a table, in both directions."""

    def __init__(self, rows: tuple[WeightMapping, ...]):
        self.rows = rows
        self._megatron = [(_pattern(r.megatron), r) for r in rows]
        self._hf = [(_pattern(t), r) for r in rows for t in r.hf]

    def megatron(self, name: str) -> tuple[WeightMapping, int | None]:
        """``(row, layer)`` for a Megatron parameter name with a *global* layer index."""
        for pattern, row in self._megatron:
            m = pattern.match(name)
            if m:
                return row, (int(m.group(1)) if row.per_layer else None)
        raise KeyError(f"no conversion mapping for Megatron parameter {name!r}")

    def hf_known(self, name: str, num_layers: int) -> bool:
        for pattern, row in self._hf:
            m = pattern.match(name)
            if m and (not row.per_layer or int(m.group(1)) < num_layers):
                return True
        return False
