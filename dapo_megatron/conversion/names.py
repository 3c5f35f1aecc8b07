"""Stage-local <-> global layer indices in Megatron parameter names.

Megatron names a pipeline stage's layers ``decoder.layers.0..n-1``; the tables use global
indices. ``layer_number`` (1-based, global) on each ``TransformerLayer`` gives the offset.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


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
