"""aggregate_loss / loss_sum_and_count: each mode by hand, the (sum, count) contract, 200-vs-10."""

import pytest
import torch

from dapo_megatron.algo import LOSS_AGG_MODES, aggregate_loss, loss_sum_and_count, policy_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # row 2 fully masked (e.g. overlong-filtered)

# Valid entries: row0 = 1, 2; row1 = 4; row2 = none.
EXPECTED = {
    "token-mean": (7.0, 3, 7.0 / 3),  # (1+2+4) / 3 valid tokens
    "seq-mean-token-mean": (5.5, 2, 2.75),  # ((1+2)/2 + 4/1) / 2 non-empty rows
    "seq-mean-token-sum": (7.0, 2, 3.5),  # ((1+2) + 4) / 2 non-empty rows
    "seq-mean-token-sum-norm": (7.0, 9, 7.0 / 9),  # 7 / (B=3 * T=3)
}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_each_mode_by_hand(mode):
    loss_sum, count, value = EXPECTED[mode]
    s, c = loss_sum_and_count(LOSS, MASK, mode=mode)
    assert s.item() == pytest.approx(loss_sum) and c.item() == count and c.dtype == torch.int64
    assert aggregate_loss(LOSS, MASK, mode).item() == pytest.approx(value)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_token_weights_enter_the_sum_not_the_count(mode):
    weights = torch.tensor([[2.0, 0.5, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    s_plain, c_plain = loss_sum_and_count(LOSS, MASK, mode=mode)
    s_w, c_w = loss_sum_and_count(LOSS, MASK, weights, mode=mode)
    assert c_w == c_plain
    torch.testing.assert_close(s_w, loss_sum_and_count(LOSS * weights, MASK, mode=mode)[0])
    weighted = aggregate_loss(LOSS, MASK, mode, token_weights=weights)
    torch.testing.assert_close(weighted, s_w / c_w)
    if mode == "token-mean":
        assert weighted.item() == pytest.approx((1 * 2 + 2 * 0.5 + 4 * 3) / 3)  # divided by 3 tokens, not 5.5


def test_token_mean_with_weights_from_policy_loss_equals_sum_over_count():
    g = torch.Generator().manual_seed(0)
    log_prob, old, adv = (torch.randn(4, 7, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(4, 7, generator=g) > 0.3
    weights = torch.rand(4, 7, generator=g, dtype=torch.float64) * 2
    loss_w, _ = policy_loss(log_prob, old, adv, mask, token_weights=weights)
    loss, _ = policy_loss(log_prob, old, adv, mask)
    s, c = loss_sum_and_count(loss, mask, weights)
    torch.testing.assert_close(aggregate_loss(loss_w, mask), s / c)
    assert c.item() == mask.sum().item()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_global_normalisation_over_unequal_micro_batches(mode):
    """Summing (sum, count) over micro-batches / ranks reproduces the full-batch value."""
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(10, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4, 1, 3])
    mask = torch.arange(6) < lengths[:, None]
    splits = [(0, 1), (1, 5), (5, 10)]  # unequal rows and tokens per micro-batch
    parts = [loss_sum_and_count(loss[a:b], mask[a:b], mode=mode) for a, b in splits]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    torch.testing.assert_close(total, aggregate_loss(loss, mask, mode))


def test_global_normalisation_sum_norm_with_equal_width():
    loss, mask = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 4) > 0.5
    parts = [
        loss_sum_and_count(loss[a:b], mask[a:b], mode="seq-mean-token-sum-norm") for a, b in [(0, 2), (2, 6)]
    ]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    torch.testing.assert_close(total, aggregate_loss(loss, mask, "seq-mean-token-sum-norm"))


def test_long_and_short_response_weigh_per_token_equally_only_under_token_mean():
    """The seed's example: a 200-token and a 10-token response in one batch."""
    T = 200
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, :200] = True
    mask[1, :10] = True

    def token_grads(mode):
        per_token = torch.ones(2, T, dtype=torch.float64, requires_grad=True)
        aggregate_loss(per_token, mask, mode).backward()
        return per_token.grad

    grad = token_grads("token-mean")
    assert grad[0, :200].eq(1 / 210).all() and grad[1, :10].eq(1 / 210).all()  # equal per token
    grad = token_grads("seq-mean-token-mean")
    assert grad[0, :200].eq(1 / (2 * 200)).all() and grad[1, :10].eq(1 / (2 * 10)).all()
    assert grad[1, 0] / grad[0, 0] == pytest.approx(20.0)  # a short-response token weighs 20x more

    # The same through policy_loss, as the gradient on the log-probs (ratio 1, A = 1 everywhere).
    for mode, long_w, short_w in [("token-mean", 1 / 210, 1 / 210), ("seq-mean-token-mean", 1 / 400, 1 / 20)]:
        log_prob = torch.zeros(2, T, dtype=torch.float64, requires_grad=True)
        loss, _ = policy_loss(log_prob, torch.zeros(2, T, dtype=torch.float64), torch.ones(2, T), mask)
        aggregate_loss(loss, mask, mode).backward()
        assert log_prob.grad[0, 0].item() == pytest.approx(-long_w)
        assert log_prob.grad[1, 0].item() == pytest.approx(-short_w)
        assert log_prob.grad[1, 10:].eq(0).all()


def test_masked_nan_does_not_leak():
    loss = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    mask = torch.tensor([[True, False], [False, True]])
    for mode in LOSS_AGG_MODES:
        assert torch.isfinite(aggregate_loss(loss, mask, mode))


def test_empty_mask_gives_zero():
    for mode in LOSS_AGG_MODES:
        assert aggregate_loss(torch.ones(2, 3), torch.zeros(2, 3), mode).item() == 0.0


def test_half_precision_is_aggregated_in_fp32():
    assert aggregate_loss(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3)).dtype == torch.float32


def test_unknown_mode_names_the_argument():
    with pytest.raises(ValueError, match="mode"):
        aggregate_loss(LOSS, MASK, "token-sum")
    with pytest.raises(ValueError, match="mode"):
        loss_sum_and_count(LOSS, MASK, mode="seq-mean")


def test_shape_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="response_mask"):
        aggregate_loss(LOSS, MASK[:, :2])
    with pytest.raises(ValueError, match="token_weights"):
        loss_sum_and_count(LOSS, MASK, torch.ones(3))
    with pytest.raises(ValueError, match="per_token_loss"):
        aggregate_loss(LOSS.flatten(), MASK.flatten())
