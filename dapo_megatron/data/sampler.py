"""Deterministic, resumable prompt sampler.

The sampler is an endless stream of prompt indices: epoch 0's permutation, then epoch 1's, and
so on, where epoch ``e``'s permutation depends only on ``(seed, e)``. A batch is the next
``batch_size`` indices of the stream; a batch may straddle two epochs, so no prompt is ever
skipped and every batch is full. The state is just ``(epoch, offset)``: restoring it reproduces
exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["EpochSampler"]


class EpochSampler:
    """Yield batches of prompt indices, reshuffled every epoch.

    Args:
        num_items: dataset size.
        batch_size: default number of indices per batch (e.g. ``trainer.gen_batch_size``).
        shuffle: shuffle each epoch; otherwise ``0..num_items-1`` in order.
        seed: seed of the shuffles.
    """

    def __init__(self, num_items: int, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.offset = 0  # position inside the current epoch's permutation
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of the indices in ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def _current(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
        assert self._perm is not None
        return self._perm

    def next_batch(self, batch_size: int | None = None) -> list[int]:
        """The next ``batch_size`` (default ``self.batch_size``) indices; advances the cursor."""
        size = self.batch_size if batch_size is None else batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        out: list[int] = []
        while len(out) < size:
            perm = self._current()
            take = min(size - len(out), self.num_items - self.offset)
            out.extend(int(i) for i in perm[self.offset : self.offset + take])
            self.offset += take
            if self.offset == self.num_items:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream (plain ints/bools; JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_items": self.num_items,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the dataset size, seed and shuffle flag must match."""
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={getattr(self, key)!r}; "
                    "the prompt data or data.seed/data.shuffle changed since the checkpoint"
                )
        if not 0 <= state["offset"] < self.num_items or state["epoch"] < 0:
            raise ValueError(f"invalid sampler state epoch={state['epoch']} offset={state['offset']}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
