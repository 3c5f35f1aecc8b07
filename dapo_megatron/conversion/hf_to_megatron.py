"""Load a Hugging Face checkpoint into this rank's shard of a Megatron-Core ``GPTModel``, in memory."""

from __future__ import annotations

import torch

from dapo_megatron.conversion.hf_io import HFCheckpointReader
from dapo_megatron.conversion.names import expert_offset, stage_layer_offset, to_global, unwrap_model
from dapo_megatron.conversion.tables import NameResolver, mappings_for
from dapo_megatron.conversion.transforms import ShardContext
from dapo_megatron.models import (
    arch_from_hf_config,
    build_gpt_model,
    padded_vocab_size,
    transformer_config_from_arch,
)
from dapo_megatron.models.builder import have_transformer_engine
from dapo_megatron.models.hf_arch import ModelArch
from dapo_megatron.parallel.layout import ParallelLayout


def check_hf_names(reader: HFCheckpointReader, arch: ModelArch, resolver: NameResolver) -> None:
    """Every tensor in the checkpoint must be one the table knows (no silently dropped weights)."""
    unknown = [n for n in reader.names() if not resolver.hf_known(n, arch.num_layers)]
    if arch.tie_word_embeddings:
        # Some tied checkpoints still store lm_head.weight; it must then equal the embedding.
        unknown = [n for n in unknown if n != "lm_head.weight"]
    if unknown:
        raise ValueError(
            f"HF checkpoint {reader.hf_dir} has {len(unknown)} tensor(s) with no conversion mapping for "
            f"{arch.family}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )


@torch.no_grad()
def load_hf_into_megatron(
    model, arch: ModelArch, hf_dir_or_reader, *, tp_rank: int, tp_size: int, padded_vocab_size: int
) -> int:
    """Copy HF weights into every parameter of ``model`` (this rank's TP shard and PP stage).

    Returns the number of parameters loaded. Raises ``ValueError``/``KeyError`` naming the tensor
    for missing, unmapped or wrongly shaped weights.
    """
    reader = (
        hf_dir_or_reader
        if isinstance(hf_dir_or_reader, HFCheckpointReader)
        else HFCheckpointReader(hf_dir_or_reader)
    )
    model = unwrap_model(model)
    resolver = NameResolver(mappings_for(arch, transformer_engine=have_transformer_engine()))
    check_hf_names(reader, arch, resolver)
    ctx = ShardContext(arch=arch, tp_rank=tp_rank, tp_size=tp_size, padded_vocab_size=padded_vocab_size)
    offset, experts = stage_layer_offset(model), expert_offset(model)
    loaded = 0
    for local_name, param in model.named_parameters():
        name = to_global(local_name, offset, experts)
        row, layer = resolver.megatron(name)
        hf_names = row.hf_names(layer)
        tensors = [reader.read(n) for n in hf_names]  # plain reads: RSS bounded by live tensors
        row.transform.check(hf_names, tensors, ctx)
        shard = row.transform.to_shard(hf_names, tensors, ctx)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(
                f"HF tensor(s) {list(hf_names)} give shape {tuple(shard.shape)} for Megatron parameter "
                f"{name!r}, which has shape {tuple(param.shape)} (config/weight mismatch?)"
            )
        param.copy_(shard.to(param.dtype))
        loaded += 1
    return loaded


def build_megatron_from_hf(
    hf_dir,
    layout: ParallelLayout,
    *,
    dtype: str = "fp32",
    vocab_pad_multiple: int = 128,
    recompute: str = "none",
    load_weights: bool = True,
    moe=None,
):
    """Build this rank's ``GPTModel`` shard for ``hf_dir`` at ``layout`` and load the HF weights.
    ``moe``: :class:`~dapo_megatron.models.MoESettings` (default: aux loss off, no replay).

    Returns ``(model, arch, transformer_config, padded_vocab_size)``; see
    :func:`dapo_megatron.loading.build_model_from_hf` for the policy-facing wrapper. Call after
    :func:`dapo_megatron.parallel.groups.initialize_parallel`. With ``load_weights=False`` the
    model keeps Megatron's random initialisation (e.g. when a Megatron checkpoint is loaded next).
    """
    from megatron.core import parallel_state

    arch = arch_from_hf_config(hf_dir)
    config = transformer_config_from_arch(
        arch, layout, dtype=dtype, recompute=recompute, **({"moe": moe} if moe else {})
    )
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
    return model, arch, config, vocab
