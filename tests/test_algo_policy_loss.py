"""policy_loss: every clip branch by hand, metrics, gradients, bad input."""

import math

import pytest
import torch

from dapo_megatron.algo import aggregate_loss, policy_loss

LOW, HIGH, C = 0.2, 0.28, 3.0

# (advantage, ratio, expected loss without dual clip, expected loss with dual clip c=3, branch)
CASES = [
    (1.0, 1.1, -1.1, -1.1, "inside the range: unclipped"),
    (1.0, 1.5, -1.28, -1.28, "A>0, r>1+high: upper clip"),
    (1.0, 0.5, -0.5, -0.5, "A>0, r<1-low: min(r, clip) keeps the unclipped r"),
    (-1.0, 0.5, 0.8, 0.8, "A<0, r<1-low: lower clip"),
    (-1.0, 1.5, 1.5, 1.5, "A<0, r>1+high: unclipped (pessimistic)"),
    (-1.0, 4.0, 4.0, 3.0, "A<0, r>c: dual clip"),
    (-2.0, 2.0, 4.0, 4.0, "A<0, 1+high<r<c: dual clip inactive"),
    (0.0, 1.7, 0.0, 0.0, "A=0"),
]


def _inputs(cases):
    adv = torch.tensor([[c[0] for c in cases]], dtype=torch.float64)
    log_prob = torch.log(torch.tensor([[c[1] for c in cases]], dtype=torch.float64))
    return log_prob, torch.zeros_like(log_prob), adv, torch.ones_like(adv, dtype=torch.bool)


@pytest.mark.parametrize("dual", [False, True])
def test_each_branch_by_hand(dual):
    log_prob, old, adv, mask = _inputs(CASES)
    loss, _ = policy_loss(
        log_prob, old, adv, mask, clip_ratio_low=LOW, clip_ratio_high=HIGH, clip_ratio_c=C if dual else None
    )
    expected = torch.tensor([[c[3] if dual else c[2] for c in CASES]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


def test_metrics_by_hand():
    log_prob, old, adv, mask = _inputs(CASES)
    # An extra masked token with an absurd ratio must not move any metric.
    log_prob = torch.cat([log_prob, torch.tensor([[50.0]], dtype=torch.float64)], dim=1)
    old = torch.cat([old, torch.zeros(1, 1, dtype=torch.float64)], dim=1)
    adv = torch.cat([adv, torch.tensor([[-5.0]], dtype=torch.float64)], dim=1)
    mask = torch.cat([mask, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
    _, m = policy_loss(log_prob, old, adv, mask, clip_ratio_low=LOW, clip_ratio_high=HIGH, clip_ratio_c=C)
    n = len(CASES)
    ratios = [c[1] for c in CASES]
    assert m["clipfrac_high"].item() == pytest.approx(1 / n)  # case 2
    assert m["clipfrac_low"].item() == pytest.approx(1 / n)  # case 4
    assert m["clipfrac"].item() == pytest.approx(2 / n)
    assert m["clipfrac_dual"].item() == pytest.approx(1 / n)  # case 6
    assert m["ratio_mean"].item() == pytest.approx(sum(ratios) / n)
    assert m["ratio_max"].item() == pytest.approx(4.0)
    assert m["approx_kl"].item() == pytest.approx(-sum(math.log(r) for r in ratios) / n)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_dual_clip_metric_zero_when_off():
    log_prob, old, adv, mask = _inputs(CASES)
    _, m = policy_loss(log_prob, old, adv, mask)
    assert m["clipfrac_dual"].item() == 0.0


def test_gradient_zero_exactly_on_clipped_and_dual_clipped_tokens():
    log_prob, old, adv, mask = _inputs(CASES)
    log_prob.requires_grad_(True)
    loss, _ = policy_loss(log_prob, old, adv, mask, clip_ratio_low=LOW, clip_ratio_high=HIGH, clip_ratio_c=C)
    loss.sum().backward()
    # d(-A r)/d log r = -A r on unclipped tokens, 0 where a clip is active.
    expected = [-a * r if branch in (0, 2, 4, 6, 7) else 0.0 for branch, (a, r, *_) in enumerate(CASES)]
    torch.testing.assert_close(
        log_prob.grad, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_old_log_prob_and_advantages_are_detached():
    log_prob, old, adv, mask = _inputs(CASES[:2])
    old.requires_grad_(True)
    adv.requires_grad_(True)
    log_prob.requires_grad_(True)
    loss, _ = policy_loss(log_prob, old, adv, mask)
    loss.sum().backward()
    assert old.grad is None and adv.grad is None and log_prob.grad is not None


def test_log_ratio_clamped_before_exp():
    log_prob = torch.tensor([[100.0, -100.0]])
    adv = torch.tensor([[-1.0, 1.0]])
    loss, m = policy_loss(log_prob, torch.zeros_like(log_prob), adv, torch.ones_like(adv))
    assert torch.isfinite(loss).all()
    assert loss[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-6)
    assert m["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-6)


def test_masked_positions_are_zero_in_value_and_gradient_even_with_nan():
    log_prob = torch.tensor([[0.1, float("nan")], [-0.2, float("inf")]], requires_grad=True)
    old = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    adv = torch.tensor([[1.0, float("nan")], [-1.0, 2.0]])
    mask = torch.tensor([[True, False], [True, False]])
    weights = torch.tensor([[1.0, float("nan")], [1.0, 1.0]])
    loss, m = policy_loss(log_prob, old, adv, mask, token_weights=weights, clip_ratio_c=3.0)
    assert loss[:, 1].eq(0).all()
    aggregate_loss(loss, mask).backward()
    assert torch.isfinite(log_prob.grad).all() and log_prob.grad[:, 1].eq(0).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_token_weights_multiply_per_token():
    log_prob, old, adv, mask = _inputs(CASES)
    weights = torch.linspace(0.5, 2.0, len(CASES), dtype=torch.float64).unsqueeze(0)
    plain, m_plain = policy_loss(log_prob, old, adv, mask, clip_ratio_c=C)
    weighted, m_weighted = policy_loss(log_prob, old, adv, mask, clip_ratio_c=C, token_weights=weights)
    torch.testing.assert_close(weighted, plain * weights)
    assert m_plain == m_weighted  # weights do not enter the metrics


def test_half_precision_input_computes_in_fp32():
    log_prob = torch.tensor([[0.1, -0.3]], dtype=torch.bfloat16)
    loss, m = policy_loss(log_prob, torch.zeros_like(log_prob), torch.ones_like(log_prob), torch.ones(1, 2))
    assert loss.dtype == torch.float32 and m["ratio_mean"].dtype == torch.float32


def test_empty_mask_gives_zero_loss_and_finite_metrics():
    log_prob = torch.randn(2, 3)
    loss, m = policy_loss(log_prob, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert loss.eq(0).all()
    assert all(v.item() == 0.0 for v in m.values())


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"old_log_prob": torch.zeros(2, 4)}, "old_log_prob"),
        ({"advantages": torch.zeros(2)}, "advantages"),
        ({"response_mask": torch.ones(3, 3)}, "response_mask"),
        ({"token_weights": torch.ones(2, 2)}, "token_weights"),
        ({"log_prob": torch.zeros(6)}, "log_prob"),
    ],
)
def test_shape_mismatch_names_the_argument(kwargs, name):
    args = {
        "log_prob": torch.zeros(2, 3),
        "old_log_prob": torch.zeros(2, 3),
        "advantages": torch.zeros(2, 3),
        "response_mask": torch.ones(2, 3),
    }
    token_weights = kwargs.pop("token_weights", None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        policy_loss(**args, token_weights=token_weights)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
        ({"clip_ratio_c": 0.5}, "clip_ratio_c"),
        ({"clip_ratio_low": 1.0}, "clip_ratio_low"),
        ({"clip_ratio_low": -0.1}, "clip_ratio_low"),
        ({"clip_ratio_high": -0.1}, "clip_ratio_high"),
    ],
)
def test_bad_clip_values_name_the_argument(kwargs, name):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=name):
        policy_loss(x, x, x, torch.ones(1, 2), **kwargs)
