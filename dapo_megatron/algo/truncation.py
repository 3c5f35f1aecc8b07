"""The top-k / top-p kept set of a row of logits: the sampling distribution of the rollouts.

The engines sample from ``softmax(z / T)`` restricted to the top-k set, then to the top-p
(nucleus) set of what remains, renormalised, and report log-probs of that distribution. The
kept set of a row is an upper set ``{j : z_j >= tau}``:

* top-k: ``tau_k`` = the k-th largest logit (ties with it are kept, as vLLM's ``logits < kth``);
* top-p: with ``p_j`` the probabilities after top-k and ``A(v) = sum_{l: z_l > v} p_l`` the mass
  strictly above ``v``, token ``j`` is kept iff ``A(z_j) < top_p`` (the most likely token always
  is): ``tau_p = min {z_j : A(z_j) < top_p}``. vLLM drops a token when its ascending inclusive
  cumulative mass is ``<= 1 - top_p``, i.e. when ``A(z_j) >= top_p``: the same set, except that
  tokens with exactly equal logits at the boundary are all kept here (vLLM splits them by sort
  order) and fp32 rounding of the two sums for a token whose ``A`` is within ~1e-7 of ``top_p``.

This module is the rule on whole rows (pure tensor math): :func:`truncate_logits` (used by the
HF engine) and :func:`top_p_threshold`, which :mod:`dapo_megatron.policy.truncation` applies to
candidates gathered from the tensor-parallel vocabulary shards.
"""

from __future__ import annotations

import torch

__all__ = [
    "FILL_BELOW_MAX",
    "OUTSIDE_SET_LOG_PROB",
    "check_truncation",
    "mask_outside",
    "top_p_threshold",
    "truncate_logits",
]

OUTSIDE_SET_LOG_PROB = -1.0e4
"""Log-prob reported for a target token outside the top-k / top-p set (probability 0): ``exp``
of it is exactly 0, and it is finite, so log-ratios stay NaN-free (the loss clamps them)."""

FILL_BELOW_MAX = 1.0e4
"""Logits outside the kept set are set this far below the row maximum: ``exp`` underflows to
exactly 0 in fp32 while products with them stay finite (``-inf`` or an fp32 minimum would give
NaN or overflow in a log-softmax backward pass)."""


def check_truncation(top_k: int, top_p: float) -> None:
    """``ValueError`` unless ``top_k`` is -1 (off) or an int >= 1 and ``top_p`` is in (0, 1]."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or (top_k != -1 and top_k < 1):
        raise ValueError(f"top_k must be -1 (off) or an int >= 1, got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def top_p_threshold(
    cand: torch.Tensor, bound: torch.Tensor, row_max: torch.Tensor, total: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau_p [R], decided [R])`` from candidates ``cand [R, C]`` sorted descending.

    ``cand`` holds every logit of the row above ``bound [R]`` (``-inf``-padded; ``bound = -inf``
    means the whole row); ``row_max [R]`` is the row maximum and ``total [R]`` the normaliser
    ``S = sum_j exp(z_j - max)`` over the (top-k) kept set of the *whole* row. ``A`` of a candidate
    is the exclusive cumulative mass at the first of its ties; it is exact for candidates
    ``>= bound``. A row is decided once such a candidate is dropped (``A >= top_p * S``); then
    ``tau_p`` is the smallest kept candidate (the kept ones are a prefix: ``A`` is non-decreasing).
    """
    e = torch.exp(cand - row_max[:, None])  # 0 for -inf padding
    above = torch.cumsum(e, dim=-1) - e
    first_of_ties = torch.ones_like(cand, dtype=torch.bool)
    first_of_ties[:, 1:] = cand[:, 1:] != cand[:, :-1]
    above = torch.where(first_of_ties, above, torch.full_like(above, float("-inf")))
    above = torch.cummax(above, dim=-1).values  # the value at the first of each tie group
    dropped = above >= top_p * total[:, None]
    decided = (dropped & (cand >= bound[:, None])).any(dim=-1) | torch.isneginf(bound)
    kept = (~dropped).sum(dim=-1).clamp(min=1)
    return cand.gather(-1, (kept - 1)[:, None])[:, 0], decided


def mask_outside(logits: torch.Tensor, tau: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` with entries ``< tau [...]`` set to ``row_max - FILL_BELOW_MAX`` (same
    dtype and strides; kept entries pass their gradient, masked ones get 0)."""
    fill = (row_max - FILL_BELOW_MAX).to(logits.dtype)[..., None].detach()
    return torch.where(logits >= tau[..., None], logits, fill)  # compared in fp32 for bf16 too


@torch.no_grad()
def _full_row_threshold(z: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, width = z.shape
    cand = torch.sort(z.float(), dim=-1, descending=True).values
    row_max = cand[:, 0]
    tau = torch.full((rows,), float("-inf"), dtype=torch.float32, device=z.device)
    if 0 < top_k < width:
        tau = cand[:, top_k - 1]
    if top_p < 1.0:
        kept_by_k = cand >= tau[:, None]
        total = torch.where(kept_by_k, torch.exp(cand - row_max[:, None]), 0.0).sum(-1)
        cand = torch.where(kept_by_k, cand, torch.full_like(cand, float("-inf")))
        whole_row = torch.full_like(tau, float("-inf"))
        tau = torch.maximum(tau, top_p_threshold(cand, whole_row, row_max, total, top_p)[0])
    return tau, row_max


def truncate_logits(logits: torch.Tensor, *, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """``logits [..., V]`` (whole vocabulary) with every entry outside the top-k / top-p kept set
    at ``row max - FILL_BELOW_MAX`` (probability exactly 0 after a softmax in fp32); returned as is
    when nothing is truncated. Sorts each row: for one device holding the whole vocabulary."""
    check_truncation(top_k, top_p)
    if top_k == -1 and top_p == 1.0:
        return logits
    lead = logits.shape[:-1]
    tau, row_max = _full_row_threshold(logits.reshape(-1, logits.shape[-1]), top_k, top_p)
    return mask_outside(logits, tau.view(lead), row_max.view(lead))
