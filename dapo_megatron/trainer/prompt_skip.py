"""History-based prompt skipping in the rollout collection (the math: algo/prompt_skipping.py).

Each generation round draws prompts from the data sampler one at a time and keeps prompt ``p``
with probability ``explore_prob ** z_p`` (``z_p``: how many of ``p``'s latest groups in a row had
no contrast in the filter metric, i.e. zero advantage, and so would be dropped by dynamic
sampling); a skipped prompt is replaced by the next one, so a round still generates
``gen_batch_size`` prompts. After generation the streaks of the generated prompts are updated.
The draws come from a generator seeded by ``(seed, generation round)`` and the history is part of
the trainer state, so a resumed run skips exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import torch

from dapo_megatron.algo.dynamic_sampling import select_informative_groups
from dapo_megatron.algo.prompt_skipping import select_prompts, update_prompt_history


class PromptSkipper:
    """Chooses each round's prompts and keeps the per-prompt zero-advantage streaks.

    Args:
        enabled: ``False`` passes the sampler's batches through unchanged (and keeps no history).
        explore_prob: keep probability per zero-advantage round in a row, in ``(0, 1]``.
        metric: the per-sample value whose spread within a group makes it informative
            (``algorithm.filter_metric``, as dynamic sampling uses).
    """

    def __init__(self, *, enabled: bool, explore_prob: float, metric: str) -> None:
        if not 0.0 < explore_prob <= 1.0:
            raise ValueError(f"algorithm.prompt_skipping_explore_prob must be in (0, 1], got {explore_prob}")
        self.enabled = enabled
        self.explore_prob = explore_prob
        self.metric = metric
        self.history: dict[int, int] = {}

    def choose(self, data_sampler, count: int, seed: int) -> tuple[list[int], int]:
        """``(indices, scanned)``: up to ``count`` kept prompt indices and how many were drawn.

        At most ``max(count, dataset size)`` prompts are drawn per round (one pass over the data);
        if none of them is kept, the last one drawn is generated anyway, so a round never is empty.
        """
        if not self.enabled:
            return data_sampler.next_batch(count), count
        generator = torch.Generator().manual_seed(seed)
        kept: list[int] = []
        scanned, index = 0, -1
        while len(kept) < count and scanned < max(count, data_sampler.num_items):
            (index,) = data_sampler.next_batch(1)
            scanned += 1
            if select_prompts([index], self.history, self.explore_prob, generator)[0]:
                kept.append(index)
        return kept or [index], scanned

    def observe(self, prompt_indices: list[int], samples: list[dict], n: int) -> None:
        """Update the streaks from one round's samples (``n`` consecutive samples per prompt)."""
        if not self.enabled:
            return
        if len(samples) != n * len(prompt_indices):
            raise ValueError(f"{len(samples)} samples for {len(prompt_indices)} prompts x n={n}")
        groups = [g for g in range(len(prompt_indices)) for _ in range(n)]
        informative = select_informative_groups(groups, [s[self.metric] for s in samples])
        zero = [not bool(informative[g * n]) for g in range(len(prompt_indices))]
        self.history = update_prompt_history(self.history, prompt_indices, zero)

    def num_zero_streak(self) -> int:
        """Prompts whose latest group had zero advantage (candidates for skipping)."""
        return sum(1 for z in self.history.values() if z > 0)

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "history": dict(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["enabled"]) != self.enabled:
            raise ValueError(
                f"checkpoint was written with algorithm.prompt_skipping={state['enabled']} but this run "
                f"has {self.enabled}; resume with the same setting"
            )
        self.history = {int(k): int(v) for k, v in state["history"].items()}
