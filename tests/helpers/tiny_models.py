"""Tiny random Hugging Face models built from configs (no hub access), for fast parity tests.

Shapes are chosen to exercise the awkward cases: a vocabulary not divisible by 2 or 4, an odd
number of layers, grouped-query attention, qkv bias (Qwen2), q/k norm (Qwen3), tied and untied
embeddings; Qwen3-MoE with 4 experts, top-2, with and without ``norm_topk_prob``.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_ARCHS = ("llama", "qwen2", "qwen2-tied", "qwen3")
TINY_MOE_ARCHS = ("qwen3_moe", "qwen3_moe-unnormed")


def tiny_hf_config(arch: str, *, num_layers: int = 3, vocab_size: int = 1003, hidden_size: int = 64):
    """A transformers config for a tiny model of ``arch`` (one of :data:`TINY_ARCHS`)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size + 32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch in ("qwen2", "qwen2-tied"):
        return Qwen2Config(**common, tie_word_embeddings=(arch == "qwen2-tied"))
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden_size // 4, tie_word_embeddings=False)
    if arch in TINY_MOE_ARCHS:
        return Qwen3MoeConfig(
            **common,
            head_dim=hidden_size // 4,
            tie_word_embeddings=False,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden_size // 2 + 16,
            norm_topk_prob=arch == "qwen3_moe",
        )
    raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS + TINY_MOE_ARCHS}")


def make_tiny_hf_model(arch: str, out_dir: str | Path | None = None, *, seed: int = 0, **config_kwargs):
    """Build a random fp32 model of ``arch``; save it (safetensors) to ``out_dir`` if given.

    Weights are re-drawn with a larger std than the HF default so logits are not nearly uniform
    and parity tests can actually fail.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.08)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir, safe_serialization=True)
    return model
