"""Declarative HF <-> Megatron-Core parameter tables, one per architecture family.

A row says: this Megatron parameter is built from these HF tensors by this transform. ``{layer}``
is the *global* layer index (Megatron's module names use the stage-local index; the loader and
exporter translate). ``{expert}`` is the *global* expert index; :func:`mappings_for` expands it
into one row per expert (Megatron's names use the expert index local to the expert-parallel rank,
see :mod:`dapo_megatron.conversion.names`). Adding an architecture is adding a table, not control
flow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from dapo_megatron.conversion.transforms import (
    EXPERT_GATED_MLP,
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

_DENSE_MLP = (f"{_L}.mlp.linear_fc1.weight", f"{_L}.mlp.linear_fc2.weight")
_E = f"{_L}.mlp.experts.local_experts.{{expert}}"  # SequentialMLP (local spec)
_HE = f"{_H}.mlp.experts.{{expert}}"

# Qwen3-MoE: Qwen3 attention; every MLP is a router + experts (no shared expert).
QWEN3_MOE: tuple[WeightMapping, ...] = tuple(r for r in QWEN3 if r.megatron not in _DENSE_MLP) + (
    WeightMapping(f"{_L}.mlp.router.weight", (f"{_H}.mlp.gate.weight",), REPLICATED),
    WeightMapping(
        f"{_E}.linear_fc1.weight", (f"{_HE}.gate_proj.weight", f"{_HE}.up_proj.weight"), EXPERT_GATED_MLP
    ),
    WeightMapping(f"{_E}.linear_fc2.weight", (f"{_HE}.down_proj.weight",), ROW_PARALLEL),
)

TABLES: dict[str, tuple[WeightMapping, ...]] = {
    "llama": LLAMA,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "qwen3_moe": QWEN3_MOE,
}

# TransformerEngine's layer spec fuses the pre-attention / pre-MLP norms into the next linear
# (dense MLPs only: an MoE layer keeps its pre-MLP norm), and its grouped-GEMM experts
# (TEGroupedMLP) name expert e's weights ``linear_fc1.weight{e}``.
TE_RENAMES = {
    f"{_L}.input_layernorm.weight": f"{_L}.self_attention.linear_qkv.layer_norm_weight",
    f"{_L}.pre_mlp_layernorm.weight": f"{_L}.mlp.linear_fc1.layer_norm_weight",
}
TE_MOE_RENAMES = {
    f"{_L}.input_layernorm.weight": f"{_L}.self_attention.linear_qkv.layer_norm_weight",
    f"{_E}.linear_fc1.weight": f"{_L}.mlp.experts.linear_fc1.weight{{expert}}",
    f"{_E}.linear_fc2.weight": f"{_L}.mlp.experts.linear_fc2.weight{{expert}}",
}


def mappings_for(arch: ModelArch, *, transformer_engine: bool = False) -> tuple[WeightMapping, ...]:
    """The table for ``arch``, adjusted for tied embeddings and the layer spec in use."""
    if arch.family not in TABLES:
        raise ValueError(
            f"no conversion table for architecture family {arch.family!r}; have {sorted(TABLES)}"
        )
    renames = (TE_MOE_RENAMES if arch.is_moe else TE_RENAMES) if transformer_engine else {}
    rows = []
    for row in TABLES[arch.family]:
        if row.megatron == "output_layer.weight" and arch.tie_word_embeddings:
            # Tied: the last stage's output layer is a copy of the embedding; HF stores it once.
            row = replace(row, hf=("model.embed_tokens.weight",))
        if row.megatron in renames:
            row = replace(row, megatron=renames[row.megatron])
        if "{expert}" in row.megatron:
            rows.extend(_for_expert(row, e) for e in range(arch.num_experts))
        else:
            rows.append(row)
    return tuple(rows)


def _for_expert(row: WeightMapping, expert: int) -> WeightMapping:
    def fill(template: str) -> str:
        return template.replace("{expert}", str(expert))

    return replace(row, megatron=fill(row.megatron), hf=tuple(fill(n) for n in row.hf))


class NameResolver:
    """Matches concrete parameter names against a table, in both directions."""

    def __init__(self, rows: tuple[WeightMapping, ...]):
        self.rows = rows
        # Keyed by the name with its layer index replaced by "{layer}": one dict lookup per name
        # (an MoE table has a row per expert, too many to try as patterns one by one).
        self._megatron = {r.megatron: r for r in rows}
        self._hf = {t: r for r in rows for t in r.hf}

    @staticmethod
    def _template(name: str) -> tuple[str, int | None]:
        m = _LAYER_INDEX.search(name)
        if not m:
            return name, None
        return name[: m.start(1)] + "{layer}" + name[m.end(1) :], int(m.group(1))

    def megatron(self, name: str) -> tuple[WeightMapping, int | None]:
        """``(row, layer)`` for a Megatron parameter name with a *global* layer index."""
        template, layer = self._template(name)
        row = self._megatron.get(template) if layer is not None else self._megatron.get(name)
        if row is None:
            raise KeyError(f"no conversion mapping for Megatron parameter {name!r}")
        return row, (layer if row.per_layer else None)

    def hf_known(self, name: str, num_layers: int) -> bool:
        template, layer = self._template(name)
        if layer is not None and template in self._hf:
            return layer < num_layers
        return name in self._hf


_LAYER_INDEX = re.compile(r"^(?:decoder|model)\.layers\.(\d+)\.")
