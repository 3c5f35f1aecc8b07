"""Per-token KL estimators between the policy and a reference policy (off in DAPO).

With ``x = log pi(y_t) - log pi_ref(y_t)`` for tokens sampled from ``pi`` (Schulman, "Approximating
KL divergence")::

    k1                x                            unbiased, high variance, can be negative
    abs               |x|
    k2 (mse)          x^2 / 2                      low variance, biased
    k3 (low_var_kl)   exp(-x) - 1 + x              unbiased, low variance, >= 0

As in verl, ``k3`` / ``low_var_kl`` clamp ``-x`` to ``[-20, 20]`` before ``exp`` and the result to
``[-10, 10]``; ``mse`` and ``low_var_kl`` are verl's names. Reduce with
:func:`~dapo_megatron.algo.aggregation.aggregate_loss` for a KL loss (GRPO:
``kl_coef * aggregate_loss(kl_penalty(...), mask, mode)``), or, for KL in the reward with outcome
(group) advantages, subtract ``kl_coef * sequence_kl_sums(...)`` from each response's scalar reward:
the token rewards ``score * [t = last] - kl_coef * KL_t`` summed over the response
(:func:`sequence_kl_sums`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from dapo_megatron.algo._common import as_bool_mask, check_rank, check_same_shape, compute_dtype


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    neg = torch.clamp(-log_ratio, -20.0, 20.0)
    return torch.clamp(torch.exp(neg) - neg - 1.0, -10.0, 10.0)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda x: x,
    "abs": torch.abs,
    "k2": _k2,
    "mse": _k2,
    "k3": _k3,
    "low_var_kl": _k3,
}
"""Estimator name -> function of the log-ratio ``x = log_prob - ref_log_prob``."""

KLType = Literal[tuple(KL_ESTIMATORS)]  # type: ignore[valid-type]
"""The estimator names (the type of ``AlgorithmConfig.kl_type``)."""


def kl_penalty(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    kind: str = "low_var_kl",
    *,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` (equations in the module docstring).

    Args:
        log_prob: ``[B, T]`` log-probabilities under the policy (gradients flow through it).
        ref_log_prob: ``[B, T]`` under the reference policy (detached).
        kind: a key of :data:`KL_ESTIMATORS`.
        response_mask: optional ``[B, T]``; masked positions are exactly 0 (value and gradient).

    Returns:
        ``[B, T]`` (fp32 for half-precision input).

    Raises:
        ValueError: unknown ``kind`` or shape mismatch.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {sorted(KL_ESTIMATORS)}, got {kind!r}")
    check_rank("log_prob", log_prob, 2)
    check_same_shape("log_prob", log_prob, ref_log_prob=ref_log_prob, response_mask=response_mask)
    dtype = compute_dtype(log_prob)
    log_ratio = log_prob.to(dtype) - ref_log_prob.detach().to(dtype)
    if response_mask is not None:
        # Every estimator is 0 at x = 0, so masking the input masks the output and its gradient.
        log_ratio = torch.where(
            as_bool_mask(response_mask), log_ratio, torch.zeros((), dtype=dtype, device=log_ratio.device)
        )
    return KL_ESTIMATORS[kind](log_ratio)


def sequence_kl_sums(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    kind: str = "low_var_kl",
) -> torch.Tensor:
    """Per-sequence KL of each response to the reference: the sum of the token estimates.

    For row ``i`` with response mask ``m``::

        KL_i = sum_t m[i, t] * k(log_prob[i, t] - ref_log_prob[i, t])

    with ``k`` the estimator ``kind`` (module docstring). KL in the reward (verl
    ``use_kl_in_reward``) uses token rewards ``r_t = score * [t = last] - beta * k_t``; an outcome
    (group) advantage sees only their sum over the response, ``score - beta * KL_i``, so the
    shaped scalar reward of a response is ``reward_i - beta * KL_i``.

    Args:
        log_prob: ``[B, T]`` log-probabilities of the sampled tokens under the rollout policy.
        ref_log_prob: ``[B, T]`` under the reference policy.
        response_mask: ``[B, T]`` bool or 0/1, the response tokens of each row.
        kind: a key of :data:`KL_ESTIMATORS`.

    Returns:
        ``[B]`` float64 (summed in float64; no gradient).

    Raises:
        ValueError: unknown ``kind`` or shape mismatch.
    """
    check_rank("response_mask", response_mask, 2)
    kl = kl_penalty(log_prob.detach(), ref_log_prob, kind, response_mask=response_mask)
    return kl.to(torch.float64).sum(dim=-1)
