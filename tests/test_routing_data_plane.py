"""The rollout data plane with MoE expert ids (single process: the leader's send to itself).

Each row's ``[prompt + response, layers, top_k]`` ids must arrive at its row of
``RolloutBatch.routed_experts``, aligned with ``input_ids``; padding holds the distinct experts
``0..top_k-1``; a row whose ids do not match its length is refused with both shapes named. The
2-rank transfer is covered end to end by ``tests/test_moe_trainer.py`` (replayed ids that were
misaligned would move the old log-probs away from the engine's).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dapo_megatron.parallel.layout import EnginePlacement
from dapo_megatron.trainer.rollout import Row, deliver_rows

LAYERS, TOP_K = 3, 2


def _rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, r in lengths:
        experts = torch.stack([torch.randperm(8, generator=g)[:TOP_K] for _ in range((p + r) * LAYERS)])
        rows.append(
            Row(
                prompt_ids=torch.randint(3, 50, (p,), generator=g).tolist(),
                response_ids=torch.randint(3, 50, (r,), generator=g).tolist(),
                rollout_log_probs=[-0.5] * r,
                advantage=1.0,
                in_loss=True,
                reward=float(len(rows)),
                routed_experts=experts.view(p + r, LAYERS, TOP_K),
            )
        )
    return rows


def _deliver(rows, routing_shape=(LAYERS, TOP_K), **kwargs):
    groups = SimpleNamespace(dp_size=1, dp_rank=0, replica_ranks=((0,),))
    return deliver_rows(
        rows,
        [[len(rows) // 2]],
        n=2,
        mini_batch_size=len(rows),
        placement=EnginePlacement(1, 1),
        groups=groups,
        routing_shape=routing_shape,
        **kwargs,
    )


def test_routed_experts_arrive_aligned_with_tokens():
    rows = _rows([(5, 3), (2, 7), (4, 1), (3, 3)])
    batch, stats = _deliver(rows)
    assert batch.routed_experts.dtype == torch.long
    assert batch.routed_experts.shape == (4, 9, LAYERS, TOP_K)
    for i, row in enumerate(rows):
        n = len(row.prompt_ids) + len(row.response_ids)
        assert batch.input_ids[i, :n].tolist() == row.prompt_ids + row.response_ids
        assert torch.equal(batch.routed_experts[i, :n], row.routed_experts)
        assert (batch.routed_experts[i, n:] == torch.arange(TOP_K)).all()
    # int16 on the wire: tokens x 8 B + values x 4 B + tokens x layers x top_k x 2 B
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    values = sum(2 + len(r.response_ids) for r in rows)
    assert stats["rollout/batch_bytes_per_rank"] == tokens * 8 + values * 4 + tokens * LAYERS * TOP_K * 2
    plain, _ = _deliver(rows, routing_shape=None)
    assert plain.routed_experts is None and torch.equal(plain.input_ids, batch.input_ids)
    # beside the rewards of KL in the reward (the other optional tensor of the same exchange)
    both, _ = _deliver(rows, with_rewards=True)
    assert torch.equal(both.routed_experts, batch.routed_experts)
    assert both.sequence_rewards.tolist() == [r.reward for r in rows]


def test_routed_experts_of_the_wrong_shape_are_refused():
    rows = _rows([(5, 3), (2, 7)])
    rows[1].routed_experts = rows[1].routed_experts[:-1]
    with pytest.raises(ValueError, match=r"prompt \+ response = 9.*got \(8, 3, 2\)"):
        _deliver(rows)
