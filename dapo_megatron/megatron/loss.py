"""The DAPO loss as a Megatron-Core loss function.

Megatron calls ``loss_fn(micro_batch, logits)`` on the last pipeline stage with this rank's vocab
shard of the logits. We return Megatron's 3-tuple ``(loss_sum, count, report)``:

* ``loss_sum``: the sum of per-token losses of this micro-batch (see
  :func:`dapo_megatron.algo.loss_sum_and_count`, the one place the normalisation is defined);
* ``count``: its denominator (valid response tokens under ``token-mean``);
* with ``config.calculate_per_token_loss = True`` Megatron sums both over micro-batches and
  data-parallel ranks and scales the gradients by ``1 / global count`` in
  ``finalize_model_grads``. So the token mean is over the *whole global batch*, never per sample,
  per micro-batch or per rank.

Micro-batch tensors (``[b, s]``, aligned with ``input_ids``: the value at position ``t`` belongs
to the token ``input_ids[t]``, predicted from positions ``< t``):
``input_ids``, ``response_mask`` (1 on response tokens that enter the loss), ``advantages``
(per token), ``old_log_probs``, optional ``rollout_log_probs`` (engine's, for TIS),
``ref_log_probs`` (KL), ``token_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dapo_megatron.algo import (
    kl_penalty,
    loss_sum_and_count,
    policy_loss,
    truncated_importance_weights,
)
from dapo_megatron.megatron.logprobs import vocab_parallel_log_probs


@dataclass(frozen=True)
class LossSettings:
    """The knobs of the policy loss (a view of ``AlgorithmConfig``)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = None
    loss_agg_mode: str = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    tis_cap: float | None = None
    logprob_chunk_size: int | None = None

    @classmethod
    def from_algorithm_config(cls, algo, logprob_chunk_size: int | None = None) -> LossSettings:
        return cls(
            clip_ratio_low=algo.clip_ratio_low,
            clip_ratio_high=algo.clip_ratio_high,
            clip_ratio_c=algo.clip_ratio_c,
            loss_agg_mode=algo.loss_agg_mode,
            entropy_coef=algo.entropy_coef,
            kl_coef=algo.kl_coef if algo.use_kl_loss else 0.0,
            kl_type=algo.kl_type,
            tis_cap=algo.tis_cap,
            logprob_chunk_size=logprob_chunk_size,
        )


def token_log_probs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    tp_group,
    vocab_size: int,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    sequence_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each token given its prefix, aligned with ``input_ids``: ``[b, s]``.

    ``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` for ``t >= 1``; ``out[:, 0] = 0``
    (the first token has no prediction). The entropy at ``t`` is that of the distribution that
    predicted token ``t``. Computed vocab-parallel (the full vocabulary is never gathered).

    ``sequence_major``: compute on the ``[s, b, V]`` view of ``logits``, so that their gradient
    is laid out ``[s, b, V]`` in memory. Megatron's ``GPTModel`` computes ``[s, b, V]`` logits and
    hands out a ``[b, s, V]`` contiguous copy; a gradient in the ``[b, s, V]`` memory order would
    cost its output layer two more shard-sized copies in the backward pass (same values either way).
    """
    s = input_ids.shape[1]
    # Targets for position t-1 are input_ids[t]; the last position predicts nothing (target 0).
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    targets[:, -1] = 0
    if sequence_major:
        logits, targets = logits.transpose(0, 1), targets.t()
    logp, ent = vocab_parallel_log_probs(
        logits,
        targets,
        tp_group=tp_group,
        with_entropy=with_entropy,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
    )
    if sequence_major:
        logp, ent = logp.t(), (ent.t() if ent is not None else None)
    zeros = logp.new_zeros(logp.shape[0], 1)
    logp = torch.cat([zeros, logp[:, : s - 1]], dim=1)
    if ent is not None:
        ent = torch.cat([zeros, ent[:, : s - 1]], dim=1)
    return logp, ent


def dapo_loss(
    mb: dict[str, torch.Tensor], logits: torch.Tensor, *, settings: LossSettings, tp_group, vocab_size: int
):
    """Megatron loss function: ``(loss_sum, count, report)`` for one micro-batch.

    ``report`` holds *sums* (and maxima) so that metrics can be reduced exactly across
    micro-batches and ranks by :func:`dapo_megatron.megatron.metrics.reduce_reports`.
    """
    s = mb["input_ids"].shape[1]
    logits = logits[:, :s]  # drop sequence-parallel padding, if any
    log_prob, entropy = token_log_probs(
        logits,
        mb["input_ids"],
        tp_group=tp_group,
        vocab_size=vocab_size,
        with_entropy=True,
        chunk_size=settings.logprob_chunk_size,
        sequence_major=True,  # GPTModel's own layout: no copies in its backward pass
    )
    mask = mb["response_mask"].bool()
    weights = mb.get("token_weights")
    if settings.tis_cap is not None and "rollout_log_probs" in mb:
        tis = truncated_importance_weights(
            mb["old_log_probs"], mb["rollout_log_probs"], mask, settings.tis_cap
        )
        weights = tis if weights is None else weights * tis
    per_token, m = policy_loss(
        log_prob,
        mb["old_log_probs"],
        mb["advantages"],
        mask,
        clip_ratio_low=settings.clip_ratio_low,
        clip_ratio_high=settings.clip_ratio_high,
        clip_ratio_c=settings.clip_ratio_c,
    )
    # Importance weights (TIS) correct the policy-gradient term only, not the regularisers.
    loss_sum, count = loss_sum_and_count(per_token, mask, weights, mode=settings.loss_agg_mode)
    pg_sum, _ = loss_sum_and_count(per_token, mask, weights, mode="token-mean")
    regulariser = None
    if settings.entropy_coef:
        regulariser = -settings.entropy_coef * entropy
    else:
        entropy = entropy.detach()
    if settings.kl_coef:
        if "ref_log_probs" not in mb:
            raise ValueError("algorithm.kl_coef > 0 with use_kl_loss needs ref_log_probs in the batch")
        kl = settings.kl_coef * kl_penalty(
            log_prob, mb["ref_log_probs"], kind=settings.kl_type, response_mask=mask
        )
        regulariser = kl if regulariser is None else regulariser + kl
    if regulariser is not None:
        loss_sum = loss_sum + loss_sum_and_count(regulariser, mask, mode=settings.loss_agg_mode)[0]

    tokens = mask.sum()
    fmask = mask.to(torch.float64)
    lengths = mask.sum(dim=1)
    report = {
        "loss_sum": loss_sum.detach().double(),
        "loss_count": count.double(),
        "tokens": tokens.double(),
        "pg_loss_sum": pg_sum.detach().double(),
        "entropy_sum": (entropy.detach().double() * fmask).sum(),
        "approx_kl_sum": m["approx_kl"].double() * tokens,
        "clipfrac_low_sum": m["clipfrac_low"].double() * tokens,
        "clipfrac_high_sum": m["clipfrac_high"].double() * tokens,
        "clipfrac_dual_sum": m["clipfrac_dual"].double() * tokens,
        "ratio_sum": m["ratio_mean"].double() * tokens,
        "ratio_max": m["ratio_max"].double(),
        "sequences": (lengths > 0).sum().double(),
        "response_length_sum": lengths.sum().double(),
        "response_length_max": lengths.max().double(),
    }
    return loss_sum, count.to(torch.int), report
