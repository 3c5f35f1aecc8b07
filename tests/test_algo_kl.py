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
