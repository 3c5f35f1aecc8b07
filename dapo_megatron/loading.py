"""Loading the policy model: build this rank's Megatron-Core shard from HF weights or a checkpoint.

The one place that turns a model directory into a :class:`LoadedModel` (the model plus what is
needed to interpret it). It sits above :mod:`dapo_megatron.conversion` (which it imports, never the
reverse) and below :mod:`dapo_megatron.policy` and the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dapo_megatron.conversion.checkpoint import build_megatron_from_checkpoint
from dapo_megatron.conversion.hf_to_megatron import build_megatron_from_hf
from dapo_megatron.models import ModelArch, MoESettings
from dapo_megatron.parallel.layout import ParallelLayout

__all__ = ["LoadedModel", "build_model_from_checkpoint", "build_model_from_hf"]


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
            ep_group=ps.get_expert_model_parallel_group() if self.layout.ep > 1 else None,
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
    moe: MoESettings | None = None,
) -> LoadedModel:
    """This rank's shard of the HF model at ``hf_dir`` (see
    :func:`~dapo_megatron.conversion.hf_to_megatron.build_megatron_from_hf`)."""
    model, arch, config, vocab = build_megatron_from_hf(
        hf_dir, layout, dtype=dtype, vocab_pad_multiple=vocab_pad_multiple, recompute=recompute,
        load_weights=load_weights, moe=moe,
    )
    return LoadedModel(model=model, arch=arch, config=config, layout=layout, padded_vocab_size=vocab)


def build_model_from_checkpoint(
    path: str | Path, layout: ParallelLayout, *, recompute: str = "none", moe: MoESettings | None = None
) -> LoadedModel:
    """This rank's shard of the model checkpoint at ``path``, resharded to ``layout`` (see
    :func:`~dapo_megatron.conversion.checkpoint.build_megatron_from_checkpoint`)."""
    model, arch, config, vocab = build_megatron_from_checkpoint(path, layout, recompute=recompute, moe=moe)
    return LoadedModel(model=model, arch=arch, config=config, layout=layout, padded_vocab_size=vocab)
