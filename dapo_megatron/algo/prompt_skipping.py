"""History-based prompt skipping (after GRESO, Zheng et al. 2025): fewer wasted generations."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch


def update_prompt_history(
    history: Mapping[Hashable, int], prompt_ids: Sequence[Hashable], zero_advantage: Sequence[bool]
) -> dict[Hashable, int]:
    """New history of zero-advantage streaks: ``z_p`` = how many of prompt ``p``'s most recent
    rollouts in a row gave a group with zero advantage (all right or all wrong)::

        z_p' = z_p + 1  if p's group this time had zero advantage, else 0

    Pure: returns a new dict; prompts not in ``prompt_ids`` keep their streak.
    """
    if len(prompt_ids) != len(zero_advantage):
        raise ValueError(
            f"zero_advantage has {len(zero_advantage)} entries but prompt_ids has {len(prompt_ids)}"
        )
    new = dict(history)
    for pid, zero in zip(prompt_ids, zero_advantage):
        new[pid] = new.get(pid, 0) + 1 if bool(zero) else 0
    return new


def prompt_keep_probability(streak: int, explore_prob: float) -> float:
    """``P(keep) = explore_prob ** z``: a prompt never seen to be uninformative (``z = 0``) is always
    generated; each further zero-advantage epoch in a row multiplies its chance by ``explore_prob``."""
    if not 0.0 <= explore_prob <= 1.0:
        raise ValueError(f"explore_prob must be in [0, 1], got {explore_prob}")
    if streak < 0:
        raise ValueError(f"streak must be >= 0, got {streak}")
    return explore_prob**streak


def select_prompts(
    prompt_ids: Sequence[Hashable],
    history: Mapping[Hashable, int],
    explore_prob: float,
    generator: torch.Generator | None = None,
) -> list[bool]:
    """Keep flags for ``prompt_ids`` (length ``P``): prompt ``i`` is kept iff ``u_i < explore_prob ** z_i``
    with ``u_i ~ U[0, 1)`` drawn from ``generator`` (one draw per prompt, in order, so a fixed seed
    gives a fixed choice and resume stays exact)."""
    probs = torch.tensor(
        [prompt_keep_probability(history.get(pid, 0), explore_prob) for pid in prompt_ids], dtype=torch.float64
    )
    draws = torch.rand(len(prompt_ids), generator=generator, dtype=torch.float64)
    return [bool(k) for k in (draws < probs)]
