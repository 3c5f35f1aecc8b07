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

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dapo_megatron.algo import (
    kl_penalty,
    loss_sum_and_count,
    truncated_importance_weights,
)
from dapo_megatron.algo.config import AlgorithmConfig
from dapo_megatron.algo.cov_loss import cov_policy_loss
from dapo_megatron.algo.token_weighting import entropy_top_rho_weights
from dapo_megatron.algo.truncation import OUTSIDE_SET_LOG_PROB
from dapo_megatron.parallel.packing import unpack_token_values
from dapo_megatron.policy.logprobs import vocab_parallel_log_probs
from dapo_megatron.policy.truncation import vocab_parallel_truncate


@dataclass(frozen=True)
class LossSettings:
    """What the loss function needs: the algorithm config plus three facts of the run.

    The algorithm knobs are :class:`~dapo_megatron.algo.config.AlgorithmConfig` itself (the
    ``algorithm`` section), never a copy of its fields.
    """

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    # Sampling temperature of the rollouts (``rollout.temperature``): every policy log-prob (old,
    # new, reference) and the entropy are those of ``softmax(logits / temperature)``, the
    # distribution the engine sampled.
    temperature: float = 1.0
    # The rollouts' top-k / top-p: the same truncation of that distribution (policy/truncation.py).
    top_k: int = -1
    top_p: float = 1.0
    # ``seq-mean-token-sum-norm`` (Dr.GRPO) divides by ``#sequences * norm_length``, a constant
    # (``rollout.max_response_length``): never the width of a micro-batch, which depends on the
    # micro-batch size through trimming and includes prompt tokens. ``None``: that mode is refused.
    norm_length: int | None = None
    # Tokens per chunk of the vocab-parallel log-prob computation (memory); ``None`` = one chunk.
    logprob_chunk_size: int | None = None

    def check_context_parallel(self, cp_size: int) -> None:
        """Raise ``ValueError`` for settings that need statistics over whole sequences or the whole
        micro-batch, which context parallelism splits over ranks (only local sums are computed)."""
        if cp_size <= 1:
            return
        a = self.algorithm
        unsupported = []
        if a.loss_agg_mode != "token-mean":
            unsupported.append(f"algorithm.loss_agg_mode={a.loss_agg_mode!r} (per-sequence means)")
        if a.token_weighting != "none":
            unsupported.append(f"algorithm.token_weighting={a.token_weighting!r} (micro-batch quantile)")
        if a.policy_loss != "dapo":
            unsupported.append(f"algorithm.policy_loss={a.policy_loss!r} (micro-batch covariance)")
        if unsupported:
            raise ValueError(
                f"parallel.context_parallel_size={cp_size} supports the token-level loss only; not "
                f"supported under CP: {', '.join(unsupported)}"
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
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each token given its prefix, aligned with ``input_ids``: ``[b, s]``.

    The policy's log-prob is that of the sampling distribution: with ``z`` this rank's logits
    shard and ``T = temperature``, ``out = log_softmax(z / T)[target]`` (vocab-parallel) and the
    entropy is that of ``softmax(z / T)``; ``d out / d z = (1[j == t] - p_j) / T``. Old, new and
    reference log-probs all come from here, so they match the engine's (which samples from the
    tempered logits) and each other. ``T = 1`` skips the division.

    ``top_k`` / ``top_p`` (the rollouts'): the softmax is over the kept set of
    :mod:`dapo_megatron.policy.truncation` (exact, vocab-parallel), the distribution the engines
    report processed log-probs of; a target outside it gets
    :data:`~dapo_megatron.algo.truncation.OUTSIDE_SET_LOG_PROB` with zero gradient.

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
    if not temperature > 0:
        raise ValueError(f"token_log_probs: temperature must be > 0, got {temperature}")
    if sequence_major:
        logits, targets = logits.transpose(0, 1), targets.t()
    logp, ent = _sampling_log_probs(
        logits, targets, tp_group, vocab_size, with_entropy, chunk_size, temperature, top_k, top_p
    )
    if sequence_major:
        logp, ent = logp.t(), (ent.t() if ent is not None else None)
    zeros = logp.new_zeros(logp.shape[0], 1)
    logp = torch.cat([zeros, logp[:, : s - 1]], dim=1)
    if ent is not None:
        ent = torch.cat([zeros, ent[:, : s - 1]], dim=1)
    return logp, ent


def _sampling_log_probs(logits, targets, tp_group, vocab_size, with_entropy, chunk_size, temperature, top_k, top_p):
    """Vocab-parallel log-probs / entropy of ``softmax(z / T)`` on the top-k / top-p kept set:
    the one definition behind :func:`token_log_probs` and :func:`packed_token_log_probs`."""
    if temperature != 1.0:
        logits = logits / temperature  # keeps the strides of ``logits``: same gradient layout
    truncated = top_k != -1 or top_p != 1.0
    if truncated:
        rank = dist.get_rank(group=tp_group) if tp_group is not None else 0
        shard = logits.shape[-1]
        num_valid = max(0, min(shard, vocab_size - rank * shard))
        logits = vocab_parallel_truncate(logits, top_k=top_k, top_p=top_p, tp_group=tp_group, num_valid=num_valid)
    logp, ent = vocab_parallel_log_probs(
        logits,
        targets,
        tp_group=tp_group,
        with_entropy=with_entropy,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
    )
    if truncated:
        # A masked target's logit is the fill (row max - 1e4), so its log-prob is <= -1e4; a kept
        # one's is > -5e3 unless its probability underflows fp32 anyway. Constant: zero gradient.
        outside = logp.detach() < OUTSIDE_SET_LOG_PROB / 2
        logp = torch.where(outside, torch.full_like(logp, OUTSIDE_SET_LOG_PROB), logp)
    return logp, ent


def packed_token_log_probs(
    logits: torch.Tensor,
    mb: dict,
    *,
    tp_group,
    vocab_size: int,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`token_log_probs` for a packed micro-batch (:mod:`dapo_megatron.parallel.packing`).

    ``logits [1, T_local, V/tp]`` of this rank's packed positions; the target of each position is
    the next token of its own sequence (``mb["targets"]``). Returns ``(log_probs [n, width],
    entropy [n, width] | None, computed [n, width] bool)`` in the padded layout of the
    micro-batch's sequences, aligned with the tokens as :func:`token_log_probs`; ``computed``
    marks the entries this rank holds (under CP its zigzag share; zeros elsewhere).
    """
    if not temperature > 0:
        raise ValueError(f"packed_token_log_probs: temperature must be > 0, got {temperature}")
    z = logits[0]
    logp, ent = _sampling_log_probs(
        z, mb["targets"][0].to(z.device), tp_group, vocab_size, with_entropy, chunk_size, temperature, top_k, top_p
    )
    logp, computed = unpack_token_values(logp, mb)
    if ent is not None:
        ent, _ = unpack_token_values(ent, mb)
    return logp, ent, computed


def dapo_loss(
    mb: dict[str, torch.Tensor], logits: torch.Tensor, *, settings: LossSettings, tp_group, vocab_size: int
):
    """Megatron loss function: ``(loss_sum, count, report)`` for one micro-batch.

    ``report`` holds *sums* (and maxima) so that metrics can be reduced exactly across
    micro-batches and ranks by :func:`dapo_megatron.policy.metrics.reduce_reports`.

    Packed micro-batches: log-probs are scattered into the padded layout and the loss counts only
    the tokens this rank computed. Under context parallelism each CP rank returns its *local*
    ``(loss_sum, num_tokens)`` with no CP factor: megatron-core 0.16.1's
    ``finalize_model_grads`` all-reduces ``num_tokens`` over the data-parallel x CP group and the
    gradients are summed over the same group, so the result is the global token mean.
    """
    a = settings.algorithm
    if "packed" in mb:
        log_prob, entropy, computed = packed_token_log_probs(
            logits,
            mb,
            tp_group=tp_group,
            vocab_size=vocab_size,
            with_entropy=True,
            chunk_size=settings.logprob_chunk_size,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
        )
        mask = mb["response_mask"].bool() & computed
    else:
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
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
        )
        mask = mb["response_mask"].bool()
    weights = mb.get("token_weights")
    if a.tis_cap is not None and "rollout_log_probs" in mb:
        tis = truncated_importance_weights(
            mb["old_log_probs"], mb["rollout_log_probs"], mask, a.tis_cap
        )
        weights = tis if weights is None else weights * tis
    if a.token_weighting == "entropy_top_rho":
        # Selection over this micro-batch's valid tokens. The vocab-parallel entropy is already
        # reduced over the TP group, so every TP rank selects the same tokens (no extra gather).
        top = entropy_top_rho_weights(entropy.detach(), mask, a.token_weighting_rho)
        weights = top if weights is None else weights * top
    elif a.token_weighting != "none":
        raise ValueError(f"algorithm.token_weighting must be none or entropy_top_rho, got {a.token_weighting!r}")
    generator = None
    if a.policy_loss == "clip_cov":
        # Seeded by the micro-batch's tokens: every TP rank, and a resumed run, picks the same tokens.
        generator = torch.Generator().manual_seed(int(mb["input_ids"].long().sum()))  # packed: same sum
    per_token, m = cov_policy_loss(
        log_prob,
        mb["old_log_probs"],
        mb["advantages"],
        mask,
        mode=a.policy_loss,
        clip_ratio_low=a.clip_ratio_low,
        clip_ratio_high=a.clip_ratio_high,
        clip_ratio_c=a.clip_ratio_c,
        clip_cov_ratio=a.clip_cov_ratio,
        clip_cov_lower=a.clip_cov_lower,
        clip_cov_upper=a.clip_cov_upper,
        kl_cov_ratio=a.kl_cov_ratio,
        kl_cov_coef=a.kl_cov_coef,
        generator=generator,
    )
    # Importance weights (TIS) correct the policy-gradient term only, not the regularisers.
    if a.loss_agg_mode == "seq-mean-token-sum-norm" and not settings.norm_length:
        # Dr.GRPO's constant 1 / (G * MAX_TOKENS) per sequence: micro-batches are trimmed, so
        # their width must not stand in for MAX_TOKENS.
        raise ValueError("loss_agg_mode 'seq-mean-token-sum-norm' needs LossSettings.norm_length "
                         "(rollout.max_response_length)")
    loss_sum, count = loss_sum_and_count(
        per_token, mask, weights, mode=a.loss_agg_mode, norm_length=settings.norm_length
    )
    pg_sum, _ = loss_sum_and_count(per_token, mask, weights, mode="token-mean")
    regulariser = None
    if a.entropy_coef:
        regulariser = -a.entropy_coef * entropy
    else:
        entropy = entropy.detach()
    if a.use_kl_loss and a.kl_coef:
        if "ref_log_probs" not in mb:
            raise ValueError("algorithm.kl_coef > 0 with use_kl_loss needs ref_log_probs in the batch")
        kl = a.kl_coef * kl_penalty(
            log_prob, mb["ref_log_probs"], kind=a.kl_type, response_mask=mask
        )
        regulariser = kl if regulariser is None else regulariser + kl
    if regulariser is not None:
        loss_sum = loss_sum + loss_sum_and_count(
            regulariser, mask, mode=a.loss_agg_mode, norm_length=settings.norm_length
        )[0]

    tokens = mask.sum()
    fmask = mask.to(torch.float64)
    # Sequence-level statistics from the whole response (a CP rank holds only part of it), counted
    # by one CP rank.
    lengths = mb["response_mask"].bool().sum(dim=1)
    seq_weight = mb.get("sequence_stats_weight", torch.tensor(1.0, dtype=torch.float64))
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
        "sequences": (lengths > 0).sum().double() * seq_weight,
        "response_length_sum": lengths.sum().double() * seq_weight,
        "response_length_max": lengths.max().double(),
    }
    return loss_sum, count.to(torch.int), report
