"""Top-k / top-p truncation of (vocab-parallel) logits: the distribution the engines sample from.

The rollout engines sample each token from ``softmax(z / T)`` restricted to the top-k set, then
to the top-p (nucleus) set of what remains, renormalised, and they report the log-prob of the
sampled token under *that* distribution: vLLM with ``logprobs_mode="processed_logprobs"``
(``vllm/v1/sample/ops/topk_topp_sampler.py``: temperature, then ``apply_top_k_top_p``, then
``log_softmax`` of the masked logits), :class:`~dapo_megatron.rollout.hf_engine.HFEngine` through
:func:`truncate_logits` below. The trainer computes old, new (and reference) log-probs and the
entropy of the same distribution (:func:`dapo_megatron.policy.loss.token_log_probs` with
``top_k`` / ``top_p``). Why the trainer truncates rather than the engines reporting log-probs of
the untruncated distribution: the tokens *were* drawn from the truncated one, so the importance
ratio ``pi / pi_old``, its clipping and TIS are only right against it; and vLLM's processed
log-probs cost nothing extra, while full-distribution log-probs of a truncated sampler would need
a second log-softmax per step in every engine. ``rollout/logprob_diff_*`` then compare the same
quantity on both sides.

The kept set of a row (an upper set ``{j : z_j >= tau}``) and how it relates to vLLM's is defined
in :mod:`dapo_megatron.algo.truncation`; this module finds ``tau`` on vocabulary shards.

Vocab-parallel, the full vocabulary is never gathered (``tp`` ranks, ``N`` rows):

* top-k: every rank takes its local top-k values (``[N, k]``), they are all-gathered
  (``[tp, N, k]``) and the k-th largest of those ``tp * k`` candidates is ``tau_k``: exact.
* top-p (exact, on candidates): the normaliser ``S = sum_{j kept by top-k} exp(z_j - max)`` is
  all-reduced; every rank contributes its ``m`` largest values per row, all-gathered and sorted.
  Every logit larger than ``b`` = the largest of the ranks' m-th values is a candidate, so ``A(c)``
  is exact for candidates ``c >= b``; a row is decided once such a candidate is dropped, and then
  ``tau_p`` is the smallest candidate above it. Rows not decided (their nucleus reaches below
  ``b``) are redone with ``4 m`` candidates, up to the whole shard (exact by construction). With
  top-k on, ``m = k`` decides every row in one round (``A`` of the top-k candidates only involves
  values above ``tau_k``). Without top-k, ``m`` starts at :data:`TOP_P_CANDIDATES`.

Tokens outside the kept set have probability 0. A *target* outside it (the engine and the trainer
disagree at the boundary by rounding, or an update moved the token out of the new policy's set)
gets :data:`~dapo_megatron.algo.truncation.OUTSIDE_SET_LOG_PROB` with zero gradient (in
:func:`dapo_megatron.policy.loss.token_log_probs`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dapo_megatron.algo.truncation import check_truncation, mask_outside, top_p_threshold

__all__ = ["TOP_P_CANDIDATES", "keep_threshold", "vocab_parallel_truncate"]

TOP_P_CANDIDATES = 64
"""Candidates per rank and row in the first top-p round without top-k (4x per further round)."""


def _world(tp_group) -> int:
    return 1 if tp_group is None else dist.get_world_size(group=tp_group)


def _gather_last(x: torch.Tensor, tp_group) -> torch.Tensor:
    """``[..., c]`` on every rank -> ``[..., tp * c]`` (rank-major), the same on every rank."""
    if _world(tp_group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world(tp_group))]
    dist.all_gather(parts, x.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def _local_top(z: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` largest values of each row of ``z [R, V]`` (fp32, descending), ``-inf``-padded."""
    out = torch.full((z.shape[0], m), float("-inf"), dtype=torch.float32, device=z.device)
    take = min(m, z.shape[-1])
    if take > 0:
        out[:, :take] = torch.topk(z, take, dim=-1).values.float()
    return out


def _masked_exp_sum(z: torch.Tensor, row_max: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``sum_j exp(z_j - max) [z_j >= tau]`` per row of ``z [R, V]``, in row blocks (fp32)."""
    out = torch.zeros(z.shape[0], dtype=torch.float32, device=z.device)
    step = max(1, (1 << 20) // max(z.shape[-1], 1))
    for begin in range(0, z.shape[0], step):
        end = min(begin + step, z.shape[0])
        block = z[begin:end].float()
        e = torch.exp(block - row_max[begin:end, None])
        out[begin:end] = torch.where(block >= tau[begin:end, None], e, 0.0).sum(-1)
    return out


def keep_threshold(
    logits: torch.Tensor,
    *,
    top_k: int = -1,
    top_p: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    num_valid: int | None = None,
) -> torch.Tensor | None:
    """Per-row threshold ``tau [...]`` (fp32) of the top-k / top-p kept set ``{j : z_j >= tau}``.

    Args:
        logits: ``[..., V_shard]`` this rank's (tempered) logits, any leading dims (a contiguous
            layout avoids one copy of the shard).
        top_k: -1 (off) or >= 1.
        top_p: in (0, 1]; 1 = off.
        tp_group: the group the vocabulary is split over (``None``: ``logits`` hold all of it).
        num_valid: columns of this shard that are real tokens (the rest is vocabulary padding,
            never kept); ``None`` = all.

    Returns:
        ``tau`` with the leading shape of ``logits``, identical on every rank of ``tp_group``, or
        ``None`` when neither truncation is on. Collective over ``tp_group``: every rank must call
        it with the same ``top_k`` / ``top_p``. The method (exact) is in the module docstring.
    """
    out = _threshold_and_max(logits, top_k, top_p, tp_group, num_valid)
    return None if out is None else out[0]


@torch.no_grad()
def _threshold_and_max(logits, top_k, top_p, tp_group, num_valid):
    """``(tau, row_max)`` with the leading shape of ``logits``, or ``None`` if nothing is truncated."""
    check_truncation(top_k, top_p)
    if top_k == -1 and top_p == 1.0:
        return None
    lead = logits.shape[:-1]
    valid = logits.shape[-1] if num_valid is None else num_valid
    z = logits[..., :valid].reshape(-1, valid)
    rows = z.shape[0]
    tau = torch.full((rows,), float("-inf"), dtype=torch.float32, device=z.device)
    cand = None
    if top_k > 0:
        cand = torch.sort(_gather_last(_local_top(z, top_k), tp_group), dim=-1, descending=True).values
        tau = cand[:, top_k - 1]  # -inf when the vocabulary has fewer than k tokens
        cand = cand[:, :top_k]
        row_max = cand[:, 0]
    else:
        row_max = z.amax(dim=-1).float() if valid else torch.full_like(tau, float("-inf"))
        if _world(tp_group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    if top_p < 1.0 and rows > 0:
        total = _masked_exp_sum(z, row_max, tau)
        if _world(tp_group) > 1:
            dist.all_reduce(total, group=tp_group)
        if cand is not None:  # every value above tau_k is a candidate: one round decides all rows
            tau_p, _ = top_p_threshold(cand, tau, row_max, total, top_p)
            tau = torch.maximum(tau, tau_p)
        else:
            tau = _top_p_rounds(z, row_max, total, top_p, tp_group)
    return tau.reshape(lead), row_max.reshape(lead)


def _top_p_rounds(z, row_max, total, top_p, tp_group) -> torch.Tensor:
    """top-p alone: candidate rounds of growing size until every row is decided."""
    tau = torch.full_like(row_max, float("-inf"))
    todo = torch.arange(z.shape[0], device=z.device)
    m = TOP_P_CANDIDATES
    while todo.numel():
        sub = z if todo.numel() == z.shape[0] else z[todo]
        local = _local_top(sub, m)
        # A rank that listed its whole shard bounds nothing (-inf); otherwise its m-th value does.
        bound = local[:, -1:] if m < z.shape[-1] else torch.full_like(local[:, -1:], float("-inf"))
        parts = _gather_last(torch.cat([local, bound], dim=-1), tp_group).view(todo.numel(), -1, m + 1)
        cand = torch.sort(parts[..., :m].reshape(todo.numel(), -1), dim=-1, descending=True).values
        tau_p, decided = top_p_threshold(cand, parts[..., m].amax(dim=-1), row_max[todo], total[todo], top_p)
        tau[todo[decided]] = tau_p[decided]
        todo = todo[~decided]
        m *= 4
    return tau


def vocab_parallel_truncate(
    logits: torch.Tensor,
    *,
    top_k: int = -1,
    top_p: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    num_valid: int | None = None,
) -> torch.Tensor:
    """``logits`` with every entry outside the kept set at ``row max - FILL_BELOW_MAX`` (``exp``
    of it minus the max is exactly 0 in fp32; see :func:`dapo_megatron.algo.truncation.mask_outside`),
    or ``logits`` itself when nothing is truncated. Same strides (an elementwise ``where``);
    differentiable (kept entries pass their gradient, masked ones get 0). Padding columns
    (``>= num_valid``) may be masked or not: the vocab-parallel log-softmax excludes them anyway.
    Collective over ``tp_group`` (see :func:`keep_threshold`).
    """
    out = _threshold_and_max(logits, top_k, top_p, tp_group, num_valid)
    if out is None:
        return logits
    return mask_outside(logits, *out)
