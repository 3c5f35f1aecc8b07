"""Packing and the zigzag CP split, checked against hand-computed layouts (no torch.distributed)."""

import pytest
import torch

from dapo_megatron.algo.config import AlgorithmConfig
from dapo_megatron.config import DapoConfig, ParallelConfig
from dapo_megatron.models.context_parallel import zigzag_positions
from dapo_megatron.parallel.layout import ParallelLayout
from dapo_megatron.parallel.packing import (
    balanced_bins,
    pack_micro_batch,
    plan_micro_batches,
    unpack_token_values,
)
from dapo_megatron.policy.loss import LossSettings


def test_zigzag_positions_by_hand():
    # two sequences of padded lengths 8 and 4, CP2: 4 chunks each (2 and 1 tokens)
    assert zigzag_positions([0, 8, 12], 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert zigzag_positions([0, 8, 12], 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    assert zigzag_positions([0, 8, 12], 1, 0).tolist() == list(range(12))
    every = torch.cat([zigzag_positions([0, 16, 24], 4, r) for r in range(4)])
    assert sorted(every.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="multiple of 2 \\* context_parallel_size = 4"):
        zigzag_positions([0, 6], 2, 0)


def test_pad_multiple():
    assert ParallelLayout(tp=4).packed_sequence_multiple == 1
    assert ParallelLayout(tp=4, sp=True).packed_sequence_multiple == 4
    assert ParallelLayout(tp=4, sp=True, cp=2).packed_sequence_multiple == 16


def test_balanced_bins_respect_capacity_and_balance():
    sizes = [40, 3, 5, 5, 6, 3, 5, 20, 12, 1]
    bins = balanced_bins(sizes, 48)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in b) for b in bins]
    assert len(bins) == 3 and max(loads) <= 48  # 100 tokens need >= 3 bins of 48
    assert max(loads) - min(loads) <= 12
    with pytest.raises(ValueError, match="does not fit"):
        balanced_bins([49], 48)


def test_plan_equalises_micro_batches_across_dp_ranks():
    lengths = [3, 40, 5, 5, 5, 3, 6, 5]
    ranks = [[0, 2, 4, 6], [1, 3, 5, 7]]  # 19 vs 53 tokens
    plans = plan_micro_batches(lengths, ranks, max_tokens=48, micro_batch_size=4)
    assert [len(p) for p in plans] == [2, 2]  # rank 0 alone would need 1
    for plan, idx in zip(plans, ranks):
        assert sorted(i for b in plan for i in b) == idx
        assert all(b and sum(lengths[i] for i in b) <= 48 for b in plan)
    # CP2: the budget is per rank, the bin holds 2x; lengths padded to multiples of 4
    plans = plan_micro_batches(lengths, [list(range(8))], max_tokens=24, micro_batch_size=4, pad_multiple=4, cp=2)
    assert all(sum(-(-lengths[i] // 4) * 4 for i in b) <= 48 for b in plans[0])
    with pytest.raises(ValueError, match="parallel.max_tokens_per_micro_batch=16 is too small"):
        plan_micro_batches(lengths, ranks, max_tokens=16, micro_batch_size=4)
    # no budget: groups of micro_batch_size sequences, in order
    assert plan_micro_batches(lengths, ranks, max_tokens=None, micro_batch_size=3) == [[[0, 2, 4], [6]], [[1, 3, 5], [7]]]


def _batch():
    ids = torch.tensor([[11, 12, 13, 0, 0], [21, 22, 23, 24, 25], [31, 32, 0, 0, 0]])
    return {
        "input_ids": ids,
        "seq_lengths": torch.tensor([3, 5, 2]),
        "response_mask": (ids > 0).float(),
        "advantages": torch.arange(15.0).view(3, 5),
    }


def test_pack_micro_batch_by_hand():
    mb = pack_micro_batch(_batch(), [0, 2], pad_multiple=4)
    # sequence 0 padded 3 -> 4, sequence 2 padded 2 -> 4
    assert mb["input_ids"].tolist() == [[11, 12, 13, 0, 31, 32, 0, 0]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    # next token of the same sequence; never the first token of the next one
    assert mb["targets"].tolist() == [[12, 13, 0, 0, 32, 0, 0, 0]]
    width = 3
    assert mb["logprob_index"].tolist() == [1, 2, -1, -1, width + 1, -1, -1, -1]
    assert mb["packed"].cu_seqlens == (0, 3, 5) and mb["packed"].cu_seqlens_padded == (0, 4, 8)
    assert mb["advantages"].tolist() == [[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]
    values = torch.arange(8.0, requires_grad=True)
    out, computed = unpack_token_values(values, mb)
    assert out.tolist() == [[0.0, 0.0, 1.0], [0.0, 4.0, 0.0]]
    assert computed.tolist() == [[False, True, True], [False, True, False]]
    out.sum().backward()
    assert values.grad.tolist() == [1, 1, 0, 0, 1, 0, 0, 0]


def test_cp_ranks_together_compute_every_log_prob_once():
    batch = _batch()
    shares = [pack_micro_batch(batch, [0, 1, 2], pad_multiple=4, cp_size=2, cp_rank=r) for r in range(2)]
    assert [s["input_ids"].shape[1] for s in shares] == [8, 8]  # 4 + 8 + 4 padded tokens over 2 ranks
    computed = [unpack_token_values(torch.ones(8), s)[1] for s in shares]
    assert not (computed[0] & computed[1]).any()
    full = unpack_token_values(torch.ones(16), pack_micro_batch(batch, [0, 1, 2], pad_multiple=4))[1]
    assert torch.equal(computed[0] | computed[1], full)
    assert [float(s["sequence_stats_weight"]) for s in shares] == [1.0, 0.0]


def test_context_parallel_rejects_sequence_level_losses_by_name():
    LossSettings().check_context_parallel(2)  # token-mean: fine
    seq_mean = LossSettings(AlgorithmConfig(loss_agg_mode="seq-mean-token-mean"))
    with pytest.raises(ValueError, match="loss_agg_mode='seq-mean-token-mean'"):
        seq_mean.check_context_parallel(2)
    with pytest.raises(ValueError, match="token_weighting='entropy_top_rho'"):
        LossSettings(AlgorithmConfig(token_weighting="entropy_top_rho")).check_context_parallel(2)
    seq_mean.check_context_parallel(1)


def test_config_fields_validated():
    with pytest.raises(ValueError, match="context_parallel_size"):
        ParallelConfig(context_parallel_size=0).validate()
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        ParallelConfig(max_tokens_per_micro_batch=0).validate()
    cfg = DapoConfig()
    cfg.parallel.context_parallel_size = 2
    cfg.parallel.tensor_model_parallel_size = 2
    assert cfg.validate_world(8) == 2
    with pytest.raises(ValueError, match="context_parallel_size = 4"):
        cfg.validate_world(6)
    cfg.parallel.max_tokens_per_micro_batch = 100
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=100 cannot hold"):
        cfg.validate()
