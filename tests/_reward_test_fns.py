"""Reward functions used by tests/test_reward.py; imported by name in spawned reward workers."""

from __future__ import annotations

import os
import time


def exact(response: str, ground_truth: str) -> dict:
    """1.0 if the response equals the ground truth, else -1.0."""
    ok = response.strip() == ground_truth.strip()
    return {"score": 1.0 if ok else -1.0, "acc": ok, "pred": response.strip()}


def length_score(response: str, ground_truth: str, scale: float = 1.0) -> float:
    """A bare float: len(response) * scale."""
    return len(response) * scale


def misbehave(response: str, ground_truth: str) -> dict:
    """Hangs on "hang", raises on "raise", kills its process on "die", else acts like exact()."""
    if response == "hang":
        time.sleep(3600)
    if response == "raise":
        raise RuntimeError("boom")
    if response == "die":
        os._exit(3)
    if response == "garbage":
        return {"no_score": 1}
    return exact(response, ground_truth)


NOT_CALLABLE = 3


def always_right(response: str, ground_truth: str) -> dict:
    """Every response is correct: no group ever has signal (dynamic sampling must give up)."""
    return {"score": 1.0, "acc": True, "pred": response.strip()}


def always_raise(response: str, ground_truth: str) -> dict:
    """A broken reward function: raises on every response."""
    raise KeyError(f"no parser for {ground_truth!r}")


def length_parity(response: str, ground_truth: str) -> dict:
    """1.0 when the response text has an even number of characters: informative groups from a
    random policy (the tiny MoE trainer test), deterministic in the text."""
    ok = len(response) % 2 == 0
    return {"score": 1.0 if ok else 0.0, "acc": ok, "pred": response}
