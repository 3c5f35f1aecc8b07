"""Architecture facts read from a Hugging Face ``config.json``.

:class:`ModelArch` is the framework's own, validated description of a decoder-only model; the
model builder and the conversion tables only ever read this, never the raw HF config, so adding
an architecture means teaching :func:`arch_from_hf_config` its config fields (and adding its
name table in :mod:`dapo_megatron.conversion.tables`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# HF ``model_type`` -> conversion-table family.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
# Megatron-Core's built-in RoPE scaling is Llama-3.1 style with these fixed constants.
_MCORE_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class ModelArch:
    """A decoder-only transformer, as far as building and converting it is concerned."""

    family: str  # key of the conversion table: "llama", "qwen2", "qwen3", "qwen3_moe"
    model_type: str  # HF model_type
    hf_architecture: str  # e.g. "Qwen2ForCausalLM"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # number of key/value heads (GQA)
    head_dim: int
    vocab_size: int  # true vocabulary, before padding for TP
    max_position_embeddings: int
    rope_theta: float
    rope_scaling_factor: float | None  # Llama-3.1 style scaling factor, None if unscaled
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    # Mixture of experts (0 experts: a dense MLP in every layer). Every layer is an MoE layer.
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0  # intermediate size of one expert
    moe_router_topk: int = 0  # experts per token
    # HF ``norm_topk_prob``: renormalise the top-k softmax probabilities to sum to 1.
    moe_norm_topk_prob: bool = True

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(cfg: dict, key: str, source: str):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{source}: required field {key!r} is missing")
    return cfg[key]


def arch_from_hf_config(hf_config: Any, source: str = "config.json") -> ModelArch:
    """Build a :class:`ModelArch` from a transformers config object, a dict, or a model directory."""
    if isinstance(hf_config, (str, Path)):
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"no HF config at {path}")
        source = str(path)
        cfg = json.loads(path.read_text())
    elif isinstance(hf_config, dict):
        cfg = dict(hf_config)
    else:
        cfg = hf_config.to_dict()

    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: unsupported architecture model_type={model_type!r}; "
            f"supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    family = SUPPORTED_MODEL_TYPES[model_type]
    heads = int(_require(cfg, "num_attention_heads", source))
    hidden = int(_require(cfg, "hidden_size", source))
    head_dim = cfg.get("head_dim") or hidden // heads
    rope_theta = cfg.get("rope_theta")
    rope_params = cfg.get("rope_parameters") or {}
    if rope_theta is None:
        rope_theta = rope_params.get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling") or (
        rope_params if rope_params.get("rope_type", "default") != "default" else None
    )
    scaling_factor = None
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3" or any(
            float(scaling.get(k, v)) != float(v) for k, v in _MCORE_LLAMA3_ROPE.items()
        ):
            raise ValueError(
                f"{source}: rope_scaling={scaling!r} is not supported (only Llama-3.1 style 'llama3' "
                f"scaling with {_MCORE_LLAMA3_ROPE})"
            )
        scaling_factor = float(scaling["factor"])
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={cfg.get('hidden_act')!r} is not supported (expected 'silu')")
    if family == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ValueError(f"{source}: Llama with attention_bias/mlp_bias is not supported")
    archs = cfg.get("architectures") or [f"{model_type.capitalize()}ForCausalLM"]
    moe = _moe_fields(cfg, source) if family == "qwen3_moe" else {}
    return ModelArch(
        family=family,
        model_type=model_type,
        hf_architecture=archs[0],
        num_layers=int(_require(cfg, "num_hidden_layers", source)),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size", source)),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        vocab_size=int(_require(cfg, "vocab_size", source)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=float(rope_theta),
        rope_scaling_factor=scaling_factor,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **moe,
    )


def _moe_fields(cfg: dict, source: str) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config (``num_experts`` is ``num_local_experts`` in
    transformers >= 5). Only all-MoE layer patterns are supported (Qwen3-30B-A3B, -235B-A22B)."""
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not num_experts:
        raise ValueError(f"{source}: required field 'num_experts' (or 'num_local_experts') is missing")
    if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
        raise ValueError(
            f"{source}: decoder_sparse_step={cfg.get('decoder_sparse_step')!r} / "
            f"mlp_only_layers={cfg.get('mlp_only_layers')!r} is not supported (only every layer MoE: "
            "decoder_sparse_step=1, mlp_only_layers=[])"
        )
    topk = int(_require(cfg, "num_experts_per_tok", source))
    if not 1 <= topk <= int(num_experts):
        raise ValueError(f"{source}: num_experts_per_tok={topk} must be in [1, num_experts={num_experts}]")
    return dict(
        num_experts=int(num_experts),
        moe_ffn_hidden_size=int(_require(cfg, "moe_intermediate_size", source)),
        moe_router_topk=topk,
        moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )
