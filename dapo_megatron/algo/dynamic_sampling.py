"""DAPO dynamic sampling: keep only prompt groups whose responses disagree, refill to a full batch.

Why groups, not single samples
------------------------------
With group-relative advantages (:func:`~dapo_megatron.algo.advantages.group_advantages`) the learning
signal of a response is its contrast with the other responses to the same prompt. If all ``G``
responses of a prompt are correct (or all wrong), every member gets ``A = 0``: no gradient, yet the
tokens still count in the batch and, under ``token-mean``, dilute everyone else's gradient. The DAPO
paper therefore constrains ``0 < |{o_i : o_i correct}| < G`` per *group* and over-samples until the
batch is full of such groups. The seed pseudo-code instead filters *single samples* with ``0 < r < 1``;
that never holds for a binary accuracy and, for other rewards, splits groups and so changes the
baseline of the members left behind. Here a group is kept or dropped as a whole.

The filter metric is the task accuracy (``acc``) by default, i.e. *before* length shaping: a group
whose responses are all correct but differ in overlong penalty has no correctness contrast. The
metric is configurable (``acc``, ``score``, ``reward``, or any per-sample value).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from dapo_megatron.algo._common import as_1d_float, check_finite, group_index, group_spread


def select_informative_groups(
    group_ids: torch.Tensor | Sequence[Hashable],
    values: torch.Tensor | Sequence[float],
    *,
    atol: float = 1e-6,
) -> torch.Tensor:
    """Per-sample keep mask: members of groups whose values are not all equal.

    ``keep_i = (max_{j in g(i)} v_j - min_{j in g(i)} v_j) > atol``. A group of one is never kept
    (nothing to contrast). See the module docstring for why whole groups are filtered.

    Args:
        group_ids: ``[B]`` prompt id per sample (integer tensor or sequence of hashable ids).
        values: ``[B]`` filter metric per sample, normally the task accuracy.
        atol: tolerance ``>= 0`` on the group's value range.

    Returns:
        ``[B]`` bool tensor on ``values``' device.

    Raises:
        ValueError: length mismatch, non-finite values, ``atol < 0``.
    """
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    vals = as_1d_float("values", values)
    check_finite("values", vals)
    index, num_groups = group_index(group_ids, vals.numel(), vals.device)
    return (group_spread(vals, index, num_groups) > atol)[index]


class DynamicSamplingExhaustedError(RuntimeError):
    """``max_num_gen_batches`` generation batches did not yield ``train_batch_size`` informative groups."""


def exhausted_error(
    *,
    num_gen_batches: int,
    max_num_gen_batches: int,
    num_kept: int,
    needed: int,
    num_total: int,
    num_solve_all: int,
    num_solve_none: int,
    metric: str,
    where: str = "",
) -> DynamicSamplingExhaustedError:
    """The exhaustion error with its counts (``where``: e.g. ``" over 2 engines"``)."""
    return DynamicSamplingExhaustedError(
        f"dynamic sampling exhausted{where}: {num_gen_batches} generation batches "
        f"(max_num_gen_batches={max_num_gen_batches}) kept only {num_kept} of "
        f"the {needed} prompt groups needed; {num_total} groups "
        f"generated, {num_solve_all} all solved, {num_solve_none} none solved "
        f"(metric={metric!r}). The data may be too easy or too hard for the policy; "
        "raise max_num_gen_batches or set it to 0 (unlimited)."
    )


class DynamicSampler:
    """Accumulates generation batches until ``train_batch_size`` informative prompt groups are kept.

    Interface: each :meth:`add` receives one generation batch as a flat sequence of samples (any
    objects). Each sample belongs to a group (the responses to one prompt) and carries a filter
    value. By default samples are mappings and both are read from them (``sample[group_key]``,
    ``sample[metric]``); pass ``group_ids=`` / ``values=`` (``[B]`` sequences or tensors) to
    supply them for other sample types. Group ids are scoped to one :meth:`add` call: the same id in
    two batches makes two groups. Groups are kept or dropped whole (:func:`select_informative_groups`).

    When :attr:`ready`, :meth:`take` returns exactly ``train_batch_size`` groups as a flat list --
    groups contiguous, in the order they were kept (batch order, then first appearance within a
    batch), members in their original order -- and the metrics of the step; surplus groups of the
    last batch are discarded (as in the DAPO reference) and counted in ``num_groups_trimmed``. If
    ``max_num_gen_batches > 0`` batches were added and the batch is still not full, :meth:`add` raises
    :class:`DynamicSamplingExhaustedError` with the counts; the sampler keeps its state (call
    :meth:`reset` to start the step over). ``state_dict()`` / ``load_state_dict()`` capture the
    partial batch and the counters for exact resume; the state holds the kept samples themselves, so
    it serialises with ``torch.save`` / ``pickle`` whenever the samples do.

    Example::

        >>> sampler = DynamicSampler(train_batch_size=2, max_num_gen_batches=4)
        >>> sampler.add([
        ...     {"uid": "p0", "acc": 1.0}, {"uid": "p0", "acc": 0.0},  # mixed: kept
        ...     {"uid": "p1", "acc": 1.0}, {"uid": "p1", "acc": 1.0},  # all solved: dropped
        ... ])
        False
        >>> sampler.add([{"uid": "p2", "acc": 0.0}, {"uid": "p2", "acc": 1.0}])
        True
        >>> samples, metrics = sampler.take()
        >>> [s["uid"] for s in samples]
        ['p0', 'p0', 'p2', 'p2']
        >>> metrics["num_gen_batches"], metrics["num_groups_kept"], metrics["num_groups_total"]
        (2, 2, 3)
        >>> metrics["solve_all_frac"], metrics["solve_none_frac"]
        (0.3333333333333333, 0.0)

    Args:
        train_batch_size: prompt groups per training step, ``> 0``.
        max_num_gen_batches: generation batches allowed per step; ``0`` = unlimited.
        metric: key of the filter value in each sample (``"acc"``, ``"score"``, ``"reward"``...).
        group_key: key of the group id in each sample.
        atol: tolerance of :func:`select_informative_groups`.
        enabled: ``False`` keeps every group (no filtering) but still fills, trims and reports.
        solved_threshold: a sample counts as solved for the ``solve_all`` / ``solve_none`` metrics
            when its value is ``> solved_threshold`` (0 suits ``acc`` in {0, 1} and ``score`` in {-1, 1}).
    """

    def __init__(
        self,
        train_batch_size: int,
        *,
        max_num_gen_batches: int = 0,
        metric: str = "acc",
        group_key: str = "uid",
        atol: float = 1e-6,
        enabled: bool = True,
        solved_threshold: float = 0.0,
    ) -> None:
        if train_batch_size <= 0:
            raise ValueError(f"train_batch_size must be > 0, got {train_batch_size}")
        if max_num_gen_batches < 0:
            raise ValueError(f"max_num_gen_batches must be >= 0 (0 = unlimited), got {max_num_gen_batches}")
        if atol < 0:
            raise ValueError(f"atol must be >= 0, got {atol}")
        self.train_batch_size = train_batch_size
        self.max_num_gen_batches = max_num_gen_batches
        self.metric = metric
        self.group_key = group_key
        self.atol = atol
        self.enabled = enabled
        self.solved_threshold = solved_threshold
        self.reset()

    # -- configuration captured in the state, to refuse resuming into a different sampler --
    def _config(self) -> dict[str, Any]:
        return {
            "train_batch_size": self.train_batch_size,
            "max_num_gen_batches": self.max_num_gen_batches,
            "metric": self.metric,
            "group_key": self.group_key,
            "atol": self.atol,
            "enabled": self.enabled,
            "solved_threshold": self.solved_threshold,
        }

    def reset(self) -> None:
        """Forget the partial batch and the counters of the current step."""
        self._kept_groups: list[list[Any]] = []
        self._num_gen_batches = 0
        self._num_groups_total = 0
        self._num_solve_all = 0
        self._num_solve_none = 0

    @property
    def num_kept_groups(self) -> int:
        """Informative groups kept so far in this step (before trimming)."""
        return len(self._kept_groups)

    @property
    def ready(self) -> bool:
        """``True`` once at least ``train_batch_size`` groups are kept."""
        return self.num_kept_groups >= self.train_batch_size

    def _read(self, samples: Sequence[Any], key: str, what: str) -> list[Any]:
        try:
            return [sample[key] for sample in samples]
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"cannot read the {what} {key!r} from the samples ({err!r}); pass {what}s explicitly"
            ) from err

    def add(
        self,
        samples: Sequence[Any],
        *,
        group_ids: torch.Tensor | Sequence[Hashable] | None = None,
        values: torch.Tensor | Sequence[float] | None = None,
    ) -> bool:
        """Add one generation batch; return :attr:`ready`.

        Args:
            samples: the batch, a flat sequence of samples (groups need not be contiguous).
            group_ids: ``[B]`` group id per sample; default ``sample[group_key]``.
            values: ``[B]`` filter value per sample; default ``sample[metric]``.

        Raises:
            ValueError: missing keys or length mismatch.
            DynamicSamplingExhaustedError: the step has used ``max_num_gen_batches`` batches and
                is still not full.
        """
        samples = list(samples)
        if group_ids is None:
            group_ids = self._read(samples, self.group_key, "group id")
        if values is None:
            values = [float(v) for v in self._read(samples, self.metric, "value")]
        ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
        vals = as_1d_float("values", values).detach().cpu()
        if not len(ids) == vals.numel() == len(samples):
            raise ValueError(
                f"got {len(samples)} samples, {len(ids)} group ids and {vals.numel()} values; they must match"
            )
        informative = select_informative_groups(ids, vals, atol=self.atol).tolist()
        solved = (vals > self.solved_threshold).tolist()

        members: dict[Hashable, list[int]] = {}
        for position, gid in enumerate(ids):
            members.setdefault(gid, []).append(position)

        self._num_gen_batches += 1
        self._num_groups_total += len(members)
        for positions in members.values():
            num_solved = sum(solved[p] for p in positions)
            self._num_solve_all += num_solved == len(positions)
            self._num_solve_none += num_solved == 0
            if informative[positions[0]] or not self.enabled:
                self._kept_groups.append([samples[p] for p in positions])

        if (
            not self.ready
            and self.max_num_gen_batches > 0
            and self._num_gen_batches >= self.max_num_gen_batches
        ):
            raise exhausted_error(
                num_gen_batches=self._num_gen_batches,
                max_num_gen_batches=self.max_num_gen_batches,
                num_kept=self.num_kept_groups,
                needed=self.train_batch_size,
                num_total=self._num_groups_total,
                num_solve_all=self._num_solve_all,
                num_solve_none=self._num_solve_none,
                metric=self.metric,
            )
        return self.ready

    def metrics(self) -> dict[str, float]:
        """Counters of the current step (what :meth:`take` reports, without trimming)."""
        total = self._num_groups_total
        return {
            "num_gen_batches": self._num_gen_batches,
            "num_groups_total": total,
            "num_groups_kept": self.num_kept_groups,
            "kept_ratio": self.num_kept_groups / total if total else 0.0,
            "solve_all_frac": self._num_solve_all / total if total else 0.0,
            "solve_none_frac": self._num_solve_none / total if total else 0.0,
            "num_groups_trimmed": max(self.num_kept_groups - self.train_batch_size, 0),
        }

    def take(self) -> tuple[list[Any], dict[str, float]]:
        """Return ``(samples, metrics)`` for exactly ``train_batch_size`` groups and start a new step.

        ``metrics``: ``num_gen_batches``, ``num_groups_total`` (generated), ``num_groups_kept``
        (informative, before trimming), ``kept_ratio`` (kept / generated), ``solve_all_frac`` and
        ``solve_none_frac`` (fractions of the generated groups), ``num_groups_trimmed``.

        Raises:
            RuntimeError: not :attr:`ready`.
        """
        if not self.ready:
            raise RuntimeError(
                f"DynamicSampler.take() before ready: {self.num_kept_groups} of "
                f"{self.train_batch_size} groups kept after {self._num_gen_batches} batches"
            )
        metrics = self.metrics()
        samples = [s for group in self._kept_groups[: self.train_batch_size] for s in group]
        self.reset()
        return samples, metrics

    def state_dict(self) -> dict[str, Any]:
        """Config, counters and the kept groups of the current step (lists are copied)."""
        return {
            "format_version": 1,
            "config": self._config(),
            "kept_groups": [list(group) for group in self._kept_groups],
            "num_gen_batches": self._num_gen_batches,
            "num_groups_total": self._num_groups_total,
            "num_solve_all": self._num_solve_all,
            "num_solve_none": self._num_solve_none,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore :meth:`state_dict`'s output.

        Args:
            state: a previous :meth:`state_dict`.
            strict: refuse a state saved under a different configuration (``ValueError`` naming the
                differing keys); ``False`` keeps this sampler's configuration.
        """
        if state.get("format_version") != 1:
            raise ValueError(
                f"unsupported DynamicSampler state format_version {state.get('format_version')!r}"
            )
        if strict:
            saved, current = state["config"], self._config()
            differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
            if differing:
                raise ValueError(f"DynamicSampler state was saved with a different config: {differing}")
        self._kept_groups = [list(group) for group in state["kept_groups"]]
        self._num_gen_batches = int(state["num_gen_batches"])
        self._num_groups_total = int(state["num_groups_total"])
        self._num_solve_all = int(state["num_solve_all"])
        self._num_solve_none = int(state["num_solve_none"])
