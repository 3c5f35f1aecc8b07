"""Model architecture description and the (single) Megatron-Core model builder."""

from dapo_megatron.models.builder import (
    MoESettings,
    build_gpt_model,
    padded_vocab_size,
    pipeline_layer_split,
    transformer_config_from_arch,
)
from dapo_megatron.models.hf_arch import SUPPORTED_MODEL_TYPES, ModelArch, arch_from_hf_config

__all__ = [
    "ModelArch",
    "MoESettings",
    "SUPPORTED_MODEL_TYPES",
    "arch_from_hf_config",
    "build_gpt_model",
    "padded_vocab_size",
    "pipeline_layer_split",
    "transformer_config_from_arch",
]
