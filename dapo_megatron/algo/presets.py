"""Named algorithm presets: GRPO, DAPO and Dr.GRPO as settings of the same pieces.

==============================  =============  ======================  =========================
knob                            ``grpo``       ``dapo``                ``dr_grpo``
==============================  =============  ======================  =========================
clip_ratio_low / high           0.2 / 0.2      0.2 / 0.28              0.2 / 0.2
loss_agg_mode                   seq-mean-      token-mean              seq-mean-token-sum-norm
                                token-mean
norm_adv_by_std                 yes            yes                     no
dynamic_sampling                no             yes (acc, 10 batches)   no
overlong buffer (len, factor)   off            4096, 1.0               off
KL                              loss,          off                     off
                                low_var_kl,
                                0.001
==============================  =============  ======================  =========================

Sources: DAPO (Yu et al. 2025, arXiv:2503.14476, and its verl recipe: max response 20480 with a
4096-token buffer, ``max_num_gen_batches=10``); Dr.GRPO (Liu et al. 2025, arXiv:2503.20783: no std
normalisation, a constant length normaliser, no KL); GRPO as in verl's GRPO examples (DeepSeekMath
used ``beta = 0.04``; verl's examples use 0.001 with ``low_var_kl``).

Field names and meanings are those of the ``algorithm`` section of :mod:`dapo_megatron.config`, so
``dataclasses.asdict(preset)`` minus ``name`` is a valid override of that section. Derive variants
with ``dataclasses.replace(get_preset("dapo"), clip_ratio_high=0.3)`` (re-validated).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from dapo_megatron.algo.aggregation import LOSS_AGG_MODES
from dapo_megatron.algo.kl import KL_ESTIMATORS


@dataclass(frozen=True)
class AlgorithmPreset:
    """The algorithm knobs of one RL recipe; defaults are DAPO's. Validated on construction."""

    name: str
    """Preset name, for logs."""
    clip_ratio_low: float = 0.2
    """``eps_low``: lower clip ``1 - eps_low`` of the ratio, in ``[0, 1)``."""
    clip_ratio_high: float = 0.28
    """``eps_high``: upper clip ``1 + eps_high`` (DAPO "clip-higher"), ``>= 0``."""
    clip_ratio_c: float | None = None
    """Dual-clip bound (``> 1``), or ``None`` for no dual clip."""
    loss_agg_mode: str = "token-mean"
    """One of :data:`~dapo_megatron.algo.aggregation.LOSS_AGG_MODES`."""
    norm_adv_by_std: bool = True
    """Divide group-relative advantages by the group std (``group_advantages(norm_by_std=)``)."""
    dynamic_sampling: bool = True
    """Keep only groups whose ``filter_metric`` varies, over-sampling to a full batch."""
    filter_metric: str = "acc"
    """Per-sample value the dynamic sampler filters on (``acc``, ``score``, ``reward``)."""
    max_num_gen_batches: int = 10
    """Generation batches allowed per training step under dynamic sampling; 0 = unlimited."""
    overlong_buffer_enable: bool = True
    """Add the soft overlong penalty to the reward."""
    overlong_buffer_len: int = 4096
    """Tokens before the length limit over which the penalty ramps from 0 to its maximum."""
    overlong_buffer_penalty_factor: float = 1.0
    """Penalty at the length limit, ``>= 0``."""
    overlong_filter: bool = False
    """Drop truncated responses from the loss."""
    kl_coef: float = 0.0
    """KL coefficient against the reference policy, ``>= 0``; 0 = no KL."""
    kl_type: str = "low_var_kl"
    """Estimator, a key of :data:`~dapo_megatron.algo.kl.KL_ESTIMATORS`."""
    use_kl_loss: bool = False
    """``True``: KL term in the loss; ``False``: subtracted from the token rewards."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss), ``>= 0``."""
    tis_cap: float | None = None
    """Truncated-importance-sampling cap (``> 0``) for the rollout / trainer mismatch, or ``None``."""

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.clip_ratio_low < 1.0, "clip_ratio_low", "in [0, 1)"),
            (self.clip_ratio_high >= 0.0, "clip_ratio_high", ">= 0"),
            (self.clip_ratio_c is None or self.clip_ratio_c > 1.0, "clip_ratio_c", "None or > 1"),
            (self.loss_agg_mode in LOSS_AGG_MODES, "loss_agg_mode", f"one of {list(LOSS_AGG_MODES)}"),
            (self.max_num_gen_batches >= 0, "max_num_gen_batches", ">= 0"),
            (
                not self.overlong_buffer_enable or self.overlong_buffer_len > 0,
                "overlong_buffer_len",
                "> 0 when overlong_buffer_enable",
            ),
            (self.overlong_buffer_penalty_factor >= 0, "overlong_buffer_penalty_factor", ">= 0"),
            (self.kl_type in KL_ESTIMATORS, "kl_type", f"one of {sorted(KL_ESTIMATORS)}"),
            (self.kl_coef >= 0, "kl_coef", ">= 0"),
            (self.entropy_coef >= 0, "entropy_coef", ">= 0"),
            (self.tis_cap is None or self.tis_cap > 0, "tis_cap", "None or > 0"),
        ]
        for ok, field_name, expected in checks:
            if not ok:
                raise ValueError(f"{field_name} must be {expected}, got {getattr(self, field_name)!r}")


ALGORITHM_PRESETS: MappingProxyType[str, AlgorithmPreset] = MappingProxyType(
    {
        "dapo": AlgorithmPreset(name="dapo"),
        "grpo": AlgorithmPreset(
            name="grpo",
            clip_ratio_high=0.2,
            loss_agg_mode="seq-mean-token-mean",
            dynamic_sampling=False,
            overlong_buffer_enable=False,
            kl_coef=0.001,
            kl_type="low_var_kl",
            use_kl_loss=True,
        ),
        "dr_grpo": AlgorithmPreset(
            name="dr_grpo",
            clip_ratio_high=0.2,
            loss_agg_mode="seq-mean-token-sum-norm",
            norm_adv_by_std=False,
            dynamic_sampling=False,
            overlong_buffer_enable=False,
        ),
    }
)
"""Preset name -> frozen :class:`AlgorithmPreset` (read-only mapping)."""


def get_preset(name: str) -> AlgorithmPreset:
    """The preset called ``name``; ``ValueError`` naming the valid names otherwise."""
    try:
        return ALGORITHM_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm preset {name!r}; valid names: {sorted(ALGORITHM_PRESETS)}"
        ) from None
