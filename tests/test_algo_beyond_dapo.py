"""The four beyond-DAPO functions (issue 18) against hand-computed values."""

import math

import pytest
import torch

from dapo_megatron.algo.adaptive_clip import adaptive_clip_high
from dapo_megatron.algo.cov_loss import clip_cov_mask, cov_policy_loss, kl_cov_mask, token_covariance
from dapo_megatron.algo.policy_loss import policy_loss
from dapo_megatron.algo.prompt_skipping import prompt_keep_probability, select_prompts, update_prompt_history
from dapo_megatron.algo.token_weighting import entropy_top_rho_weights


def test_entropy_top_rho_hand_computed():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 9.0], [0.7, 0.2, 0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 7 valid; 9.0 is padding and must lose
    # k = ceil(0.3 * 7) = 3 -> 0.9, 0.7, 0.5
    w = entropy_top_rho_weights(entropy, mask, 0.3)
    assert w.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    # rho = 1 keeps every valid token and nothing else
    assert entropy_top_rho_weights(entropy, mask, 1.0).tolist() == mask.float().tolist()
    # ties broken by position
    assert entropy_top_rho_weights(torch.ones(1, 4), torch.ones(1, 4), 0.5).tolist() == [[1, 1, 0, 0]]
    assert entropy_top_rho_weights(entropy, torch.zeros(2, 4), 0.2).sum() == 0
    with pytest.raises(ValueError, match="rho"):
        entropy_top_rho_weights(entropy, mask, 0.0)
    with pytest.raises(ValueError, match="response_mask"):
        entropy_top_rho_weights(entropy, mask[:, :3], 0.2)


def test_entropy_weights_keep_the_valid_token_denominator():
    # loss_sum = sum m w l over selected tokens; count = all valid tokens (the aggregation contract)
    from dapo_megatron.algo.aggregation import loss_sum_and_count

    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    w = entropy_top_rho_weights(torch.tensor([[0.0, 5.0, 1.0, 0.5]]), mask, 0.5)  # tokens 1, 2
    s, n = loss_sum_and_count(per_token, mask, w, mode="token-mean")
    assert float(s) == 5.0 and float(n) == 4.0


def test_token_covariance_hand_computed():
    lp = torch.tensor([[-1.0, -3.0, 7.0]])
    adv = torch.tensor([[2.0, 0.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    # means over valid: lp -2, adv 1 -> cov = (1*1, -1*-1, 0)
    assert token_covariance(lp, adv, mask).tolist() == [[1.0, 1.0, 0.0]]


def test_kl_cov_and_clip_cov_selection():
    cov = torch.tensor([[0.5, 3.0, 6.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1]])
    assert kl_cov_mask(cov, mask, kl_ratio=0.5).tolist() == [[False, True, True, False]]
    # band [1, 5] has tokens 1 and 3; ratio 1.0 -> ceil(4) but only 2 qualify
    assert clip_cov_mask(cov, mask, clip_ratio=1.0, cov_lower=1.0, cov_upper=5.0).tolist() == [
        [False, True, False, True]
    ]
    g = torch.Generator().manual_seed(0)
    one = clip_cov_mask(cov, mask, clip_ratio=0.25, cov_lower=1.0, cov_upper=5.0, generator=g)
    assert one.sum() == 1 and bool(one[0, 1] | one[0, 3])
    with pytest.raises(ValueError, match="bounds"):
        clip_cov_mask(cov, mask, clip_ratio=0.1, cov_lower=2.0, cov_upper=1.0)


def test_cov_policy_loss_modes_against_the_shared_core():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.0, -0.5, -1.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    mask = torch.ones(1, 4)
    base, _ = policy_loss(lp, old, adv, mask)
    dapo, _ = cov_policy_loss(lp, old, adv, mask, mode="dapo")
    assert torch.equal(dapo, base)
    cov = token_covariance(lp, adv, mask)
    # kl_cov with ratio 0.25: the single largest-cov token gets + coef * |lp - old|
    top = int(cov.argmax())
    kl, m = cov_policy_loss(lp, old, adv, mask, mode="kl_cov", kl_cov_ratio=0.25, kl_cov_coef=2.0)
    expected = base.detach().clone()
    expected[0, top] += 2.0 * abs(float(lp.detach()[0, top] - old[0, top]))
    torch.testing.assert_close(kl.detach(), expected, rtol=0, atol=1e-7)
    assert float(m["cov_selected_frac"]) == 0.25
    # clip_cov with a band catching everything and ratio 1: every token loses its gradient
    cc, _ = cov_policy_loss(lp, old, adv, mask, mode="clip_cov", clip_cov_ratio=1.0,
                            clip_cov_lower=-math.inf, clip_cov_upper=math.inf)
    assert cc.abs().sum() == 0
    cc.sum().backward()
    assert lp.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="policy_loss mode"):
        cov_policy_loss(lp, old, adv, mask, mode="ppo2")


def test_adaptive_clip_high_hand_computed():
    kw = dict(target_low=0.3, target_high=0.6, gain=0.5, min_value=0.2, max_value=0.4)
    assert adaptive_clip_high(0.28, 0.1, **kw) == pytest.approx(0.28 + 0.5 * 0.2)  # 0.38
    assert adaptive_clip_high(0.35, 0.7, **kw) == pytest.approx(0.35 - 0.5 * 0.1)  # 0.30
    assert adaptive_clip_high(0.28, 0.8, **kw) == pytest.approx(0.2)  # 0.18 clamped to min_value
    assert adaptive_clip_high(0.28, 0.45, **kw) == 0.28
    assert adaptive_clip_high(0.39, 0.0, **kw) == 0.4
    with pytest.raises(ValueError, match="target_low"):
        adaptive_clip_high(0.28, 0.1, target_low=0.7, target_high=0.6, gain=0.5)
    with pytest.raises(ValueError, match="entropy"):
        adaptive_clip_high(0.28, float("nan"), **kw)


def test_prompt_skipping_history_and_selection():
    h = update_prompt_history({}, ["a", "b", "c"], [True, False, True])
    h = update_prompt_history(h, ["a", "c"], [True, False])
    assert h == {"a": 2, "b": 0, "c": 0}
    assert prompt_keep_probability(0, 0.1) == 1.0
    assert prompt_keep_probability(2, 0.5) == 0.25
    # explore_prob 0: any prompt with a streak is skipped, the others kept
    assert select_prompts(["a", "b", "c", "new"], h, 0.0) == [False, True, True, True]
    # fixed generator: the same draws as torch.rand with that seed
    draws = torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = select_prompts(["a", "b", "c", "new"], h, 0.5, generator=torch.Generator().manual_seed(3))
    assert got == [bool(draws[0] < 0.25), True, True, True]
    with pytest.raises(ValueError, match="zero_advantage"):
        update_prompt_history({}, ["a"], [True, False])
