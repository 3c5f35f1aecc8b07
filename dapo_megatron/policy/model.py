"""Initialise Megatron parallel state and build a model loaded from a Hugging Face directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dapo_megatron.models import (
    ModelArch,
    ParallelLayout,
    arch_from_hf_config,
    build_gpt_model,
    padded_vocab_size,
    transformer_config_from_arch,
)


def initialize_parallel(layout: ParallelLayout, *, seed: int = 1234) -> None:
    """``initialize_model_parallel`` (TP, PP; DP is what remains of the world) and Megatron's RNGs.

    ``torch.distributed`` must already be initialised (``torchrun`` + ``init_process_group``).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world = dist.get_world_size()
    if world % (layout.tp * layout.pp):
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size * pipeline_model_parallel_size "
            f"= {layout.tp} * {layout.pp}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp
        )
    model_parallel_cuda_manual_seed(seed)


@dataclass
class LoadedModel:
    """This rank's stage of the policy, with what is needed to interpret it."""

    model: torch.nn.Module  # GPTModel (or its DDP wrapper)
    arch: ModelArch
    config: object  # megatron TransformerConfig
    layout: ParallelLayout
    padded_vocab_size: int

    def hf_tensors(self, **kwargs):
        """``(hf_name, full tensor)`` for the whole model, collectively over this rank's TP x PP
        group (see :func:`dapo_megatron.conversion.megatron_to_hf.iter_hf_tensors` for kwargs)."""
        from megatron.core import parallel_state as ps

        from dapo_megatron.conversion.megatron_to_hf import iter_hf_tensors

        return iter_hf_tensors(
            self.model,
            self.arch,
            padded_vocab_size=self.padded_vocab_size,
            tp_group=ps.get_tensor_model_parallel_group(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            **kwargs,
        )

    def hf_state_dict(self, **kwargs) -> dict[str, torch.Tensor]:
        """:meth:`hf_tensors` collected into a dict of copies (small models, tests)."""
        return {name: t.clone() for name, t in self.hf_tensors(**kwargs)}


def build_model_from_hf(
    hf_dir: str | Path,
    layout: ParallelLayout,
    *,
    dtype: str = "fp32",
    vocab_pad_multiple: int = 128,
    recompute: str = "none",
    load_weights: bool = True,
) -> LoadedModel:
    """Build this rank's ``GPTModel`` shard for ``hf_dir`` at ``layout`` and load the HF weights.

    Call after :func:`initialize_parallel`. With ``load_weights=False`` the model keeps Megatron's
    random initialisation (e.g. when a Megatron checkpoint is loaded next).
    """
    from megatron.core import parallel_state

    from dapo_megatron.conversion.hf_to_megatron import load_hf_into_megatron

    arch = arch_from_hf_config(hf_dir)
    config = transformer_config_from_arch(arch, layout, dtype=dtype, recompute=recompute)
    model = build_gpt_model(arch, config, vocab_pad_multiple=vocab_pad_multiple)
    vocab = padded_vocab_size(arch.vocab_size, layout.tp, vocab_pad_multiple)
    if load_weights:
        load_hf_into_megatron(
            model,
            arch,
            hf_dir,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=layout.tp,
            padded_vocab_size=vocab,
        )
    return LoadedModel(model=model, arch=arch, config=config, layout=layout, padded_vocab_size=vocab)
