"""Entropy-based token weights: train only on the high-entropy "forking" tokens (top-rho by entropy)."""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch

from dapo_megatron.algo._common import as_bool_mask, check_rank, check_same_shape

TokenWeighting = Literal["none", "entropy_top_rho"]
"""The modes (the type of ``AlgorithmConfig.token_weighting``)."""
TOKEN_WEIGHTINGS: tuple[str, ...] = typing.get_args(TokenWeighting)


def entropy_top_rho_weights(entropy: torch.Tensor, response_mask: torch.Tensor, rho: float) -> torch.Tensor:
    """0/1 token weights selecting the ``ceil(rho * N)`` highest-entropy valid tokens.

    Wang et al. 2025 ("Beyond the 80/20 Rule", rho = 0.2) keep the policy gradient only on the
    high-entropy "forking" tokens. With ``H`` the per-token entropy, ``m`` the response mask and
    ``N = sum m`` the valid tokens of the tensor passed in::

        k   = ceil(rho * N)
        w_t = 1  if m_t and H_t is among the k largest H over valid tokens, else 0

    Ties are broken by position (row-major order, earlier first), so the result is deterministic.
    The selection scope is whatever tensor the caller passes (the trainer passes one micro-batch).

    **Denominator.** The weights enter the loss *sum* only (the contract of
    :mod:`dapo_megatron.algo.aggregation`): under ``token-mean`` the count still counts **all valid
    tokens** of the global batch, not the selected ones, so the loss is
    ``sum_t m_t w_t l_t / sum_t m_t`` and its gradient is about ``rho`` times the gradient of the
    paper's mean over selected tokens (an effective learning-rate factor of ``rho``).

    Args:
        entropy: ``[B, T]`` per-token entropy (detached here).
        response_mask: ``[B, T]`` bool or 0/1.
        rho: fraction in ``(0, 1]``.

    Returns:
        ``[B, T]`` weights, dtype of ``entropy`` (fp32 for half precision), 0 at masked positions.

    Raises:
        ValueError: shape mismatch or ``rho`` outside ``(0, 1]``.
    """
    check_rank("entropy", entropy, 2)
    check_same_shape("entropy", entropy, response_mask=response_mask)
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    dtype = torch.float64 if entropy.dtype == torch.float64 else torch.float32
    mask = as_bool_mask(response_mask).reshape(-1)
    values = entropy.detach().to(dtype).reshape(-1)
    num_valid = int(mask.sum())
    weights = torch.zeros_like(values)
    if num_valid == 0:
        return weights.reshape(entropy.shape)
    k = min(num_valid, math.ceil(rho * num_valid - 1e-9))
    keyed = torch.where(mask, values, torch.full_like(values, -math.inf))
    order = torch.sort(keyed, descending=True, stable=True).indices
    weights[order[:k]] = 1.0
    return weights.reshape(entropy.shape)
