"""Rollout at cluster scale (issue 14): engines per replica, sharded prompts, dynamic sampling
across engines, the tensor data plane, and the typed batch.

The reference is the single-engine path written independently in
``tests/_rollout_scale_ranks.reference_batches`` (one HF engine for every prompt, the algo
``DynamicSampler``, a padded global batch). Engines are deterministic (per-sample seeds), so each
rank's received sequences must equal the reference rows that the data-parallel split assigns to it.
"""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.parallel.data import assign_data_parallel
from dapo_megatron.parallel.layout import EnginePlacement, shard_bounds
from dapo_megatron.policy.batch import RolloutBatch
from dapo_megatron.utils.report import Report
from tests._rollout_scale_ranks import collect_with_failing_engine, reference_batches, sharded_collect
from tests.helpers.distributed import run_on_ranks

LOGPROB_TOL = 1e-5  # fp32: the same engine on a different batch composition (padding, batch size)
MINI = 2 * 8  # trainer.ppo_mini_batch_size * rollout.n of the demo config used here
STEPS = 2


# ------------------------------------------------------------------------------------ pure parts


def test_assign_data_parallel_even_balanced_complete():
    lengths = [100, 1, 90, 2, 80, 3, 70, 4] * 2  # i % dp would give rank 0 all the long ones
    out = assign_data_parallel(lengths, mini_batch_size=8, dp=2)
    assert sorted(out[0] + out[1]) == list(range(16))
    for k in range(2):  # every mini-batch split evenly, shares balanced within one longest sequence
        shares = [o[4 * k : 4 * k + 4] for o in out]
        assert all(set(s) <= set(range(8 * k, 8 * k + 8)) for s in shares)
        tokens = [sum(lengths[i] for i in s) for s in shares]
        assert abs(tokens[0] - tokens[1]) <= 20, tokens
    stripes = [sum(lengths[i] for i in range(d, 8, 2)) for d in range(2)]
    assert abs(stripes[0] - stripes[1]) == 330  # the naive split, for comparison
    assert assign_data_parallel(lengths, mini_batch_size=8, dp=1) == [list(range(16))]
    with pytest.raises(ValueError, match="mini_batch_size=6"):
        assign_data_parallel(lengths, mini_batch_size=6, dp=2)
    with pytest.raises(ValueError, match="data-parallel size 3"):
        assign_data_parallel(lengths, mini_batch_size=8, dp=3)


def test_placement_and_shards():
    p = EnginePlacement(world_size=8, ranks_per_engine=2)
    assert p.num_engines == 4 and p.leaders == [0, 2, 4, 6] and p.engine_of(5) == 2 and not p.is_leader(5)
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size=3"):
        EnginePlacement(world_size=8, ranks_per_engine=3)
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_rollout_batch_fields_and_errors():
    ids = torch.zeros(3, 5, dtype=torch.long)
    b = RolloutBatch(ids, torch.tensor([5, 2, 3]), torch.ones(3, 5), torch.zeros(3, 5))
    assert "old_log_probs" not in b and b.select([1, 2]).input_ids.shape == (2, 3)
    b["old_log_probs"] = torch.zeros(3, 5)
    assert "old_log_probs" in b
    with pytest.raises(KeyError, match="rollout_logprobs"):
        b["rollout_logprobs"] = torch.zeros(3, 5)  # the one spelling is rollout_log_probs
    with pytest.raises(ValueError, match="rollout_logprobs"):
        RolloutBatch.from_tensors({**b.tensors(), "rollout_logprobs": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="advantages must be"):
        RolloutBatch(ids, torch.tensor([5, 2, 3]), torch.ones(3, 5), torch.zeros(3, 4))


def test_report_divides_once():
    a, b = Report(), Report()
    a.add("acc", 3.0, 4)  # mean 0.75 over 4
    b.add("acc", 1.0, 12)  # mean 1/12 over 12
    a.max("len_max", 5)
    b.max("len_max", 9)
    v = a.merge(b).values()
    assert v["acc"] == 4.0 / 16 and v["len_max"] == 9  # not (0.75 + 0.083) / 2


# ------------------------------------------------------------------------------- distributed


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from dapo_megatron.demo.model import make_demo_model
    from dapo_megatron.demo.task import write_demo_dataset

    root = tmp_path_factory.mktemp("scale_demo")
    make_demo_model(root / "model", seed=0, steps=150)
    write_demo_dataset(root / "data", num_train=128, num_val=16, seed=0, formats=("jsonl",))
    return root


@pytest.fixture(scope="module")
def reference(demo_root):
    return reference_batches(demo_root, STEPS)


@pytest.fixture(scope="module")
def dp2(demo_root):
    """2 ranks, TP1 -> DP2: two HF engines (one per replica)."""
    return run_on_ranks(sharded_collect, 2, str(demo_root), 1, [], STEPS, timeout=600)


def _check_against_reference(results, reference, dp, num_engines):
    rounds = [r for _, rs in reference for r in rs]
    leaders = [r for r in results if r["prompts"] is not None]
    assert len(leaders) == num_engines
    for k, prompts in enumerate(rounds):  # every prompt exactly once; engine e takes share e
        got = [p for lead in leaders for p in lead["prompts"][k]]
        assert got == prompts, f"round {k}: the engines' prompts are not the round's prompts, each once"
        for e, (a, b) in enumerate(shard_bounds(len(prompts), num_engines)):
            assert leaders[e]["prompts"][k] == prompts[a:b]
    for step, (ref, _) in enumerate(reference):
        ref = RolloutBatch.from_tensors(ref)
        split = assign_data_parallel(ref.seq_lengths.tolist(), mini_batch_size=MINI, dp=dp)
        for r in results:
            got = r["steps"][step]["batch"]
            want = ref.select(split[r["dp_rank"]]).tensors()
            assert sorted(got) == sorted(want)
            for key in ("input_ids", "seq_lengths", "response_mask", "advantages"):
                assert torch.equal(got[key], want[key]), f"step {step + 1} {key}"
            diff = (got["rollout_log_probs"] - want["rollout_log_probs"]).abs().max().item()
            assert diff <= LOGPROB_TOL, diff
            m = r["steps"][step]["metrics"]
            assert m["rollout/num_engines"] == num_engines
            assert m["dynamic_sampling/num_groups_kept"] >= 4


@pytest.mark.distributed
def test_dp2_two_engines_match_single_engine(dp2, reference):
    _check_against_reference(dp2, reference, dp=2, num_engines=2)
    m = dp2[0]["steps"][0]["metrics"]
    lo, hi = m["rollout/engine_generated_tokens_min"], m["rollout/engine_generated_tokens_max"]
    assert 0 < lo <= hi and m["rollout/generated_tokens"] >= lo + hi - 1e-9


@pytest.mark.distributed
def test_tp2_dp2_two_engines_match_single_engine(demo_root, reference):
    """4 ranks, TP2 x DP2: two engines on ranks 0 and 2; both TP ranks of a replica get its rows."""
    results = run_on_ranks(sharded_collect, 4, str(demo_root), 2, [], STEPS, timeout=600)
    _check_against_reference(results, reference, dp=2, num_engines=2)


@pytest.mark.distributed
def test_batch_bytes_per_rank_halves_from_dp1_to_dp2(demo_root, dp2):
    """The same batch (same seeds) at DP1 (TP2, one engine) and DP2 (two engines): the most bytes
    any rank receives roughly halves."""
    dp1 = run_on_ranks(sharded_collect, 2, str(demo_root), 2, [], 1, timeout=600)
    one, two = dp1[0]["steps"][0], dp2[0]["steps"][0]
    assert torch.equal(
        torch.sort(one["batch"]["seq_lengths"]).values,
        torch.sort(torch.cat([r["steps"][0]["batch"]["seq_lengths"] for r in dp2])).values,
    )
    ratio = two["metrics"]["rollout/batch_bytes_per_rank"] / one["metrics"]["rollout/batch_bytes_per_rank"]
    print(f"\nbatch bytes per rank DP2 / DP1 = {ratio:.3f}")
    assert 0.45 <= ratio <= 0.6, ratio


@pytest.mark.distributed
def test_exhaustion_over_two_engines_reports_global_counts(demo_root):
    from dapo_megatron.parallel.launch import RankError

    overrides = ["reward.reward_fn=tests._reward_test_fns:always_right", "algorithm.max_num_gen_batches=2"]
    with pytest.raises(RankError) as info:
        run_on_ranks(sharded_collect, 2, str(demo_root), 1, overrides, 1, timeout=600)
    msg = info.value.summary
    assert "dynamic sampling exhausted over 2 engine(s)" in msg, msg
    # global counts: 2 rounds x 8 prompts over both engines, all solved, none kept
    assert "kept only 0 of the 4" in msg and "16 groups generated, 16 all solved" in msg, msg


@pytest.mark.distributed
def test_dead_engine_is_named(demo_root):
    """The failing engine's rank raises its error; the other rank raises one naming that engine
    and rank at the same point (not a hang in its next collective). The vLLM version, with a real
    SIGKILLed engine process, is tests/test_engine_death.py."""
    own, other = run_on_ranks(collect_with_failing_engine, 2, str(demo_root), 1, timeout=300)[::-1]
    assert own.startswith("rollout engine 1 (of 2) on rank 1 failed in generate"), own
    assert "engine core process died" in own, own
    assert other.startswith("rollout engine 1 (of 2) on rank 1 failed in generate"), other
    assert "rank 0 stops too" in other and "engine core process died" not in other, other
