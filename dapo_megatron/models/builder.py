"""The one place where a Megatron-Core model is built.

``build_gpt_model`` turns a :class:`~dapo_megatron.models.hf_arch.ModelArch` and a parallel
layout into an unmodified Megatron-Core ``GPTModel`` for this process's pipeline stage. It uses
the TransformerEngine layer spec when TE is importable and the local (pure PyTorch) spec
otherwise. Megatron-Core >= 0.19 deprecates ``GPTModel`` in favour of ``HybridModel``; keeping
construction here means a future switch touches one function.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dapo_megatron.models.hf_arch import ModelArch
from dapo_megatron.utils.dtypes import DTYPES


@dataclass(frozen=True)
class MoESettings:
    """Training-side choices for a mixture-of-experts policy (ignored by dense models).

    ``aux_loss_coeff``: weight of Megatron's load-balancing loss (0 = off, the RL default: it
    would otherwise pull the router away from the rollout engine's). ``routing_replay``: build the
    routers with Megatron's ``RouterReplay`` hook, so recorded expert choices can be replayed.
    """

    aux_loss_coeff: float = 0.0
    routing_replay: bool = False

    def __post_init__(self) -> None:
        if not self.aux_loss_coeff >= 0:
            raise ValueError(f"moe_aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Smallest size >= ``vocab_size`` divisible by ``multiple * tp`` (Megatron's convention)."""
    if multiple < 1:
        raise ValueError(f"vocab_pad_multiple must be >= 1, got {multiple}")
    step = multiple * tp
    return -(-vocab_size // step) * step


def pipeline_layer_split(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage; the first stage takes the remainder of an uneven split."""
    if pp > num_layers:
        raise ValueError(f"pipeline_model_parallel_size={pp} is larger than num_layers={num_layers}")
    base = num_layers // pp
    return [num_layers - base * (pp - 1)] + [base] * (pp - 1)


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def transformer_config_from_arch(
    arch: ModelArch,
    layout,
    *,
    dtype: str = "fp32",
    recompute: str = "none",
    moe: MoESettings | None = None,
    **overrides,
):
    """A Megatron ``TransformerConfig`` for ``arch`` at ``layout`` (a
    :class:`dapo_megatron.parallel.layout.ParallelLayout`: ``tp``, ``pp``, ``sp``, ``validate``; the
    parallel layer defines it, above this one).

    ``calculate_per_token_loss`` is always on: the loss function returns ``(sum, num_tokens)`` and
    Megatron divides by the token count of the whole global batch (see ``megatron/loss.py``).
    It must be set here, before DDP wrapping, because DDP reads it once at construction.

    MoE (``arch.is_moe``): the router runs in fp32 and picks the top-k experts the way HF's
    Qwen3-MoE does: softmax over all experts, top-k, renormalised when ``norm_topk_prob``
    (Megatron: top-k of the logits, then softmax over the k = the same probabilities); without
    renormalisation, softmax first (``moe_router_pre_softmax``). No token dropping. The
    load-balancing loss is off unless ``moe.aux_loss_coeff > 0``. ``moe.routing_replay`` creates
    Megatron's ``RouterReplay`` per layer (see :mod:`dapo_megatron.policy.routing_replay`).
    """
    from megatron.core.transformer import TransformerConfig

    layout.validate(arch)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    params_dtype = DTYPES[dtype]
    split = pipeline_layer_split(arch.num_layers, layout.pp)
    uneven = layout.pp > 1 and len(set(split)) > 1
    recompute_kwargs = {}
    if recompute == "selective":
        recompute_kwargs = dict(recompute_granularity="selective")
    elif recompute == "full":
        recompute_kwargs = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        sequence_parallel=layout.sp,
        context_parallel_size=layout.cp,
        num_layers_in_first_pipeline_stage=split[0] if uneven else None,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        calculate_per_token_loss=True,
        # Micro-batches are padded to their own longest sequence, so pipeline p2p shapes vary.
        variable_seq_lengths=True,
        # Dense models have no tokens to dispatch; Megatron rejects variable_seq_lengths with
        # the default "allgather" MoE dispatcher even then.
        moe_token_dispatcher_type="alltoall",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        **recompute_kwargs,
    )
    moe = moe or MoESettings()
    if arch.is_moe:
        kwargs.update(_moe_kwargs(arch, layout, moe))
    elif moe.aux_loss_coeff or moe.routing_replay:
        raise ValueError(
            f"moe_aux_loss_coeff / routing_replay need a mixture-of-experts model; {arch.model_type} has none"
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _moe_kwargs(arch: ModelArch, layout, moe: MoESettings) -> dict:
    """``layout``: a :class:`dapo_megatron.parallel.layout.ParallelLayout` (its ``tp``, ``ep``)."""
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.tp,
        # alltoall runs on gloo (all_to_all_single) as well as NCCL, and with variable lengths.
        moe_token_dispatcher_type="alltoall",
        moe_permute_fusion=False,
        moe_grouped_gemm=have_transformer_engine(),
        moe_enable_routing_replay=moe.routing_replay,
    )


def _define_te_gemm_fallback() -> None:
    """megatron-core 0.16 ``moe_utils`` binds ``te_general_gemm`` only when TransformerEngine
    imports, yet the fp32 router (``RouterGatingLinearFunction``) reads it unconditionally; without
    TE it must be ``None`` (the plain ``torch`` matmul path)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _layer_spec(config, arch: ModelArch):
    from megatron.core.models.gpt import gpt_layer_specs

    if have_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts or None, moe_grouped_gemm=arch.is_moe, qk_layernorm=arch.qk_norm
        )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from dapo_megatron.models.attention import local_core_attention
    from dapo_megatron.models.norm import RMSNorm

    # MoE on the local spec: SequentialMLP, one plain MLP per local expert.
    layer = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=arch.num_experts or None,
        moe_grouped_gemm=False,
        qk_layernorm=arch.qk_norm,
        normalization="RMSNorm",
    )
    sub = layer.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = local_core_attention()
    if arch.qk_norm:
        attn.q_layernorm = RMSNorm
        attn.k_layernorm = RMSNorm
    layer = ModuleSpec(module=layer.module, params=layer.params, submodules=sub)
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    # A block spec lists only this pipeline stage's layers (Megatron numbers them globally).
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=RMSNorm
    )


def build_gpt_model(
    arch: ModelArch,
    config,
    *,
    vocab_pad_multiple: int = 128,
    pre_process: bool | None = None,
    post_process: bool | None = None,
):
    """Build this rank's pipeline stage of a Megatron-Core ``GPTModel`` (call after
    ``parallel_state.initialize_model_parallel``). Returns the model on the compute device."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    if arch.is_moe:
        _define_te_gemm_fallback()
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(config, arch),
        vocab_size=padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size, vocab_pad_multiple),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    return model
