"""Algorithm presets: instances of the one algorithm config, the registry, validation."""

import dataclasses

import pytest

from dapo_megatron import config
from dapo_megatron.algo import ALGORITHM_PRESETS, AlgorithmConfig, get_preset


def test_registry_names_and_key_values():
    assert set(ALGORITHM_PRESETS) == {"dapo", "grpo", "dr_grpo"}
    dapo, grpo, dr = get_preset("dapo"), get_preset("grpo"), get_preset("dr_grpo")
    assert (dapo.clip_ratio_low, dapo.clip_ratio_high, dapo.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert dapo.dynamic_sampling and dapo.overlong_buffer_enable and dapo.kl_coef == 0.0
    assert (grpo.clip_ratio_high, grpo.loss_agg_mode, grpo.use_kl_loss) == (0.2, "seq-mean-token-mean", True)
    assert not grpo.dynamic_sampling
    assert (dr.loss_agg_mode, dr.norm_adv_by_std, dr.kl_coef) == ("seq-mean-token-sum-norm", False, 0.0)
    assert all(type(preset) is AlgorithmConfig for preset in ALGORITHM_PRESETS.values())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"ppo.*\['dapo', 'dr_grpo', 'grpo'\]"):
        get_preset("ppo")


def test_presets_are_frozen_and_read_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("dapo").clip_ratio_high = 0.3
    with pytest.raises(TypeError):
        ALGORITHM_PRESETS["mine"] = get_preset("dapo")


@pytest.mark.parametrize(
    "override,name",
    [
        ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
        ({"loss_agg_mode": "sum"}, "loss_agg_mode"),
        ({"kl_type": "k9"}, "kl_type"),
        ({"overlong_buffer_len": 0}, "overlong_buffer_len"),
        ({"clip_ratio_low": 1.0}, "clip_ratio_low"),
        ({"tis_cap": 0.0}, "tis_cap"),
    ],
)
def test_replace_revalidates(override, name):
    with pytest.raises(ValueError, match=name):
        dataclasses.replace(get_preset("dapo"), **override)
    assert dataclasses.replace(get_preset("dapo"), clip_ratio_high=0.3).clip_ratio_high == 0.3


@pytest.mark.parametrize("name", ["dapo", "grpo", "dr_grpo"])
def test_presets_resolve_to_the_config_section(name):
    # The trainer config's algorithm section under --preset NAME is the preset instance itself.
    assert config.load_config(None, preset=name, require_inputs=False).algorithm == get_preset(name)
