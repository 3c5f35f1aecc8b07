"""Stage-local <-> global layer and expert indices in Megatron parameter names.

Megatron names a pipeline stage's layers ``decoder.layers.0..n-1``; the tables use global
indices. ``layer_number`` (1-based, global) on each ``TransformerLayer`` gives the offset.
Likewise an expert-parallel rank names its experts ``local_experts.0..n-1`` (local spec) or
``weight0..n-1`` (TE grouped GEMM); the MoE layer's ``local_expert_indices`` gives the offset.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)|(\.mlp\.experts\.linear_fc[12]\.weight)(\d+)$")


def stage_layer_offset(model) -> int:
    """Global index of this stage's first transformer layer."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if not layers:
        return 0
    return layers[0].layer_number - 1


def shift_layer(name: str, offset: int) -> str:
    """``decoder.layers.i.*`` -> ``decoder.layers.(i + offset).*``; other names unchanged."""
    m = _LAYER.match(name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) + offset}." + name[m.end() :]


def unwrap_model(model):
    """Strip DDP / Float16Module wrappers (``.module``) down to the ``GPTModel``."""
    while hasattr(model, "module"):
        model = model.module
    return model


def expert_offset(model) -> int:
    """Global index of this expert-parallel rank's first expert (0 for a dense model)."""
    for module in model.modules():
        indices = getattr(module, "local_expert_indices", None)
        if indices:
            return int(indices[0])
    return 0


def shift_expert(name: str, offset: int) -> str:
    """Local expert index -> global (``offset`` added) in an expert parameter name."""
    if not offset:
        return name
    m = _EXPERT.search(name)
    if not m:
        return name
    if m.group(1):
        return name[: m.start(2)] + str(int(m.group(2)) + offset) + name[m.end(2) :]
    return name[: m.start(5)] + str(int(m.group(5)) + offset)


def to_global(name: str, layer_offset: int, expert_offset: int) -> str:
    """A stage- and EP-rank-local Megatron parameter name -> the tables' global name."""
    return shift_expert(shift_layer(name, layer_offset), expert_offset)


def is_expert_param(name: str) -> bool:
    """True for the weights of a routed expert (split over expert-parallel ranks)."""
    return _EXPERT.search(name) is not None
