"""Hypothesis property tests of the loss invariants."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dapo_megatron.algo import (
    LOSS_AGG_MODES,
    aggregate_loss,
    group_advantages,
    loss_sum_and_count,
    policy_loss,
    select_informative_groups,
)

FAST = settings(max_examples=60, deadline=None)
finite = st.floats(-10.0, 10.0, allow_nan=False, width=64)
shapes = st.tuples(st.integers(1, 5), st.integers(1, 7))
clip_kwargs = st.fixed_dictionaries(
    {
        "clip_ratio_low": st.floats(0.0, 0.9),
        "clip_ratio_high": st.floats(0.0, 5.0),
        "clip_ratio_c": st.none() | st.floats(1.01, 10.0),
    }
)


@st.composite
def batches(draw):
    shape = draw(shapes)
    floats = [torch.from_numpy(draw(hnp.arrays(np.float64, shape, elements=finite))) for _ in range(3)]
    mask = torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
    return (*floats, mask)


@FAST
@given(batches(), clip_kwargs)
def test_zero_advantage_gives_zero_loss(batch, kwargs):
    log_prob, old, _, mask = batch
    loss, _ = policy_loss(log_prob, old, torch.zeros_like(log_prob), mask, **kwargs)
    assert loss.eq(0).all()


@FAST
@given(batches(), clip_kwargs)
def test_ratio_one_gives_minus_advantage_on_valid_tokens(batch, kwargs):
    log_prob, _, adv, mask = batch
    loss, metrics = policy_loss(log_prob, log_prob.clone(), adv, mask, **kwargs)
    torch.testing.assert_close(loss, torch.where(mask, -adv, torch.zeros_like(adv)), rtol=0, atol=0)
    assert metrics["clipfrac"].item() == 0.0 and metrics["clipfrac_dual"].item() == 0.0


@FAST
@given(batches(), batches(), clip_kwargs, st.sampled_from(LOSS_AGG_MODES))
def test_masked_tokens_contribute_nothing(batch, other, kwargs, mode):
    """Values at masked positions change neither the loss, its aggregate, nor the gradient."""
    log_prob, old, adv, mask = batch
    if other[0].shape != log_prob.shape:
        other = tuple(torch.zeros_like(t) for t in (log_prob, old, adv))
    scrambled = [torch.where(mask, t, o) for t, o in zip((log_prob, old, adv), other[:3])]

    def run(lp, o, a):
        lp = lp.clone().requires_grad_(True)
        loss, _ = policy_loss(lp, o, a, mask, **kwargs)
        total = aggregate_loss(loss, mask, mode)
        total.backward()
        return loss, total, lp.grad

    loss, total, grad = run(log_prob, old, adv)
    loss2, total2, grad2 = run(*scrambled)
    assert loss[~mask].eq(0).all() and grad[~mask].eq(0).all()
    torch.testing.assert_close(loss, loss2, rtol=0, atol=0)
    torch.testing.assert_close(total, total2, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad2, rtol=0, atol=0)


@FAST
@given(batches(), st.sampled_from(LOSS_AGG_MODES))
def test_aggregate_is_sum_over_count(batch, mode):
    per_token, _, weights, mask = batch
    s, c = loss_sum_and_count(per_token, mask, weights.abs(), mode=mode)
    torch.testing.assert_close(
        aggregate_loss(per_token, mask, mode, token_weights=weights.abs()), s / max(c, 1)
    )


@FAST
@given(st.lists(st.tuples(st.integers(0, 4), finite), min_size=1, max_size=20))
def test_group_advantages_are_centred_and_filter_agrees_with_brute_force(pairs):
    ids = [g for g, _ in pairs]
    scores = torch.tensor([s for _, s in pairs], dtype=torch.float64)
    adv = group_advantages(scores, ids, norm_by_std=False)
    keep = select_informative_groups(ids, scores)
    for g in set(ids):
        members = [i for i, gid in enumerate(ids) if gid == g]
        assert abs(adv[members].sum().item()) < 1e-9
        spread = scores[members].max() - scores[members].min()
        assert all(keep[i].item() == (spread.item() > 1e-6) for i in members)
