"""Sequence packing (THD): token-budget micro-batches and the packed micro-batch format.

Without packing every micro-batch is right-padded to its longest sequence; with DAPO's lengths
(tens to 20k tokens in one batch) most of its FLOPs would go to padding. Packing instead:

1. :func:`plan_micro_batches` bins each data-parallel rank's sequences into micro-batches whose
   *padded* token count per rank stays under ``max_tokens_per_micro_batch`` (greedy longest-first
   onto the least-loaded bin, i.e. balanced bins), with the **same number of micro-batches on every
   DP rank** (Megatron's pipeline schedule runs a fixed count everywhere). Every rank holds the
   whole global batch, so each rank computes every rank's plan locally: no collective.
2. :func:`pack_micro_batch` lays the sequences of one bin end to end in a ``[1, T]`` token row,
   each padded to ``pad_multiple`` (``ParallelLayout.packed_sequence_multiple``: sequence parallelism needs ``T`` divisible by TP, the zigzag CP
   split each sequence divisible by ``2 * cp``), and keeps this CP rank's zigzag share of it
   (:mod:`dapo_megatron.models.context_parallel`). ``cu_seqlens`` / ``cu_seqlens_padded`` describe the
   boundaries for Megatron's ``PackedSeqParams(qkv_format="thd")``: RoPE restarts at every
   sequence and attention stays within it (TransformerEngine on GPU; the local SDPA attention's
   block-diagonal mask otherwise).

Targets are shifted per sequence (the token after position ``j`` of sequence ``i``), so no
sequence predicts the first token of the next one. Per-token training tensors (advantages,
old log-probs, masks) stay in the padded ``[n, width]`` layout of the sequences of the bin; the
loss scatters the packed log-probs into it (``logprob_index``), so the loss math is shared with
the padded path and only the logits (the large tensor) are packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dapo_megatron.models.context_parallel import zigzag_positions

__all__ = ["PackedSpec", "balanced_bins", "plan_micro_batches", "pack_micro_batch", "unpack_token_values"]


def _padded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _fill(order: list[int], sizes: list[int], num_bins: int, capacity: int) -> list[list[int]] | None:
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for i in order:
        # least-loaded bin (ties: lowest index); deterministic on every rank
        b = min(range(num_bins), key=lambda k: (loads[k], k))
        if loads[b] + sizes[i] > capacity:
            return None
        bins[b].append(i)
        loads[b] += sizes[i]
    return bins


def balanced_bins(sizes: list[int], capacity: int, *, min_bins: int = 1) -> list[list[int]]:
    """Indices of ``sizes`` in the fewest bins (at least ``min_bins``) of total size ``<= capacity``
    found by longest-first onto the least-loaded bin. Every bin is non-empty when
    ``min_bins <= len(sizes)``. Raises ``ValueError`` if an item is larger than ``capacity``."""
    if not sizes:
        return []
    if max(sizes) > capacity:
        raise ValueError(f"an item of size {max(sizes)} does not fit a bin of capacity {capacity}")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    num_bins = max(min_bins, -(-sum(sizes) // capacity))
    while True:
        bins = _fill(order, sizes, num_bins, capacity)
        if bins is not None:
            return [sorted(b) for b in bins]
        num_bins += 1


def plan_micro_batches(
    seq_lengths: list[int] | torch.Tensor,
    rank_indices: list[list[int]],
    *,
    max_tokens: int | None,
    micro_batch_size: int,
    pad_multiple: int = 1,
    cp: int = 1,
) -> list[list[list[int]]]:
    """Micro-batches (lists of sequence indices) for every data-parallel rank, same count on all.

    ``max_tokens``: the token budget per rank and micro-batch, counted after padding each sequence
    to ``pad_multiple`` and splitting over the ``cp`` CP ranks (a bin holds up to
    ``max_tokens * cp`` packed tokens). ``None``: packing without a budget, ``micro_batch_size``
    sequences per micro-batch in order (the grouping of padded micro-batches).
    """
    lengths = [int(x) for x in (seq_lengths.tolist() if torch.is_tensor(seq_lengths) else seq_lengths)]
    if max_tokens is None:
        plans = [
            [idx[s : s + micro_batch_size] for s in range(0, len(idx), micro_batch_size)] for idx in rank_indices
        ]
        # Equal counts across ranks: ranks hold equally many sequences, but keep it explicit.
        if len({len(p) for p in plans}) > 1:
            raise ValueError(f"data-parallel ranks got different micro-batch counts {[len(p) for p in plans]}")
        return plans
    capacity = max_tokens * cp
    sizes = [[_padded(lengths[i], pad_multiple) for i in idx] for idx in rank_indices]
    longest = max((max(s) for s in sizes if s), default=0)
    if longest > capacity:
        raise ValueError(
            f"parallel.max_tokens_per_micro_batch={max_tokens} is too small: a sequence of "
            f"{longest} tokens (padded to a multiple of {pad_multiple}) needs at least "
            f"{-(-longest // cp)} tokens per rank (context_parallel_size={cp})"
        )
    num_bins = max((len(balanced_bins(s, capacity)) for s in sizes if s), default=0)
    while True:
        plans = []
        for idx, s in zip(rank_indices, sizes):
            bins = balanced_bins(s, capacity, min_bins=num_bins)
            if len(bins) != num_bins:
                break
            plans.append([[idx[k] for k in b] for b in bins])
        else:
            return plans
        num_bins += 1


@dataclass(frozen=True)
class PackedSpec:
    """Boundaries of one packed micro-batch (global, before the CP split), for ``PackedSeqParams``."""

    cu_seqlens: tuple[int, ...]  # real lengths
    cu_seqlens_padded: tuple[int, ...]  # padded lengths (the layout of the packed row)
    max_seqlen: int  # longest padded sequence
    cp_size: int = 1
    cp_rank: int = 0

    def packed_seq_params(self, device, cp_group=None):
        """Megatron's ``PackedSeqParams(qkv_format="thd")`` for this micro-batch."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = torch.tensor(self.cu_seqlens, dtype=torch.int32, device=device)
        cu_pad = torch.tensor(self.cu_seqlens_padded, dtype=torch.int32, device=device)
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu_pad,
            cu_seqlens_kv_padded=cu_pad,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
            cp_group=cp_group,
        )


def _cumsum(xs: list[int]) -> tuple[int, ...]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return tuple(out)


def pack_micro_batch(
    batch: dict[str, torch.Tensor],
    indices: list[int],
    *,
    pad_multiple: int = 1,
    cp_size: int = 1,
    cp_rank: int = 0,
) -> dict:
    """One packed micro-batch of the sequences ``indices`` of ``batch`` (see the module docstring).

    ``batch``: ``input_ids [N, S]``, ``seq_lengths [N]`` and any per-token ``[N, S]`` tensors.
    Returns a dict with

    * ``input_ids [1, T_local]``, ``position_ids [1, T_local]``: this CP rank's share of the packed
      row (``T_local = T / cp_size``);
    * ``targets [1, T_local]``: the next token of the same sequence (0 where none);
    * ``logprob_index [T_local]``: flat index into ``[n, width]`` of the log-prob predicted at each
      local position (``row * width + col``; ``-1`` where the position predicts nothing);
    * every per-token tensor of ``batch`` as ``[n, width]`` (``width`` = longest sequence), as
      :func:`~dapo_megatron.policy.train_step.make_microbatches` gives;
    * ``index [n]``, ``seq_lengths [n]``, ``packed`` (:class:`PackedSpec`) and
      ``sequence_stats_weight``: 1 on CP rank 0, else 0 (sequence-level metrics count once).
    """
    if not indices:
        raise ValueError("pack_micro_batch: indices is empty")
    idx = torch.tensor(indices, dtype=torch.long)
    lengths = [int(x) for x in batch["seq_lengths"][idx].tolist()]
    width = max(lengths)
    padded = [_padded(n, pad_multiple) for n in lengths]
    cu_pad = _cumsum(padded)
    total = cu_pad[-1]
    ids = batch["input_ids"]
    tokens = ids.new_zeros(total)
    targets = ids.new_zeros(total)
    positions = torch.zeros(total, dtype=torch.long)
    logprob_index = torch.full((total,), -1, dtype=torch.long)
    for row, (i, n, start) in enumerate(zip(indices, lengths, cu_pad[:-1])):
        tokens[start : start + n] = ids[i, :n]
        targets[start : start + n - 1] = ids[i, 1:n]
        positions[start : start + padded[row]] = torch.arange(padded[row])
        # position j predicts token j + 1, whose log-prob sits at column j + 1 of the row
        logprob_index[start : start + n - 1] = row * width + torch.arange(1, n)
    keep = zigzag_positions(cu_pad, cp_size, cp_rank)
    mb = {
        "index": idx,
        "seq_lengths": batch["seq_lengths"][idx],
        "input_ids": tokens[keep][None],
        "position_ids": positions[keep][None],
        "targets": targets[keep][None],
        "logprob_index": logprob_index[keep],
        "packed": PackedSpec(
            cu_seqlens=_cumsum(lengths),
            cu_seqlens_padded=cu_pad,
            max_seqlen=max(padded),
            cp_size=cp_size,
            cp_rank=cp_rank,
        ),
        "sequence_stats_weight": torch.tensor(1.0 if cp_rank == 0 else 0.0, dtype=torch.float64),
    }
    for key, t in batch.items():
        if key not in ("input_ids", "seq_lengths") and torch.is_tensor(t) and t.dim() >= 2:
            mb[key] = t[idx, :width]
    return mb


def unpack_token_values(values: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter per-position values ``[T_local]`` of a packed micro-batch (the log-prob predicted
    at each position) into the padded ``[n, width]`` layout of its sequences, aligned with the
    tokens (``out[i, t] = log p(token t of sequence i)``). Differentiable in ``values``.

    Returns ``(out [n, width], computed [n, width] bool)``: ``computed`` marks the entries this
    rank filled (all predicted tokens without CP; this rank's zigzag share with CP)."""
    n, width = len(mb["index"]), int(mb["seq_lengths"].max())
    index = mb["logprob_index"].to(values.device)
    valid = index >= 0
    flat = values.new_zeros(n * width).index_put((index[valid],), values[valid])
    computed = torch.zeros(n * width, dtype=torch.bool, device=values.device)
    computed[index[valid]] = True
    return flat.view(n, width), computed.view(n, width)
