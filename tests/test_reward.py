"""DAPO math reward (hand-checked cases) and the reward worker pool (timeouts, crashes)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from dapo_megatron.rewards.math import TAIL_CHARS, compute_score, extract_answer, last_boxed, normalize_answer
from dapo_megatron.rewards.pool import RewardPool, RewardStats, load_reward_fn, normalize_reward_output

# Spawned reward workers inherit sys.path, so they can import the helper module by name.
sys.path.insert(0, str(Path(__file__).parent))
import _reward_test_fns  # noqa: E402


@pytest.mark.parametrize(
    "response, ground_truth, expected_pred, correct",
    [
        ("3 + 4 = 7.\nAnswer: 7", "7", "7", True),
        ("Answer: 8", "7", "8", False),
        ("ANSWER:7", "7", "7", True),  # case-insensitive, no space
        ("answer: 6\nWait, recheck.\nAnswer: 7\nDone.", "7", "7", True),  # last Answer: wins
        ("Answer: 7\nActually, Answer: 6", "7", "6", False),
        ("Answer: $\\boxed{1,000}$.", "1000", "1000", True),
        ("Answer: 12 dollars", "12", "12", True),
        ("Answer: x = 12", "12", "12", True),
        ("Answer: 90^\\circ", "90", "90", True),
        ("Answer: 3.0", "3", "3", True),
        ("Answer: \\dfrac12", "\\frac{1}{2}", "\\frac{1}{2}", True),
        ("Answer: \\text{(B)}", "(B)", "(B)", True),
        ("The result is \\boxed{42}.", "42", "42", True),  # no Answer: line -> last boxed
        ("I think it is 7", "7", "", False),  # nothing to extract
        ("Answer: ", "7", "", False),
    ],
)
def test_strict_rule(response, ground_truth, expected_pred, correct):
    out = compute_score(response, ground_truth)
    assert out == {"score": 1.0 if correct else -1.0, "acc": correct, "pred": expected_pred}


@pytest.mark.parametrize(
    "pred, ground_truth",
    [("0.5", "\\frac{1}{2}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\frac{6}{4}", "\\frac{3}{2}"), ("1/2", "0.5")],
)
def test_math_verify_fallback(pred, ground_truth):
    assert normalize_answer(pred) != normalize_answer(ground_truth)  # the strict rule alone would fail
    out = compute_score(f"Reasoning...\nAnswer: {pred}", ground_truth)
    assert out["acc"] is True and out["score"] == 1.0


def test_math_verify_does_not_accept_wrong_answers():
    assert compute_score("Answer: 0.6", "\\frac{1}{2}")["acc"] is False
    assert compute_score("Answer: \\sqrt{7}", "\\sqrt{8}")["acc"] is False


def test_only_tail_is_read():
    filler = "x" * TAIL_CHARS
    assert compute_score("Answer: 7\n" + filler, "7")["acc"] is False  # the answer left the tail
    assert compute_score(filler + "\nAnswer: 7", "7")["acc"] is True
    # an "Answer:" cut in half by the tail boundary is not an answer
    text = "Answer: 7" + "y" * (TAIL_CHARS - 5)
    assert extract_answer(text) is None


def test_helpers():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("no box") is None
    assert normalize_answer(" $12,345$ ") == "12345"
    assert normalize_answer("\\text{5 feet}") == "5"
    assert normalize_answer("1,2") == "1,2"  # a list, not a thousands separator
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"


def test_normalize_reward_output():
    assert normalize_reward_output(0.5) == {"score": 0.5, "acc": True, "pred": ""}
    assert normalize_reward_output({"score": -1, "extra": 3}) == {
        "score": -1.0,
        "acc": False,
        "pred": "",
        "extra": 3,
    }
    with pytest.raises(ValueError, match="without 'score'"):
        normalize_reward_output({"acc": True})
    with pytest.raises(ValueError, match="got str"):
        normalize_reward_output("1.0")


def test_load_reward_fn_errors():
    assert load_reward_fn("dapo_megatron.rewards.math:compute_score") is compute_score
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        load_reward_fn("dapo_megatron.rewards.math.compute_score")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        load_reward_fn("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward_fn("dapo_megatron.rewards.math:nope")
    with pytest.raises(ValueError, match="is not callable"):
        load_reward_fn("_reward_test_fns:NOT_CALLABLE")
    with pytest.raises(ValueError, match="module-level function"):
        RewardPool(lambda r, g: 1.0, num_workers=0)


def test_inline_pool_and_kwargs():
    with RewardPool(_reward_test_fns.length_score, num_workers=0) as pool:
        results, stats = pool.compute(
            ["ab", "abcd"], ["", ""], extra_kwargs=[{"scale": 1.0}, {"scale": -0.5}]
        )
    assert [r["score"] for r in results] == [2.0, -2.0]
    assert [r["acc"] for r in results] == [True, False]
    assert stats.num_calls == 2 and stats.num_errors == 0


def test_default_pool_matches_direct_calls():
    responses = ["Answer: 7", "Answer: 0.5", "Answer: 3", "no answer"]
    truths = ["7", "\\frac{1}{2}", "4", "1"]
    with RewardPool(num_workers=2, timeout_s=20.0) as pool:
        results, stats = pool.compute(responses, truths)
    assert results == [compute_score(r, g) for r, g in zip(responses, truths)]
    assert [r["score"] for r in results] == [1.0, 1.0, -1.0, -1.0]
    assert stats == RewardStats(num_calls=4, elapsed_s=stats.elapsed_s)


def test_pool_survives_hangs_errors_and_crashes():
    timeout = 1.0
    with RewardPool("_reward_test_fns:misbehave", num_workers=2, timeout_s=timeout) as pool:
        responses = ["7", "hang", "raise", "die", "garbage", "8", "hang", "7"]
        start = time.monotonic()
        results, stats = pool.compute(responses, ["7"] * len(responses))
        elapsed = time.monotonic() - start
        # two hangs on two workers run side by side: about one timeout, plus restart slack
        assert elapsed < timeout + 4.0, elapsed
        assert [r["score"] for r in results] == [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0]
        assert all(r["acc"] is False for i, r in enumerate(results) if i not in (0, 7))
        assert (stats.num_timeouts, stats.num_errors, stats.num_worker_restarts) == (2, 3, 3)
        assert stats.as_metrics()["reward/num_timeouts"] == 2.0
        # the pool still works afterwards, with fresh counts
        results, stats = pool.compute(["7", "8"], ["7", "7"])
        assert [r["acc"] for r in results] == [True, False]
        assert (stats.num_timeouts, stats.num_errors, stats.num_worker_restarts) == (0, 0, 0)
        procs = [w.proc for w in pool._workers]
    assert all(p.poll() is not None for p in procs)  # close() reaped every worker
    with pytest.raises(RuntimeError, match="after close"):
        pool.compute(["7"], ["7"])


def test_pool_from_config():
    from dapo_megatron.config import RewardConfig

    cfg = RewardConfig(reward_fn="_reward_test_fns:exact", num_workers=0, failure_score=-2.0)
    with RewardPool.from_config(cfg) as pool:
        results, stats = pool.compute(["a", "b"], ["a", "a"], extra_kwargs=[{}, {"unexpected": 1}])
    assert [r["score"] for r in results] == [1.0, -2.0]  # the TypeError counts as an error
    assert stats.num_errors == 1


def test_pool_rejects_mismatched_lengths():
    with (
        RewardPool(_reward_test_fns.exact, num_workers=0) as pool,
        pytest.raises(ValueError, match="2 responses but 1"),
    ):
        pool.compute(["a", "b"], ["a"])
