"""kl_penalty estimators by hand."""

import math

import pytest
import torch

from dapo_megatron.algo import KL_ESTIMATORS, kl_penalty

X = math.log(2.0)  # log pi - log pi_ref


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("k1", X),
        ("abs", X),
        ("k2", 0.5 * X * X),
        ("mse", 0.5 * X * X),
        ("k3", 0.5 - 1.0 + X),  # exp(-x) - 1 + x
        ("low_var_kl", 0.5 - 1.0 + X),
    ],
)
def test_estimators_by_hand(kind, expected):
    log_prob = torch.tensor([[X, -X]], dtype=torch.float64)
    got = kl_penalty(log_prob, torch.zeros_like(log_prob), kind)
    assert got[0, 0].item() == pytest.approx(expected)
    mirrored = {"k1": -X, "abs": X, "k2": 0.5 * X * X, "mse": 0.5 * X * X}.get(kind, 2.0 - 1.0 - X)
    assert got[0, 1].item() == pytest.approx(mirrored)


def test_k3_clamps():
    got = kl_penalty(torch.tensor([[-30.0, 30.0]]), torch.zeros(1, 2), "low_var_kl")
    assert got[0, 0].item() == 10.0  # -x = 30 -> 20: exp(20) - 21, clamped to 10
    assert got[0, 1].item() == 10.0  # -x = -30 -> -20: exp(-20) + 19, clamped to 10


def test_gradient_through_log_prob_only_and_mask():
    log_prob = torch.tensor([[0.3, float("nan")]], requires_grad=True)
    ref = torch.tensor([[0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, False]])
    kl = kl_penalty(log_prob, ref, "k3", response_mask=mask)
    assert kl[0, 1].item() == 0.0
    kl.sum().backward()
    assert ref.grad is None
    assert log_prob.grad[0, 1].item() == 0.0
    assert log_prob.grad[0, 0].item() == pytest.approx(1.0 - math.exp(-0.2), rel=1e-5)  # d/dx (e^-x - 1 + x)


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k4")
    with pytest.raises(ValueError, match="ref_log_prob"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 3))
    assert set(KL_ESTIMATORS) >= {"k1", "k2", "k3", "low_var_kl"}


def test_sequence_kl_sums_and_kl_shaped_advantages_by_hand():
    """KL in the reward: KL_i = sum over the response of k3, then the group advantage of
    reward_i - beta * KL_i, against values worked out with ``math``."""
    from dapo_megatron.algo import group_advantages, sequence_kl_sums

    log_prob = torch.tensor(
        [
            [0.0, X, X, 0.0],  # two response tokens at x = log 2: k3 = exp(-x) - 1 + x = X - 1/2 each
            [0.0, -X, 0.0, 0.0],  # one at x = -log 2: k3 = 2 - 1 - X
            [0.0, 5.0, 5.0, 0.0],  # masked out entirely: 0 whatever the log-probs
            [0.0, X, 0.0, 0.0],  # equal to the reference: 0
        ]
    )
    ref = torch.zeros(4, 4)
    ref[3, 1] = X
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    kl = sequence_kl_sums(log_prob, ref, mask, "low_var_kl")
    expected_kl = [2 * X - 1, 1 - X, 0.0, 0.0]
    assert kl.dtype == torch.float64
    assert kl.tolist() == pytest.approx(expected_kl, abs=1e-7)
    assert sequence_kl_sums(log_prob, ref, mask, "k1").tolist() == pytest.approx(
        [2 * X, -X, 0.0, 0.0], abs=1e-7
    )

    beta, rewards = 0.5, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    shaped = [r - beta * k for r, k in zip(rewards.tolist(), expected_kl)]  # 1.5 - X, X/2 - 1/2, 1, 1
    g = shaped[:3]  # group 0 = rows 0..2; row 3 is a group of one (advantage 0)
    mean = sum(g) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in g) / 2)
    groups = torch.tensor([0, 0, 0, 1])
    grpo = group_advantages(rewards - beta * kl, groups, norm_by_std=True)
    dr_grpo = group_advantages(rewards - beta * kl, groups, norm_by_std=False)
    assert grpo.tolist() == pytest.approx([(v - mean) / (std + 1e-6) for v in g] + [0.0], abs=1e-6)
    assert dr_grpo.tolist() == pytest.approx([v - mean for v in g] + [0.0], abs=1e-7)
    # without the KL the first and third responses tie (both reward 1): the KL separates them
    assert group_advantages(rewards, groups)[0] == group_advantages(rewards, groups)[2]
    assert grpo[0] < grpo[2]

    with pytest.raises(ValueError, match="response_mask"):
        sequence_kl_sums(log_prob, ref, mask[:, :3], "k3")
    with pytest.raises(ValueError, match="kind"):
        sequence_kl_sums(log_prob, ref, mask, "k4")
