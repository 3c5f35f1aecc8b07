"""Metric reports as exact (sum, count) pairs, maxima and minima, reduced across ranks and divided once.

A rank adds what it measured (``add("acc/mean", sum_of_acc, num_responses)``); :meth:`Report.reduce`
combines the reports of every rank of a group (a rank that measured nothing contributes nothing);
:meth:`Report.values` turns each pair into ``sum / count`` only at the end, for the logger. Means of
means never happen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class Report:
    sums: dict[str, list[float]] = field(default_factory=dict)  # key -> [sum, count]
    maxes: dict[str, float] = field(default_factory=dict)
    mins: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, total: float, count: float = 1.0) -> None:
        """Add ``total`` over ``count`` items to the mean ``key``."""
        pair = self.sums.setdefault(key, [0.0, 0.0])
        pair[0] += float(total)
        pair[1] += float(count)

    def total(self, key: str, value: float) -> None:
        """Add to a plain sum ``key`` (reported as the sum, not a mean)."""
        self.add(key, value, 0.0)

    def max(self, key: str, value: float) -> None:
        self.maxes[key] = max(self.maxes.get(key, float("-inf")), float(value))

    def min(self, key: str, value: float) -> None:
        self.mins[key] = min(self.mins.get(key, float("inf")), float(value))

    def merge(self, other: Report) -> Report:
        for k, (s, c) in other.sums.items():
            self.add(k, s, c)
        for k, v in other.maxes.items():
            self.max(k, v)
        for k, v in other.mins.items():
            self.min(k, v)
        return self

    def reduce(self, group) -> Report:
        """The union of every rank's report in ``group`` (collective; a few hundred bytes per rank)."""
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return Report().merge(self)
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, (self.sums, self.maxes, self.mins), group=group)
        out = Report()
        for sums, maxes, mins in every:
            out.merge(Report(sums, maxes, mins))
        return out

    def values(self) -> dict[str, float]:
        """``sum / count`` per mean (0 when nothing was counted), the sum for plain sums, and the
        extrema."""
        out = {k: (s / c if c > 0 else s) for k, (s, c) in self.sums.items()}
        out.update(self.maxes)
        out.update(self.mins)
        return out
