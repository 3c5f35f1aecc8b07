"""DAPO algorithm core: pure tensor math, no process groups.

Every function takes and returns tensors (shapes ``[B, T]`` = batch x response tokens, ``[B]`` =
one value per response), states its equation in its docstring, and raises ``ValueError`` naming the
offending argument on bad input. Metrics come back as detached 0-dim tensors so callers can reduce
them across ranks before calling ``.item()``. The loss normalisation contract (sum and count, token
weights) is defined once, in :mod:`dapo_megatron.algo.aggregation`.

One concern per module: ``policy_loss`` (clipped surrogate), ``aggregation`` (loss modes),
``advantages`` (group-relative advantages), ``reward_shaping`` (overlong penalty / filter),
``dynamic_sampling`` (group filter and batch refill), ``kl`` (optional KL estimators, per-token and summed per sequence), ``importance``
(trainer / inference mismatch), ``config`` (the one frozen algorithm config), ``presets`` (GRPO,
DAPO, Dr.GRPO as instances of it). The optional entropy bonus needs
no function of its own: ``loss - entropy_coef * aggregate_loss(entropy, mask, mode)`` with the
per-token entropy from :mod:`dapo_megatron.policy.logprobs`.
"""

from dapo_megatron.algo.advantages import broadcast_advantages, group_advantages
from dapo_megatron.algo.aggregation import LOSS_AGG_MODES, aggregate_loss, loss_sum_and_count
from dapo_megatron.algo.config import AlgorithmConfig
from dapo_megatron.algo.dynamic_sampling import (
    DynamicSampler,
    DynamicSamplingExhaustedError,
    select_informative_groups,
)
from dapo_megatron.algo.importance import logprob_mismatch_metrics, truncated_importance_weights
from dapo_megatron.algo.kl import KL_ESTIMATORS, kl_penalty, sequence_kl_sums
from dapo_megatron.algo.policy_loss import policy_loss
from dapo_megatron.algo.presets import ALGORITHM_PRESETS, get_preset
from dapo_megatron.algo.reward_shaping import overlong_mask, overlong_penalty

__all__ = [
    "ALGORITHM_PRESETS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "AlgorithmConfig",
    "DynamicSampler",
    "DynamicSamplingExhaustedError",
    "aggregate_loss",
    "broadcast_advantages",
    "get_preset",
    "group_advantages",
    "kl_penalty",
    "logprob_mismatch_metrics",
    "loss_sum_and_count",
    "overlong_mask",
    "overlong_penalty",
    "policy_loss",
    "select_informative_groups",
    "sequence_kl_sums",
    "truncated_importance_weights",
]
