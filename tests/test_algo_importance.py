"""truncated_importance_weights and logprob_mismatch_metrics by hand."""

import math

import pytest
import torch

from dapo_megatron.algo import logprob_mismatch_metrics, policy_loss, truncated_importance_weights


def test_truncated_weights_by_hand():
    old = torch.tensor([[0.0, math.log(3.0), math.log(0.5), 5.0]], requires_grad=True)
    rollout = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    w = truncated_importance_weights(old, rollout, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.5, 0.0]]))
    assert not w.requires_grad


def test_weights_survive_garbage_in_masked_slots():
    old = torch.tensor([[0.0, float("nan"), 100.0]])
    w = truncated_importance_weights(old, torch.zeros(1, 3), torch.tensor([[1, 0, 1]]), cap=3.0)
    assert w.tolist() == [[1.0, 0.0, 3.0]]


def test_weights_plug_into_policy_loss():
    old = torch.tensor([[0.0, math.log(3.0)]])
    w = truncated_importance_weights(old, torch.zeros(1, 2), torch.ones(1, 2), cap=2.0)
    loss, _ = policy_loss(old.clone(), old, torch.ones(1, 2), torch.ones(1, 2), token_weights=w)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -2.0]]))


def test_mismatch_metrics_by_hand():
    trainer = torch.tensor([[0.0, -1.0, -2.0, 7.0]])
    rollout = torch.tensor([[0.05, -1.2, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    m = logprob_mismatch_metrics(trainer, rollout, mask)
    assert m["abs_diff_mean"].item() == pytest.approx((0.05 + 0.2 + 0.0) / 3)
    assert m["abs_diff_max"].item() == pytest.approx(0.2)
    assert m["frac_above_threshold"].item() == pytest.approx(1 / 3)
    assert logprob_mismatch_metrics(trainer, rollout, mask, threshold=0.01)[
        "frac_above_threshold"
    ].item() == (pytest.approx(2 / 3))


def test_bad_input():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(x, x, x, cap=0.0)
    with pytest.raises(ValueError, match="rollout_log_prob"):
        truncated_importance_weights(x, torch.zeros(2, 2), x, cap=2.0)
    with pytest.raises(ValueError, match="response_mask"):
        logprob_mismatch_metrics(x, x, torch.ones(1, 3))
    with pytest.raises(ValueError, match="threshold"):
        logprob_mismatch_metrics(x, x, x, threshold=-1.0)
