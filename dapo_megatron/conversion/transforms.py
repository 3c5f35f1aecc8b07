"""Named tensor transforms between Hugging Face tensors and Megatron-Core TP shards.

Each transform knows how *one* Megatron parameter is made from its HF tensor(s) on tensor-parallel
rank ``r`` of ``tp`` (:meth:`to_shard`) and how the HF tensor(s) are recovered from all ``tp``
shards (:meth:`from_shards`). Both directions are pure slicing and concatenation, so a round trip
is bitwise exact. The tables in :mod:`dapo_megatron.conversion.tables` pair a transform with names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dapo_megatron.models.hf_arch import ModelArch


@dataclass(frozen=True)
class ShardContext:
    """What a transform needs to know about the model and this rank's place in it."""

    arch: ModelArch
    tp_rank: int
    tp_size: int
    padded_vocab_size: int


def _cat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` that returns a single tensor as is (TP=1 export without a copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=dim)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"HF tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)} from config"
        )


class Transform:
    """Base class: ``to_shard(hf_tensors) -> shard`` and ``from_shards(shards) -> hf_tensors``."""

    name = "transform"

    def expected_hf_shapes(self, names: Sequence[str], ctx: ShardContext) -> list[tuple[int, ...]] | None:
        return None

    def to_shard(
        self, names: Sequence[str], tensors: Sequence[torch.Tensor], ctx: ShardContext
    ) -> torch.Tensor:
        raise NotImplementedError

    def from_shards(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def check(self, names: Sequence[str], tensors: Sequence[torch.Tensor], ctx: ShardContext) -> None:
        shapes = self.expected_hf_shapes(names, ctx)
        if shapes is not None:
            for name, tensor, shape in zip(names, tensors, shapes):
                _check_shape(name, tensor, shape)

    def __repr__(self) -> str:
        return self.name


class Replicated(Transform):
    """The same tensor on every TP rank (norm weights)."""

    name = "replicated"

    def to_shard(self, names, tensors, ctx):
        return tensors[0]

    def from_shards(self, shards, ctx):
        return [shards[0]]


class TPSplit(Transform):
    """Split along ``dim`` over TP ranks: dim 0 for column-parallel, dim 1 for row-parallel."""

    def __init__(self, dim: int):
        self.dim = dim
        self.name = f"tp_split(dim={dim})"

    def to_shard(self, names, tensors, ctx):
        full = tensors[0]
        if full.shape[self.dim] % ctx.tp_size:
            raise ValueError(
                f"HF tensor {names[0]!r}: dim {self.dim} of size {full.shape[self.dim]} is not divisible by "
                f"tensor_model_parallel_size={ctx.tp_size}"
            )
        return full.chunk(ctx.tp_size, dim=self.dim)[ctx.tp_rank]

    def from_shards(self, shards, ctx):
        return [_cat(shards, self.dim)]


class VocabParallel(Transform):
    """Embedding / output rows: pad the vocabulary to ``padded_vocab_size`` with zero rows, then split
    rows over TP ranks. The padding is dropped again on the way back."""

    name = "vocab_parallel"

    def expected_hf_shapes(self, names, ctx):
        return [(ctx.arch.vocab_size, ctx.arch.hidden_size)]

    def to_shard(self, names, tensors, ctx):
        full = tensors[0]
        pad = ctx.padded_vocab_size - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])], dim=0)
        return full.chunk(ctx.tp_size, dim=0)[ctx.tp_rank]

    def from_shards(self, shards, ctx):
        return [_cat(shards, 0)[: ctx.arch.vocab_size]]


class FusedQKV(Transform):
    """``q_proj``, ``k_proj``, ``v_proj`` (weights or biases) -> Megatron's ``linear_qkv``.

    Megatron groups rows by key/value head: for each of the ``G`` query groups it stores the
    ``H/G`` query heads of that group, then the group's key head, then its value head. Whole groups
    are contiguous, so a TP shard is a contiguous block of ``G/tp`` groups.
    """

    name = "fused_qkv"

    def _dims(self, ctx):
        a = ctx.arch
        return a.num_query_groups, a.num_attention_heads // a.num_query_groups, a.head_dim

    def expected_hf_shapes(self, names, ctx):
        groups, heads_per_group, head_dim = self._dims(ctx)
        trailing = () if names[0].endswith("bias") else (ctx.arch.hidden_size,)
        q_rows, kv_rows = groups * heads_per_group * head_dim, groups * head_dim
        return [(q_rows, *trailing), (kv_rows, *trailing), (kv_rows, *trailing)]

    def to_shard(self, names, tensors, ctx):
        groups, heads_per_group, head_dim = self._dims(ctx)
        q, k, v = tensors
        trailing = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(groups, heads_per_group * head_dim, *trailing),
                k.reshape(groups, head_dim, *trailing),
                v.reshape(groups, head_dim, *trailing),
            ],
            dim=1,
        )
        return fused.chunk(ctx.tp_size, dim=0)[ctx.tp_rank].reshape(-1, *trailing)

    def from_shards(self, shards, ctx):
        groups, heads_per_group, head_dim = self._dims(ctx)
        fused = _cat(shards, 0)
        trailing = fused.shape[1:]
        fused = fused.reshape(groups, (heads_per_group + 2) * head_dim, *trailing)
        q, k, v = fused.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *trailing) for t in (q, k, v)]


class GatedMLP(Transform):
    """``gate_proj`` and ``up_proj`` -> Megatron's ``linear_fc1``. Each TP rank holds
    ``[gate shard; up shard]``, not a slice of ``[gate; up]``. ``expert=True``: one expert of an
    MoE layer (intermediate size ``moe_ffn_hidden_size``)."""

    def __init__(self, expert: bool = False):
        self.expert = expert
        self.name = "expert_gated_mlp" if expert else "gated_mlp"

    def ffn_size(self, ctx) -> int:
        return ctx.arch.moe_ffn_hidden_size if self.expert else ctx.arch.ffn_hidden_size

    def expected_hf_shapes(self, names, ctx):
        return [(self.ffn_size(ctx), ctx.arch.hidden_size)] * 2

    def to_shard(self, names, tensors, ctx):
        gate, up = tensors
        return torch.cat(
            [gate.chunk(ctx.tp_size, 0)[ctx.tp_rank], up.chunk(ctx.tp_size, 0)[ctx.tp_rank]], dim=0
        )

    def from_shards(self, shards, ctx):
        halves = [s.chunk(2, dim=0) for s in shards]
        return [_cat([h[0] for h in halves], 0), _cat([h[1] for h in halves], 0)]


REPLICATED = Replicated()
COLUMN_PARALLEL = TPSplit(dim=0)
ROW_PARALLEL = TPSplit(dim=1)
VOCAB_PARALLEL = VocabParallel()
FUSED_QKV = FusedQKV()
GATED_MLP = GatedMLP()
EXPERT_GATED_MLP = GatedMLP(expert=True)
