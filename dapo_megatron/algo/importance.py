"""Trainer / inference mismatch: truncated importance sampling (TIS) and mismatch metrics.

The rollout engine (vLLM) and the trainer (Megatron) compute slightly different log-probabilities
for the same tokens (kernels, precision, sharding). The behaviour policy is then the engine's, not
``pi_old``; TIS reweights each token by ``pi_old / pi_rollout``, truncated at ``cap`` to bound the
variance (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").
"""

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


def truncated_importance_weights(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """``w = min(exp(old_log_prob - rollout_log_prob), cap)`` per token, detached, 0 where masked.

    The log-difference is clamped to ``[-20, 20]`` before ``exp``. Pass the result as
    ``policy_loss(..., token_weights=w)``; the token count stays the number of valid tokens (see
    :mod:`dapo_megatron.algo.aggregation`).

    Args:
        old_log_prob: ``[B, T]`` trainer log-probs of the sampling policy.
        rollout_log_prob: ``[B, T]`` the inference engine's log-probs of the same tokens.
        response_mask: ``[B, T]`` bool or 0/1.
        cap: truncation ``> 0`` (e.g. 2).

    Returns:
        ``[B, T]`` weights (fp32 for half-precision input), no gradient.

    Raises:
        ValueError: ``cap <= 0`` or shape mismatch.
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    check_rank("old_log_prob", old_log_prob, 2)
    check_same_shape(
        "old_log_prob", old_log_prob, rollout_log_prob=rollout_log_prob, response_mask=response_mask
    )
    dtype = compute_dtype(old_log_prob)
    mask = as_bool_mask(response_mask)
    zero = torch.zeros((), dtype=dtype, device=old_log_prob.device)
    with torch.no_grad():
        log_w = torch.where(mask, old_log_prob.to(dtype) - rollout_log_prob.to(dtype), zero)
        weights = torch.exp(log_w.clamp(-20.0, 20.0)).clamp(max=cap)
        return torch.where(mask, weights, zero)


def logprob_mismatch_metrics(
    trainer_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    threshold: float = 0.1,
) -> dict[str, torch.Tensor]:
    """How far the inference engine's log-probs are from the trainer's, over valid tokens.

    With ``d = |trainer_log_prob - rollout_log_prob|``:

    * ``abs_diff_mean``: mean of ``d``;
    * ``abs_diff_max``: max of ``d`` (0 for an empty mask);
    * ``frac_above_threshold``: fraction of tokens with ``d > threshold`` (default 0.1).

    Args:
        trainer_log_prob: ``[B, T]``.
        rollout_log_prob: ``[B, T]``.
        response_mask: ``[B, T]`` bool or 0/1.
        threshold: ``>= 0``.

    Returns:
        Detached 0-dim tensors.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    check_rank("trainer_log_prob", trainer_log_prob, 2)
    check_same_shape(
        "trainer_log_prob", trainer_log_prob, rollout_log_prob=rollout_log_prob, response_mask=response_mask
    )
    dtype = compute_dtype(trainer_log_prob)
    mask = as_bool_mask(response_mask)
    with torch.no_grad():
        diff = (trainer_log_prob.to(dtype) - rollout_log_prob.to(dtype)).abs()
        return {
            "abs_diff_mean": masked_mean(diff, mask),
            "abs_diff_max": masked_max(diff, mask),
            "frac_above_threshold": masked_mean((diff > threshold).to(dtype), mask),
        }
