"""Context parallelism (CP): the zigzag split of packed sequences and the CP all-gather.

Zigzag layout (the one TransformerEngine, Megatron's THD RoPE, slime, NeMo-RL and verl use): each
sequence of a packed micro-batch, padded to a multiple of ``2 * cp``, is cut into ``2 * cp`` equal
chunks; CP rank ``r`` keeps chunks ``r`` and ``2 * cp - 1 - r``, in that order, for every sequence
in turn. Causal attention then costs every rank about the same (an early chunk and a late one).

:func:`zigzag_positions` gives the packed positions a rank keeps; Megatron's
``_apply_rotary_pos_emb_thd`` derives the same positions from ``cu_seqlens_padded``, so the RoPE
angles follow without position ids. :func:`all_gather_cp` is the autograd-aware all-gather the
CPU attention uses (``dapo_megatron.models.attention``); process groups are always explicit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["zigzag_positions", "all_gather_cp"]


def zigzag_positions(cu_seqlens_padded: torch.Tensor | list[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Packed positions kept by CP rank ``cp_rank``: ``[T / cp]`` int64, in local order.

    ``cu_seqlens_padded``: ``[n + 1]`` cumulative padded lengths, each a multiple of ``2 * cp_size``
    (``cp_size == 1``: any lengths, and all positions are kept).
    """
    bounds = [int(b) for b in (cu_seqlens_padded.tolist() if torch.is_tensor(cu_seqlens_padded) else cu_seqlens_padded)]
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, cp_size={cp_size}), got {cp_rank}")
    if cp_size == 1:
        return torch.arange(bounds[-1], dtype=torch.long)
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(
                f"a packed sequence of padded length {length} is not a multiple of 2 * "
                f"context_parallel_size = {2 * cp_size}"
            )
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk, dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class _AllGatherCP(torch.autograd.Function):
    """``[n, ...]`` on each rank -> ``[cp, n, ...]``; backward: sum of the gradients over the group,
    restricted to this rank's slice (every rank's output depends on every rank's input)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group=group)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def all_gather_cp(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather ``tensor [n, ...]`` over the CP ``group`` into ``[cp, n, ...]`` (differentiable)."""
    return _AllGatherCP.apply(tensor, group)
