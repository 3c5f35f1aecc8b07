"""The algorithm configuration: one frozen, validated dataclass for every algorithm knob.

Each vocabulary (loss aggregation modes, KL estimators, ...) is defined once, next to the code that
implements it (:data:`~dapo_megatron.algo.aggregation.LossAggMode`,
:data:`~dapo_megatron.algo.kl.KLType`), and used here as the field's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from dapo_megatron.algo.aggregation import LossAggMode
from dapo_megatron.algo.cov_loss import PolicyLossMode
from dapo_megatron.algo.kl import KLType
from dapo_megatron.algo.token_weighting import TokenWeighting
from dapo_megatron.utils.typed_config import TypedSection, doc_field

__all__ = ["AlgorithmConfig"]


@dataclass(frozen=True)
class AlgorithmConfig(TypedSection):
    """The DAPO / GRPO objective, reward shaping and dynamic sampling (frozen; defaults are DAPO's).

    The one definition of the algorithm knobs: it is the ``algorithm`` section of the trainer
    config, the presets of :mod:`dapo_megatron.algo.presets` are instances of it, and the loss
    settings of the Megatron side carry it (:class:`dapo_megatron.policy.loss.LossSettings`).
    Derive variants with ``dataclasses.replace(cfg, clip_ratio_high=0.3)`` (re-validated).
    """

    _section: ClassVar[str] = "algorithm"

    clip_ratio_low: float = doc_field(
        0.2, "eps_low: the ratio is clipped below at 1 - clip_ratio_low, in [0, 1)."
    )
    clip_ratio_high: float = doc_field(
        0.28, "eps_high: the ratio is clipped above at 1 + clip_ratio_high (Clip-Higher)."
    )
    clip_ratio_c: float | None = doc_field(
        None, "Dual-clip constant c (> 1) bounding the loss for negative advantages; null = off."
    )
    loss_agg_mode: LossAggMode = doc_field(
        "token-mean", "How per-token losses are aggregated: token-mean (DAPO) or a per-sequence mean (GRPO)."
    )
    norm_adv_by_std: bool = doc_field(
        True, "Divide group-centred rewards by the group std (GRPO/DAPO); false = Dr.GRPO."
    )
    dynamic_sampling: bool = doc_field(
        True, "Drop groups whose filter_metric is identical across all responses, and regenerate until full."
    )
    filter_metric: Literal["acc", "score", "reward"] = doc_field(
        "acc", "Per-response value compared within a group for dynamic sampling (reward = after shaping)."
    )
    max_num_gen_batches: int = doc_field(
        10, "Give up (error with counts) after this many generation rounds per step; 0 = unlimited."
    )
    overlong_buffer_enable: bool = doc_field(
        True, "Soft overlong punishment over the last overlong_buffer_len tokens."
    )
    overlong_buffer_len: int = doc_field(
        4096, "Length of the soft-punishment buffer at the end of max_response_length."
    )
    overlong_buffer_penalty_factor: float = doc_field(
        1.0, "Penalty at the hard limit (linear ramp over the buffer)."
    )
    overlong_filter: bool = doc_field(False, "Mask the loss of truncated responses (overlong filtering).")
    kl_coef: float = doc_field(
        0.0,
        "beta: KL penalty coefficient against the reference model (the frozen initial policy, built "
        "only when > 0); 0 = no KL (DAPO). Where the penalty goes: use_kl_loss.",
    )
    kl_type: KLType = doc_field(
        "low_var_kl",
        "KL estimator (low_var_kl = clamped k3, as in GRPO), for the KL loss and the KL in the reward.",
    )
    use_kl_loss: bool = doc_field(
        False,
        "With kl_coef > 0: true = add kl_coef * KL_t to the loss, aggregated like the policy loss (GRPO); "
        "false = KL in the reward (verl use_kl_in_reward): each response's reward becomes "
        "reward - kl_coef * sum_t KL_t over its response tokens before the group advantages "
        "(metric actor/kl_in_reward).",
    )
    entropy_coef: float = doc_field(0.0, "Entropy bonus coefficient (>= 0); 0 = off.")
    tis_cap: float | None = doc_field(
        None,
        "Truncated importance sampling cap for the rollout/trainer log-prob mismatch "
        "(weight min(exp(old - rollout), cap)); null = off.",
    )
    token_weighting: TokenWeighting = doc_field(
        "none",
        "Per-token loss weights: none, or entropy_top_rho (train only on the top token_weighting_rho "
        "fraction of valid tokens of each micro-batch by entropy; the token-mean count still counts "
        "all valid tokens, see algo/token_weighting.py).",
    )
    token_weighting_rho: float = doc_field(0.2, "rho of entropy_top_rho, in (0, 1] (Wang et al. 2025: 0.2).")
    policy_loss: PolicyLossMode = doc_field(
        "dapo",
        "Policy loss on the shared clipped surrogate: dapo; clip_cov (no gradient on a random "
        "clip_cov_ratio of the tokens whose log-prob/advantage covariance is in [clip_cov_lower, "
        "clip_cov_upper]); kl_cov (+ kl_cov_coef * |log r| on the top kl_cov_ratio by covariance).",
    )
    clip_cov_ratio: float = doc_field(2e-4, "clip_cov: fraction of valid tokens detached, in [0, 1].")
    clip_cov_lower: float = doc_field(1.0, "clip_cov: lower covariance bound of the eligible tokens.")
    clip_cov_upper: float = doc_field(5.0, "clip_cov: upper covariance bound of the eligible tokens.")
    kl_cov_ratio: float = doc_field(2e-3, "kl_cov: fraction of valid tokens penalised, in [0, 1].")
    kl_cov_coef: float = doc_field(1.0, "kl_cov: coefficient of the |log-ratio| penalty (>= 0).")
    adaptive_clip_high: bool = doc_field(
        False,
        "Entropy-targeted Clip-Higher: after each step move clip_ratio_high by adaptive_clip_gain per "
        "nat the step's mean token entropy lies outside [adaptive_clip_entropy_low, "
        "adaptive_clip_entropy_high] (up when below, down when above), clamped to [adaptive_clip_min, "
        "adaptive_clip_max]; starts at clip_ratio_high (algo/adaptive_clip.py). Logged as "
        "algorithm/clip_ratio_high; its value is in the checkpoint.",
    )
    adaptive_clip_entropy_low: float = doc_field(
        0.3, "adaptive_clip_high: lower end of the entropy band (nats, >= 0)."
    )
    adaptive_clip_entropy_high: float = doc_field(
        1.0, "adaptive_clip_high: upper end of the entropy band (nats, >= adaptive_clip_entropy_low)."
    )
    adaptive_clip_gain: float = doc_field(
        0.05, "adaptive_clip_high: change of clip_ratio_high per nat outside the band (>= 0)."
    )
    adaptive_clip_min: float = doc_field(0.2, "adaptive_clip_high: lower bound of clip_ratio_high (>= 0).")
    adaptive_clip_max: float = doc_field(
        0.5, "adaptive_clip_high: upper bound of clip_ratio_high (>= adaptive_clip_min)."
    )
    prompt_skipping: bool = doc_field(
        False,
        "History-based prompt skipping (GRESO): a prompt whose last z groups in a row had no contrast in "
        "filter_metric (all right or all wrong: zero advantage) is generated with probability "
        "prompt_skipping_explore_prob ** z, else skipped and the next prompt drawn, so each generation "
        "round still has gen_batch_size prompts (algo/prompt_skipping.py). The history is in the "
        "checkpoint. Metric: rollout/responses_per_kept_group.",
    )
    prompt_skipping_explore_prob: float = doc_field(
        0.5, "prompt_skipping: keep probability per zero-advantage epoch in a row, in (0, 1]."
    )

    @property
    def kl_in_reward(self) -> bool:
        """The KL penalty goes into the reward (``kl_coef > 0`` and not ``use_kl_loss``)."""
        return self.kl_coef > 0 and not self.use_kl_loss

    def validate(self) -> None:
        self._require(0 < self.token_weighting_rho <= 1, "token_weighting_rho", "in (0, 1]")
        self._require(0 <= self.clip_cov_ratio <= 1, "clip_cov_ratio", "in [0, 1]")
        self._require(self.clip_cov_lower <= self.clip_cov_upper, "clip_cov_lower", "<= clip_cov_upper")
        self._require(0 <= self.kl_cov_ratio <= 1, "kl_cov_ratio", "in [0, 1]")
        self._require(self.kl_cov_coef >= 0, "kl_cov_coef", ">= 0")
        self._require(0 <= self.clip_ratio_low < 1, "clip_ratio_low", "in [0, 1)")
        self._require(self.clip_ratio_high >= 0, "clip_ratio_high", ">= 0")
        self._require(self.clip_ratio_c is None or self.clip_ratio_c > 1, "clip_ratio_c", "null or > 1")
        self._require(self.max_num_gen_batches >= 0, "max_num_gen_batches", ">= 0")
        self._require(self.overlong_buffer_len >= 0, "overlong_buffer_len", ">= 0")
        self._require(self.overlong_buffer_penalty_factor >= 0, "overlong_buffer_penalty_factor", ">= 0")
        if self.overlong_buffer_enable:
            self._require(
                self.overlong_buffer_len >= 1, "overlong_buffer_len", ">= 1 when overlong_buffer_enable"
            )
        self._require(self.kl_coef >= 0, "kl_coef", ">= 0")
        self._require(self.entropy_coef >= 0, "entropy_coef", ">= 0")
        self._require(self.tis_cap is None or self.tis_cap > 0, "tis_cap", "null or > 0")
        self._require(self.adaptive_clip_entropy_low >= 0, "adaptive_clip_entropy_low", ">= 0")
        self._require(
            self.adaptive_clip_entropy_high >= self.adaptive_clip_entropy_low,
            "adaptive_clip_entropy_high",
            f">= adaptive_clip_entropy_low={self.adaptive_clip_entropy_low}",
        )
        self._require(self.adaptive_clip_gain >= 0, "adaptive_clip_gain", ">= 0")
        self._require(self.adaptive_clip_min >= 0, "adaptive_clip_min", ">= 0")
        self._require(
            self.adaptive_clip_max >= self.adaptive_clip_min,
            "adaptive_clip_max",
            f">= adaptive_clip_min={self.adaptive_clip_min}",
        )
        if self.adaptive_clip_high:
            self._require(
                self.adaptive_clip_min <= self.clip_ratio_high <= self.adaptive_clip_max,
                "clip_ratio_high",
                f"in [adaptive_clip_min={self.adaptive_clip_min}, adaptive_clip_max={self.adaptive_clip_max}] "
                "when adaptive_clip_high (its starting value)",
            )
        self._require(0 < self.prompt_skipping_explore_prob <= 1, "prompt_skipping_explore_prob", "in (0, 1]")
