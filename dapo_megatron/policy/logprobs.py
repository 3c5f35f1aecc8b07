"""Vocab-parallel token log-probabilities and entropy, never materialising the full vocabulary.

Under tensor parallelism (TP) Megatron's output layer leaves each rank of the TP group with a
contiguous slice of the (padded) vocabulary: rank ``r`` of a group of size ``tp`` holds the logits
of token ids ``[r * V_shard, (r + 1) * V_shard)``, ``V_shard = V_padded / tp``. For every position
``n`` with target id ``t_n`` this module computes, over the *true* vocabulary ``V`` (ids ``>= V``
are padding and are excluded)::

    m_n      = max_j z_nj                                (all-reduce MAX)
    S_n      = sum_j exp(z_nj - m_n)                     (all-reduce SUM)
    lse_n    = m_n + log S_n
    logp_n   = z_{n, t_n} - lse_n                        (z_{n,t_n}: all-reduce SUM of the masked gather)
    p_nj     = exp(z_nj - lse_n)
    H_n      = -sum_j p_nj log p_nj = lse_n - sum_j p_nj z_nj

with three small all-reduces per call (one MAX of ``[N]``, one SUM of ``[3, N]``), whatever the
chunking. Gradients (custom autograd function, exact)::

    d logp_n / d z_nj = 1[j == t_n] - p_nj
    d H_n    / d z_nj = -p_nj (z_nj - mu_n),             mu_n = sum_k p_nk z_nk

so for upstream gradients ``g_n`` (log-probs) and ``h_n`` (entropy)::

    dL/dz_nj = g_n 1[j == t_n] - p_nj (g_n + h_n (z_nj - mu_n))

Each rank returns the gradient of its own shard only, equal to the full-vocabulary gradient
restricted to that shard, with no scaling by the TP size (the convention of Megatron's
vocab-parallel cross-entropy). Padded entries get a zero gradient.

Memory. Nothing shard-sized is saved for the backward pass: only per-position scalars (``m``,
``log S``, ``mu - m``) plus a reference to the input logits, and ``p`` is recomputed chunk by
chunk. The extra memory of forward + backward is the gradient itself (one shard, input dtype)
plus fp32 work buffers of one chunk: one for the log-probs, two with the entropy, and the
bf16 -> fp32 staging of the gradient for bf16 input. ``chunk_size`` bounds them;
``chunk_size=None`` processes all positions at once on GPU (fastest; up to ~2x the shard with
entropy) and cache-sized blocks of positions on CPU.
Measured with ``benchmarks/logprob_memory.py`` (vocab 151,936, TP 8, chunk = tokens / 8): 1.04x
the fp32 shard with entropy, 1.0x without (CPU), against 24x-40x for gather + log_softmax.

Layout. Logits are read through their strides, never copied: a ``[T, B, V]`` view of ``[B, T, V]``
memory is fine. The gradient is allocated contiguous in the shape *given*, so a caller can choose
the memory order its upstream wants (see :func:`dapo_megatron.policy.loss.dapo_loss`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_log_probs"]


def _group_rank_and_size(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


# On CPU each pass over the shard runs block by block, a block being small enough to stay in
# the cache (2**19 fp32 = 2 MiB): the sub / exp / sum (and entropy product) of a block then cost about
# one pass over memory instead of four, and the block buffers are recycled by the allocator instead
# of page-faulting a fresh shard-sized buffer per call (tens of ms for a 512 x 32k shard). Fused
# GPU kernels gain nothing from it, so GPUs keep one block unless ``chunk_size`` asks for less.
_CPU_BLOCK_ELEMENTS = 1 << 19


def _blocks(logits: torch.Tensor, num_valid: int, chunk_size: int | None):
    """``(begin, end)`` ranges of the first dim of ``logits [L, ..., V_shard]`` covering it: at
    most ``chunk_size`` positions each, and on CPU at most ``_CPU_BLOCK_ELEMENTS`` logits."""
    num_rows = logits.shape[0]
    positions_per_row = logits[0, ..., 0].numel() if num_rows else 1
    step = num_rows if chunk_size is None else max(1, chunk_size // positions_per_row)
    if logits.device.type == "cpu":
        step = min(step, _CPU_BLOCK_ELEMENTS // max(positions_per_row * num_valid, 1))
    step = max(step, 1)
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


class _VocabParallelLogProbs(torch.autograd.Function):
    """Autograd function on ``logits [L, ..., V_shard]`` (any strides), ``targets [L, ...]``.

    Returns ``(log_probs [L, ...] fp32, entropy [L, ...] fp32)``; the entropy is a zero-size tensor
    when not requested (autograd functions must return tensors). Work runs in blocks along the
    first dim; the gradient is allocated contiguous in the given shape.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        tp_group: dist.ProcessGroup | None,
        shard_start: int,
        num_valid: int,
        with_entropy: bool,
        chunk_size: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lead = logits.shape[:-1]
        distributed = tp_group is not None and dist.get_world_size(group=tp_group) > 1
        valid_logits = logits[..., :num_valid]  # a view: padding columns are simply never read

        # Target logit: positions whose target lives on another shard contribute 0 to the SUM.
        local_target = targets - shard_start
        on_shard = (local_target >= 0) & (local_target < num_valid)
        if num_valid > 0:
            index = local_target.clamp(0, num_valid - 1).unsqueeze(-1)
            target_logit = valid_logits.gather(-1, index).squeeze(-1).float()
            target_logit = torch.where(on_shard, target_logit, torch.zeros_like(target_logit))
            # A reduction: no shard-sized temporary. Exact in bf16, cast afterwards.
            row_max = valid_logits.amax(dim=-1).float()
        else:  # this rank holds only padding
            target_logit = torch.zeros(lead, dtype=torch.float32, device=logits.device)
            row_max = torch.full(lead, -torch.inf, dtype=torch.float32, device=logits.device)
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)

        # sums[0] = S_n = sum_j exp(z - m); sums[1] = sum_j e (z - m); sums[2] = z_t
        sums = torch.zeros(3, *lead, dtype=torch.float32, device=logits.device)
        sums[2] = target_logit
        if num_valid > 0:
            for begin, end in _blocks(logits, num_valid, chunk_size):
                # fp32 result for fp32 and bf16 inputs alike (type promotion with the fp32 max)
                shifted = torch.sub(valid_logits[begin:end], row_max[begin:end, ..., None])  # z - m
                if with_entropy:
                    exp_shifted = torch.exp(shifted)
                    torch.sum(exp_shifted, dim=-1, out=sums[0, begin:end])
                    # sum_j e (z - m): no cancellation (unlike sum(e z) - m S), no log (unlike
                    # sum e log e; logits are finite). A row-wise sum: independent of the blocks.
                    torch.sum(shifted.mul_(exp_shifted), dim=-1, out=sums[1, begin:end])
                    del exp_shifted
                else:
                    torch.sum(shifted.exp_(), dim=-1, out=sums[0, begin:end])
                del shifted
        if distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)

        # Keep m and log S apart (rather than lse = m + log S): z - m is nearly exact for the large
        # logits, so log p and p of the likely tokens keep their full fp32 precision.
        log_sum = sums[0].log()
        log_probs = (sums[2] - row_max) - log_sum
        if with_entropy:
            mean_shift = sums[1] / sums[0]  # mu - m = sum_j p_j (z_j - m)
            entropy = log_sum - mean_shift
        else:
            mean_shift = torch.empty(0, dtype=torch.float32, device=logits.device)
            entropy = torch.empty(0, dtype=torch.float32, device=logits.device)

        ctx.save_for_backward(logits, targets, row_max, log_sum, mean_shift)
        ctx.shard_start = shard_start
        ctx.num_valid = num_valid
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(() if with_entropy else (entropy,)))
        return log_probs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        nones = (None,) * 6
        if grad_entropy is not None and grad_entropy.numel() == 0:
            grad_entropy = None
        if (grad_log_probs is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
            return (None, *nones)
        logits, targets, row_max, log_sum, mean_shift = ctx.saved_tensors
        num_valid = ctx.num_valid

        # Contiguous in the shape of ``logits`` as given (not in the memory order of its strides).
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_logits[..., num_valid:].zero_()
        write_in_place = logits.dtype == torch.float32

        local_target = targets - ctx.shard_start
        on_shard = (local_target >= 0) & (local_target < num_valid)
        target_index = local_target.clamp(0, max(num_valid - 1, 0)).unsqueeze(-1)
        if grad_log_probs is not None:  # the one-hot term, zero where the target is on another shard
            one_hot_grad = torch.where(on_shard, grad_log_probs, torch.zeros_like(grad_log_probs))
        if grad_entropy is None:  # dL/dz = -g p = -(g / S) exp(z - m)
            scale = -grad_log_probs * torch.exp(-log_sum)

        for begin, end in _blocks(logits, num_valid, ctx.chunk_size):
            if num_valid == 0:
                break
            z = logits[begin:end, ..., :num_valid]
            if write_in_place:
                work = grad_logits[begin:end, ..., :num_valid]
            else:
                work = torch.empty(z.shape, dtype=torch.float32, device=z.device)
            torch.sub(z, row_max[begin:end, ..., None], out=work)  # z - m
            if grad_entropy is not None:
                probs = (work - log_sum[begin:end, ..., None]).exp_()
                # dL/dz = -p (g + h (z - mu)),  z - mu = (z - m) - (mu - m)
                work.sub_(mean_shift[begin:end, ..., None]).mul_(grad_entropy[begin:end, ..., None])
                if grad_log_probs is not None:
                    work.add_(grad_log_probs[begin:end, ..., None])
                work.mul_(probs).neg_()
                del probs
            else:
                work.exp_().mul_(scale[begin:end, ..., None])
            if grad_log_probs is not None:
                # scatter_add rather than boolean indexing: no host sync on GPU
                work.scatter_add_(-1, target_index[begin:end], one_hot_grad[begin:end, ..., None])
            if not write_in_place:
                grad_logits[begin:end, ..., :num_valid].copy_(work)
            del work
        return (grad_logits, *nones)


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of the target token (and optionally the entropy) from vocab-sharded logits.

    Args:
        logits: ``[..., V_shard]``, fp32 or bf16: this rank's contiguous slice of the (padded)
            vocabulary, covering ids ``[rank * V_shard, (rank + 1) * V_shard)`` with ``rank`` the
            rank in ``tp_group``. Any leading dims (``[B, T]``, ``[T, B]``, ``[N]``).
        target_ids: ``[...]`` integer, same leading dims as ``logits``: *global* token ids in
            ``[0, vocab_size)``. Out-of-range ids (including ignore markers such as ``-100``) raise
            ``ValueError``; replace them by any valid id and mask the result instead.
        tp_group: the tensor-parallel group over which the vocabulary is split. ``None`` means no
            tensor parallelism: ``logits`` hold the whole vocabulary and ``torch.distributed`` is
            not touched at all.
        with_entropy: also return the entropy ``H = -sum_j p_j log p_j`` of each position.
        chunk_size: process the positions in chunks of this many, in forward and backward,
            bounding the fp32 work buffers to ``chunk_size * V_shard`` elements. ``None``: all
            positions at once (on CPU: cache-sized blocks). Results do not depend on it. For
            non-contiguous ``logits`` a chunk is whole slices of the first dim (at least one).
        vocab_size: the true vocabulary size before padding to a multiple of the TP size. Ids
            ``>= vocab_size`` are padding: excluded from the softmax (as if their logit were
            ``-inf``) and from the entropy, and given a zero gradient. ``None``: no padding, the
            vocabulary is ``V_shard * tp``.

    Returns:
        ``(log_probs, entropy)``, both ``[...]`` (the leading dims) in fp32; ``entropy`` is
        ``None`` unless ``with_entropy``. Both are differentiable with respect to ``logits``; the
        gradient of each rank's shard is the full-vocabulary gradient restricted to the shard
        (no scaling by the TP size), contiguous in the shape of ``logits``. The computation is
        in fp32 whatever the input dtype.

    The equations and the memory layout are in the module docstring. Three all-reduces of
    ``O(N)`` floats per call, none in the backward pass.
    """
    if logits.dim() < 1:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be fp32, bf16 or fp16, got {logits.dtype}")
    if target_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"target_ids shape {tuple(target_ids.shape)} must equal the leading dims of logits "
            f"{tuple(logits.shape[:-1])} (logits shape {tuple(logits.shape)})"
        )
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")

    rank, tp_size = _group_rank_and_size(tp_group)
    shard_size = logits.shape[-1]
    padded_vocab = shard_size * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, V_shard * tp] = (0, {padded_vocab}] "
            f"(V_shard={shard_size}, tp={tp_size})"
        )
    if target_ids.numel() > 0:
        # One host sync; catches silent garbage (an off-shard id on every rank gives z_t = 0).
        low, high = torch.stack([target_ids.min(), target_ids.max()]).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"target_ids must lie in [0, vocab_size={vocab_size}), got values in [{low}, {high}]"
            )

    shard_start = rank * shard_size
    num_valid = max(0, min(shard_size, vocab_size - shard_start))
    leading_shape = target_ids.shape
    if logits.dim() == 1 or logits.is_contiguous():  # flat [N, V_shard]: chunks of chunk_size rows
        logits, target_ids = logits.reshape(-1, shard_size), target_ids.reshape(-1)
    # Otherwise no copy: a strided view (e.g. [T, B, V] of [B, T, V] memory) is read in place.
    log_probs, entropy = _VocabParallelLogProbs.apply(
        logits, target_ids.long(), tp_group, shard_start, num_valid, with_entropy, chunk_size
    )
    return log_probs.view(leading_shape), (entropy.view(leading_shape) if with_entropy else None)
