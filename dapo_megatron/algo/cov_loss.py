"""Clip-Cov / KL-Cov (Cui et al. 2025): act on the tokens with the largest log-prob/advantage covariance."""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch

from dapo_megatron.algo._common import as_bool_mask, check_rank, check_same_shape, compute_dtype
from dapo_megatron.algo.policy_loss import LOG_RATIO_CLAMP, policy_loss

PolicyLossMode = Literal["dapo", "clip_cov", "kl_cov"]
"""The modes (the type of ``AlgorithmConfig.policy_loss``)."""
POLICY_LOSS_MODES: tuple[str, ...] = typing.get_args(PolicyLossMode)


def token_covariance(log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-token centred covariance term between log-prob and advantage.

    With means over the ``N`` valid tokens::

        cov_t = (log_prob_t - mean(log_prob)) * (A_t - mean(A))   for m_t, else 0

    Args: ``[B, T]`` tensors (log_prob detached here). Returns ``[B, T]`` (fp32 at least).
    """
    check_rank("log_prob", log_prob, 2)
    check_same_shape("log_prob", log_prob, advantages=advantages, response_mask=response_mask)
    dtype = compute_dtype(log_prob)
    mask = as_bool_mask(response_mask)
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    lp = torch.where(mask, log_prob.detach().to(dtype), zero)
    adv = torch.where(mask, advantages.detach().to(dtype), zero)
    n = mask.sum().clamp(min=1)
    cov = (lp - lp.sum() / n) * (adv - adv.sum() / n)
    return torch.where(mask, cov, zero)


def clip_cov_mask(
    cov: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio: float,
    cov_lower: float,
    cov_upper: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip-Cov selection: ``ceil(clip_ratio * N)`` valid tokens drawn uniformly (without
    replacement) among those with ``cov_lower <= cov_t <= cov_upper`` (fewer if fewer qualify).
    Returns a ``[B, T]`` bool mask of the tokens whose gradient is removed."""
    if not 0.0 <= clip_ratio <= 1.0:
        raise ValueError(f"clip_cov ratio must be in [0, 1], got {clip_ratio}")
    if cov_lower > cov_upper:
        raise ValueError(f"clip_cov bounds inverted: cov_lower={cov_lower} > cov_upper={cov_upper}")
    mask = as_bool_mask(response_mask)
    eligible = (mask & (cov >= cov_lower) & (cov <= cov_upper)).reshape(-1)
    k = min(int(eligible.sum()), math.ceil(clip_ratio * int(mask.sum()) - 1e-9))
    selected = torch.zeros_like(eligible)
    if k > 0:
        candidates = eligible.nonzero().squeeze(1)
        pick = torch.randperm(candidates.numel(), generator=generator)[:k]
        selected[candidates[pick]] = True
    return selected.reshape(cov.shape)


def kl_cov_mask(cov: torch.Tensor, response_mask: torch.Tensor, *, kl_ratio: float) -> torch.Tensor:
    """KL-Cov selection: the ``ceil(kl_ratio * N)`` valid tokens with the largest ``cov_t`` (ties by
    position). Returns a ``[B, T]`` bool mask."""
    if not 0.0 <= kl_ratio <= 1.0:
        raise ValueError(f"kl_cov ratio must be in [0, 1], got {kl_ratio}")
    mask = as_bool_mask(response_mask).reshape(-1)
    n = int(mask.sum())
    k = min(n, math.ceil(kl_ratio * n - 1e-9))
    keyed = torch.where(mask, cov.reshape(-1), torch.full_like(cov.reshape(-1), -math.inf))
    selected = torch.zeros_like(mask)
    if k > 0:
        selected[torch.sort(keyed, descending=True, stable=True).indices[:k]] = True
    return selected.reshape(cov.shape)


def cov_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = None,
    token_weights: torch.Tensor | None = None,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lower: float = 1.0,
    clip_cov_upper: float = 5.0,
    kl_cov_ratio: float = 2e-3,
    kl_cov_coef: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``dapo`` / ``clip_cov`` / ``kl_cov`` per-token loss, all on the clipped surrogate ``l_t`` of
    :func:`~dapo_megatron.algo.policy_loss.policy_loss` (shared core; ``[B, T]`` in and out)::

        dapo:     out_t = m w l_t
        clip_cov: out_t = m w (1 - s_t) l_t                 s = clip_cov_mask(cov): no gradient there
        kl_cov:   out_t = m w (l_t + s_t * coef * |log r_t|) s = kl_cov_mask(cov), r = pi / pi_old

    with ``cov = token_covariance(log_prob, A, m)`` over the tokens passed in (one micro-batch in
    the trainer). Unlike the paper's KL-Cov (unclipped surrogate), the PPO clip stays on: one core.
    Metrics are those of ``policy_loss`` plus ``cov_selected_frac`` (selected / valid tokens).
    """
    if mode not in POLICY_LOSS_MODES:
        raise ValueError(f"policy_loss mode must be one of {POLICY_LOSS_MODES}, got {mode!r}")
    if kl_cov_coef < 0:
        raise ValueError(f"kl_cov_coef must be >= 0, got {kl_cov_coef}")
    mask = as_bool_mask(response_mask)
    dtype = compute_dtype(log_prob)
    if mode == "dapo":
        selected = torch.zeros_like(mask)
    else:
        cov = token_covariance(log_prob, advantages, mask)
        if mode == "clip_cov":
            selected = clip_cov_mask(
                cov, mask, clip_ratio=clip_cov_ratio, cov_lower=clip_cov_lower, cov_upper=clip_cov_upper,
                generator=generator,
            )
        else:
            selected = kl_cov_mask(cov, mask, kl_ratio=kl_cov_ratio)
    weights = token_weights
    if mode == "clip_cov":
        keep = (~selected).to(dtype)
        weights = keep if token_weights is None else token_weights.detach().to(dtype) * keep
    loss, metrics = policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
        token_weights=weights,
    )
    if mode == "kl_cov":
        zero = torch.zeros((), dtype=dtype, device=log_prob.device)
        log_ratio = torch.where(selected, log_prob.to(dtype) - old_log_prob.detach().to(dtype), zero)
        penalty = kl_cov_coef * torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).abs()
        if token_weights is not None:
            penalty = penalty * torch.where(selected, token_weights.detach().to(dtype), zero)
        loss = loss + torch.where(selected, penalty, zero)
    metrics["cov_selected_frac"] = (selected.sum() / mask.sum().clamp(min=1)).to(dtype)
    return loss, metrics
