"""A reward function that raises is not swallowed (issue 20): first traceback once, the count
logged, and a call where every response raised stops with the exception named."""

from __future__ import annotations

import logging

import pytest

from dapo_megatron.rewards.pool import RewardFunctionError, RewardPool


def _tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dapo_megatron.rewards.pool"]


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in-process", "worker"])
def test_first_traceback_once_and_errors_counted(num_workers, caplog):
    caplog.set_level(logging.ERROR, logger="dapo_megatron.rewards.pool")
    with RewardPool("tests._reward_test_fns:misbehave", num_workers=num_workers, timeout_s=30) as pool:
        results, stats = pool.compute(["7", "raise", "raise"], ["7"] * 3)
        assert [r["score"] for r in results] == [1.0, -1.0, -1.0]
        assert stats.num_errors == 2 and stats.as_metrics()["reward/num_errors"] == 2.0
        shown = _tracebacks(caplog)
        assert len(shown) == 1, shown
        # the whole traceback, down to the line of the reward function that raised
        assert "Traceback (most recent call last)" in shown[0] and "RuntimeError: boom" in shown[0]
        assert 'raise RuntimeError("boom")' in shown[0]
        _, stats = pool.compute(["raise", "7"], ["7"] * 2)
        assert stats.num_errors == 1 and len(_tracebacks(caplog)) == 1  # counted, not shown again


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in-process", "worker"])
def test_all_responses_raising_stops_naming_the_exception(num_workers):
    with RewardPool("tests._reward_test_fns:always_raise", num_workers=num_workers, timeout_s=30) as pool:
        with pytest.raises(RewardFunctionError, match=r"all 3 responses.*KeyError: \"no parser for '12'\""):
            pool.compute(["a", "b", "c"], ["12"] * 3)
    with RewardPool("tests._reward_test_fns:misbehave", num_workers=num_workers, timeout_s=30) as pool:
        with pytest.raises(RewardFunctionError, match="garbage|without 'score'"):
            pool.compute(["garbage", "raise"], ["7", "7"])
        results, _ = pool.compute([], [])  # an empty call is not "all failed"
        assert results == []
