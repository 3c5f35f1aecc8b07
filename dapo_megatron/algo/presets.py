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

Presets are instances of :class:`~dapo_megatron.algo.config.AlgorithmConfig` (the ``algorithm``
section of the trainer config); derive variants with
``dataclasses.replace(get_preset("dapo"), clip_ratio_high=0.3)`` (re-validated).
"""

from __future__ import annotations

from types import MappingProxyType

from dapo_megatron.algo.config import AlgorithmConfig

__all__ = ["ALGORITHM_PRESETS", "get_preset"]

ALGORITHM_PRESETS: MappingProxyType[str, AlgorithmConfig] = MappingProxyType(
    {
        "dapo": AlgorithmConfig(),
        "grpo": AlgorithmConfig(
            clip_ratio_high=0.2,
            loss_agg_mode="seq-mean-token-mean",
            dynamic_sampling=False,
            overlong_buffer_enable=False,
            kl_coef=0.001,
            kl_type="low_var_kl",
            use_kl_loss=True,
        ),
        "dr_grpo": AlgorithmConfig(
            clip_ratio_high=0.2,
            loss_agg_mode="seq-mean-token-sum-norm",
            norm_adv_by_std=False,
            dynamic_sampling=False,
            overlong_buffer_enable=False,
        ),
    }
)
"""Preset name -> frozen :class:`AlgorithmConfig` (read-only mapping)."""


def get_preset(name: str) -> AlgorithmConfig:
    """The preset called ``name``; ``ValueError`` naming the valid names otherwise."""
    try:
        return ALGORITHM_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm preset {name!r}; valid names: {sorted(ALGORITHM_PRESETS)}"
        ) from None
