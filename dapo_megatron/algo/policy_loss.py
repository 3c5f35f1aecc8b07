"""Clipped policy-gradient loss with decoupled clip ranges (DAPO "clip-higher") and dual clip."""

from __future__ import annotations

import torch

from dapo_megatron.algo._common import (
    as_bool_mask,
    check_rank,
    check_same_shape,
    compute_dtype,
    masked_max,
    masked_mean,
)

LOG_RATIO_CLAMP = 20.0
"""``log(pi / pi_old)`` is clamped to ``[-20, 20]`` before ``exp`` so the ratio stays finite."""


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO/DAPO clipped surrogate loss.

    With ``r = exp(clamp(log_prob - old_log_prob, -20, 20))`` and ``A`` the advantage::

        l   = max(-A * r, -A * clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))
        l   = min(l, -A * clip_ratio_c)          only where A < 0, only if clip_ratio_c is set
        out = m * w * l                           m: response mask, w: token_weights (default 1)

    DAPO decouples the two clip ranges (``0.2`` / ``0.28``) so that low-probability tokens with a
    positive advantage can grow further ("clip-higher"). Dual clip (Ye et al. 2019) bounds the loss of
    a negative-advantage token whose ratio exploded (``r > clip_ratio_c``). Masked positions are
    exactly 0, in value and in gradient, even if the inputs hold NaN or inf there. Reduce the result
    with :func:`~dapo_megatron.algo.aggregation.aggregate_loss` or
    :func:`~dapo_megatron.algo.aggregation.loss_sum_and_count`; how ``token_weights`` interact with
    the token count is defined in :mod:`dapo_megatron.algo.aggregation`.

    Gradients flow through ``log_prob`` only: ``old_log_prob``, ``advantages`` and ``token_weights``
    are detached. The math runs in fp32 (float64 input stays float64).

    Args:
        log_prob: ``[B, T]`` log-probabilities of the sampled tokens under the current policy.
        old_log_prob: ``[B, T]`` the same under the policy that generated the batch.
        advantages: ``[B, T]`` per-token advantages (see ``broadcast_advantages``).
        response_mask: ``[B, T]`` bool or 0/1; nonzero marks a token in the loss.
        clip_ratio_low: ``eps_low`` in ``[0, 1)``.
        clip_ratio_high: ``eps_high >= 0``.
        clip_ratio_c: dual-clip bound, ``> 1``; ``None`` disables dual clip.
        token_weights: optional ``[B, T]`` per-token multiplier (e.g. truncated importance weights).

    Returns:
        ``(per_token_loss [B, T], metrics)``. ``metrics`` holds detached 0-dim tensors, each a mean
        over valid tokens unless stated (``token_weights`` do not enter them):

        * ``clipfrac_high``: ``A > 0`` and ``r > 1 + clip_ratio_high`` (upper clip active);
        * ``clipfrac_low``: ``A < 0`` and ``r < 1 - clip_ratio_low`` (lower clip active);
        * ``clipfrac``: ``clipfrac_low + clipfrac_high``;
        * ``clipfrac_dual``: ``A < 0`` and ``r > clip_ratio_c`` (0 when dual clip is off);
        * ``approx_kl``: mean of ``old_log_prob - log_prob`` (k1 estimate of ``KL(pi_old || pi)``);
        * ``ratio_mean``; ``ratio_max`` (masked max, 0 for an empty mask).

    Raises:
        ValueError: shape mismatch (naming the argument), ``clip_ratio_low`` outside ``[0, 1)``,
            ``clip_ratio_high < 0``, or ``clip_ratio_c <= 1``.
    """
    check_rank("log_prob", log_prob, 2)
    check_same_shape(
        "log_prob",
        log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
        token_weights=token_weights,
    )
    if not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low must be in [0, 1), got {clip_ratio_low}")
    if clip_ratio_high < 0.0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {clip_ratio_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {clip_ratio_c}")

    dtype = compute_dtype(log_prob)
    mask = as_bool_mask(response_mask)
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    # Masking the inputs (not only the output) keeps padded garbage out of the backward pass too.
    log_ratio = torch.where(mask, log_prob.to(dtype) - old_log_prob.detach().to(dtype), zero)
    log_ratio = torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = torch.where(mask, advantages.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio)

    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clip_active = loss_clipped > loss_unclipped  # strict: A == 0 or r inside the range is not clipped

    negative = adv < 0
    if clip_ratio_c is not None:
        loss_dual = -adv * clip_ratio_c
        dual_active = negative & (loss > loss_dual)
        loss = torch.where(dual_active, loss_dual, loss)
    else:
        dual_active = torch.zeros_like(mask)

    if token_weights is not None:
        loss = loss * torch.where(mask, token_weights.detach().to(dtype), zero)
    per_token_loss = torch.where(mask, loss, zero)

    with torch.no_grad():
        clipfrac_high = masked_mean((clip_active & (adv > 0)).to(dtype), mask)
        clipfrac_low = masked_mean((clip_active & negative).to(dtype), mask)
        ratio_detached = ratio.detach()
        metrics = {
            "clipfrac_low": clipfrac_low,
            "clipfrac_high": clipfrac_high,
            "clipfrac": clipfrac_low + clipfrac_high,
            "clipfrac_dual": masked_mean(dual_active.to(dtype), mask),
            "approx_kl": masked_mean(-log_ratio.detach(), mask),
            "ratio_mean": masked_mean(ratio_detached, mask),
            "ratio_max": masked_max(ratio_detached, mask),
        }
    return per_token_loss, metrics
