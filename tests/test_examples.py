"""The example launch configs load, validate and fit their intended cluster layout."""

from pathlib import Path

import pytest

from dapo_megatron.config import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "name, world",
    [("qwen2.5_7b_dapo.yaml", 8), ("qwen2.5_32b_dapo.yaml", 128), ("qwen3_30b_a3b_dapo.yaml", 32)],
)
def test_example_configs(name, world):
    cfg = load_config(EXAMPLES / name, require_inputs=False)
    dp = cfg.validate_world(world)
    assert dp >= 1
    a = cfg.algorithm
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert a.dynamic_sampling and a.overlong_buffer_enable and a.overlong_buffer_len == 4096
    assert cfg.rollout.max_response_length == 20480 and cfg.rollout.n == 16
    assert cfg.optimizer.lr == 1e-6 and cfg.optimizer.lr_warmup_steps == 20
