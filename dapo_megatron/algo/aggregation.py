"""Loss aggregation: from a per-token loss ``[B, T]`` to a scalar, and the (sum, count) contract.

Modes (``m`` = response mask, ``n_i = sum_t m_it`` = valid tokens of row ``i``, ``l`` = per-token loss,
``B' = #{i : n_i > 0}`` = rows with at least one valid token)::

    token-mean               sum_it m l / sum_it m                  DAPO: every token weighs the same
    seq-mean-token-mean      (1/B') sum_i (sum_t m l / n_i)         GRPO: every sequence weighs the same
    seq-mean-token-sum       (1/B') sum_i sum_t m l
    seq-mean-token-sum-norm  sum_it m l / (B * T)                   Dr.GRPO: a constant normaliser

Fully masked rows (e.g. removed by overlong filtering) are left out of the sequence means, so they
neither add loss nor dilute it. ``seq-mean-token-sum-norm`` divides by the *padded* width ``T`` of
``per_token_loss`` and by all ``B`` rows, as the Dr.GRPO paper's constant ``1/(G * MAX_TOKENS)``;
pad responses to the maximum response length to keep it constant across steps. (verl divides by
``T`` only, i.e. its value is ``B`` times ours.)

The (sum, count) contract and token weights
-------------------------------------------
This is the one place that defines the convention; every other function refers here.

:func:`loss_sum_and_count` returns ``(loss_sum, count)`` with ``aggregate_loss == loss_sum / count``
(``count`` clamped to at least 1) for every mode. Callers that normalise globally -- the Megatron
loss function returns ``(loss_sum, num_tokens, report)`` and Megatron divides the sum over
micro-batches and data-parallel ranks by the summed count (``calculate_per_token_loss``) -- return
these two numbers unchanged, and the global result is the mode's value over the global batch:

* ``token-mean``: ``count`` = number of valid tokens (``num_valid_tokens``);
* ``seq-mean-token-mean`` / ``seq-mean-token-sum``: ``count`` = number of non-empty rows;
* ``seq-mean-token-sum-norm``: ``count`` = ``B * T`` token slots.

**Token weights** (e.g. truncated importance weights) multiply the loss inside the sum only:
``loss_sum = sum m * w * l``. The count is **never** the weight sum: under ``token-mean`` it stays
the number of valid tokens, so ``token-mean`` with weights is ``sum m w l / sum m`` -- an
importance-weighted estimate of the same per-token mean, not a weighted average. Apply weights
once: either in :func:`~dapo_megatron.algo.policy_loss.policy_loss` (``token_weights=``) or here,
not both.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch

from dapo_megatron.algo._common import as_bool_mask, check_rank, check_same_shape, compute_dtype

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
"""The loss aggregation modes (the type of ``AlgorithmConfig.loss_agg_mode``)."""

LOSS_AGG_MODES: tuple[str, ...] = typing.get_args(LossAggMode)


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"mode must be one of {list(LOSS_AGG_MODES)}, got {mode!r}")


def loss_sum_and_count(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    mode: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator of ``mode`` for callers that normalise globally.

    Args:
        per_token_loss: ``[B, T]`` float.
        response_mask: ``[B, T]``, bool or 0/1; nonzero marks a valid token.
        token_weights: optional ``[B, T]`` multiplier of the loss inside the sum.
        mode: one of :data:`LOSS_AGG_MODES`.
        norm_length: ``seq-mean-token-sum-norm`` only: the constant length ``T`` of its
            ``B * T`` denominator (Dr.GRPO's generation budget); ``None`` = the padded width
            ``per_token_loss.shape[1]``. A caller that trims micro-batches must pass it, or the
            normaliser would change with the trimming.

    Returns:
        ``(loss_sum, count)``: a 0-dim float tensor (differentiable) and a 0-dim ``int64`` tensor,
        such that ``aggregate_loss(...) == loss_sum / max(count, 1)``. What ``count`` counts per
        mode, and why token weights never enter it, is defined in this module's docstring.
    """
    _check_mode(mode)
    check_rank("per_token_loss", per_token_loss, 2)
    check_same_shape(
        "per_token_loss", per_token_loss, response_mask=response_mask, token_weights=token_weights
    )
    mask = as_bool_mask(response_mask)
    loss = per_token_loss.to(compute_dtype(per_token_loss))
    if token_weights is not None:
        loss = loss * token_weights.to(loss.dtype)
    # where(), not multiply: a NaN/inf in a padded slot must not leak into the sum.
    loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    tokens_per_row = mask.sum(dim=-1)

    if mode == "token-mean":
        return loss.sum(), tokens_per_row.sum()
    if mode == "seq-mean-token-mean":
        row_means = loss.sum(dim=-1) / tokens_per_row.clamp(min=1).to(loss.dtype)
        return row_means.sum(), (tokens_per_row > 0).sum()
    if mode == "seq-mean-token-sum":
        return loss.sum(), (tokens_per_row > 0).sum()
    # seq-mean-token-sum-norm
    length = loss.shape[1] if norm_length is None else norm_length
    return loss.sum(), torch.tensor(loss.shape[0] * length, dtype=torch.long, device=loss.device)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate a per-token loss ``[B, T]`` into a scalar according to ``mode``.

    ``loss = loss_sum / max(count, 1)`` with ``(loss_sum, count) = loss_sum_and_count(...)``; the
    equations per mode and the token-weight convention are in this module's docstring. An empty
    mask gives 0, not NaN.

    Args:
        per_token_loss: ``[B, T]`` float.
        response_mask: ``[B, T]``, bool or 0/1.
        mode: ``"token-mean"`` (DAPO, default), ``"seq-mean-token-mean"`` (GRPO),
            ``"seq-mean-token-sum"`` or ``"seq-mean-token-sum-norm"`` (Dr.GRPO).
        token_weights: optional ``[B, T]`` multiplier inside the sum (not in the count).

    Returns:
        0-dim float tensor (fp32 for half-precision input).
    """
    loss_sum, count = loss_sum_and_count(per_token_loss, response_mask, token_weights, mode=mode)
    return loss_sum / count.clamp(min=1).to(loss_sum.dtype)
