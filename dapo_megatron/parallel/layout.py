"""How the world is split: the model layout (TP, PP, SP) and where the rollout engines live.

Pure arithmetic, no process groups: usable by the config checks, the memory plan and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dapo_megatron.models.hf_arch import ModelArch


@dataclass(frozen=True)
class ParallelLayout:
    """How a model is split: tensor (TP), pipeline (PP), sequence parallel (SP), context (CP),
    expert (EP).

    Experts are split over ``ep`` ranks carved out of the data-parallel x tensor-parallel ranks
    (Megatron's MoE parallel folding); each expert's MLP is itself split over the TP ranks
    (expert TP = TP, Megatron's default).
    """

    tp: int = 1
    pp: int = 1
    sp: bool = False
    cp: int = 1
    ep: int = 1

    @property
    def packed_sequence_multiple(self) -> int:
        """What every packed (THD) sequence is padded to a multiple of: ``2 * cp`` for the zigzag CP
        split (if ``cp > 1``) times ``tp`` under sequence parallelism (the packed row is split
        over the TP ranks)."""
        return (self.tp if self.sp else 1) * (2 * self.cp if self.cp > 1 else 1)

    def validate(self, arch: ModelArch) -> None:
        """Raise ``ValueError`` naming the field when ``arch`` cannot be split this way."""
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got tp={self.tp} pp={self.pp}")
        if arch.num_attention_heads % self.tp:
            raise ValueError(
                f"tensor_model_parallel_size={self.tp} must divide num_attention_heads="
                f"{arch.num_attention_heads}"
            )
        if arch.num_query_groups % self.tp:
            raise ValueError(
                f"tensor_model_parallel_size={self.tp} must divide num_key_value_heads={arch.num_query_groups}"
            )
        if arch.ffn_hidden_size % self.tp:
            raise ValueError(
                f"tensor_model_parallel_size={self.tp} must divide intermediate_size={arch.ffn_hidden_size}"
            )
        if self.pp > arch.num_layers:
            raise ValueError(
                f"pipeline_model_parallel_size={self.pp} is larger than num_hidden_layers={arch.num_layers}"
            )
        if self.sp and self.tp == 1:
            raise ValueError("sequence_parallel=True needs tensor_model_parallel_size > 1")
        if self.cp < 1:
            raise ValueError(f"context_parallel_size must be >= 1, got {self.cp}")
        if self.ep < 1:
            raise ValueError(f"expert_model_parallel_size must be >= 1, got {self.ep}")
        if self.ep > 1 and not arch.is_moe:
            raise ValueError(
                f"expert_model_parallel_size={self.ep} needs a mixture-of-experts model; "
                f"{arch.model_type} has no experts"
            )
        if arch.is_moe:
            if arch.num_experts % self.ep:
                raise ValueError(
                    f"expert_model_parallel_size={self.ep} must divide num_experts={arch.num_experts}"
                )
            if arch.moe_ffn_hidden_size % self.tp:
                raise ValueError(
                    f"tensor_model_parallel_size={self.tp} must divide moe_intermediate_size="
                    f"{arch.moe_ffn_hidden_size}"
                )

    def check_world(self, world_size: int) -> None:
        """Raise ``ValueError`` when ``world_size`` ranks cannot hold this layout."""
        if world_size % (self.tp * self.pp * self.cp):
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size * pipeline_model_parallel_size "
                f"* context_parallel_size = {self.tp} * {self.pp} * {self.cp}"
            )
        if world_size % (self.tp * self.ep * self.pp):
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size * "
                f"expert_model_parallel_size * pipeline_model_parallel_size = {self.tp} * {self.ep} * {self.pp}"
            )


@dataclass(frozen=True)
class EnginePlacement:
    """Rollout engines colocated with training: one per block of ``ranks_per_engine`` consecutive
    global ranks, living on the block's first rank (its *leader*) and using that block's devices.

    ``ranks_per_engine`` is the engine's own tensor-parallel size (``rollout.tensor_parallel_size``;
    default the training TP x PP, i.e. the devices of one data-parallel replica).
    """

    world_size: int
    ranks_per_engine: int

    def __post_init__(self) -> None:
        if self.ranks_per_engine < 1 or self.world_size % self.ranks_per_engine:
            raise ValueError(
                f"rollout.tensor_parallel_size={self.ranks_per_engine} must be >= 1 and divide the "
                f"world size {self.world_size}"
            )

    @property
    def num_engines(self) -> int:
        return self.world_size // self.ranks_per_engine

    @property
    def leaders(self) -> list[int]:
        """Global rank of each engine's leader, by engine index."""
        return [e * self.ranks_per_engine for e in range(self.num_engines)]

    def engine_of(self, rank: int) -> int:
        """Index of the engine whose block holds global ``rank``."""
        return rank // self.ranks_per_engine

    def is_leader(self, rank: int) -> bool:
        return rank % self.ranks_per_engine == 0


def shard_bounds(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` shards of ``num_items``, sizes differing by at most one (the
    first ``num_items % num_shards`` shards take one more)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(num_items, num_shards)
    bounds, start = [], 0
    for s in range(num_shards):
        stop = start + base + (s < extra)
        bounds.append((start, stop))
        start = stop
    return bounds
