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
``kl_coef * aggregate_loss(kl_penalty(...), mask, mode)``), or subtract ``kl_coef * kl_penalty(...)``
from the token rewards (KL in reward).
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
