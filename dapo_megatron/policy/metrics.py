"""Exact reduction of per-micro-batch loss reports across micro-batches and ranks.

Loss functions report *sums* (``*_sum``, ``tokens``, ``sequences``...) and maxima (``*_max``).
Only ranks that computed a loss (last pipeline stage, TP rank 0) contribute; everyone else
contributes zeros. One all-reduce (sum) and one (max) over the group passed in (normally the whole world)
make every rank hold the global values, from which means are derived.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from dapo_megatron.parallel.exchange import all_reduce_cpu


def reduce_reports(
    reports: Sequence[dict[str, torch.Tensor]], *, keys: Sequence[str], contributes: bool, group
) -> dict[str, float]:
    """Sum (or max, for keys ending in ``_max``) ``keys`` over ``reports`` and over ``group``
    (passed explicitly; ``dist.group.WORLD`` for the whole job)."""
    sum_keys = [k for k in keys if not k.endswith("_max")]
    max_keys = [k for k in keys if k.endswith("_max")]
    sums = torch.zeros(len(sum_keys), dtype=torch.float64)
    maxes = torch.full((len(max_keys),), float("-inf"), dtype=torch.float64)
    if contributes:
        for r in reports:
            sums += torch.stack([r[k].detach().double().cpu() for k in sum_keys]) if sum_keys else 0
            if max_keys:
                maxes = torch.maximum(maxes, torch.stack([r[k].detach().double().cpu() for k in max_keys]))
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        sums = all_reduce_cpu(sums, group=group)  # through the GPU under NCCL
        if max_keys:
            maxes = all_reduce_cpu(maxes, op=dist.ReduceOp.MAX, group=group)
    out = {k: float(v) for k, v in zip(sum_keys, sums)}
    out.update({k: float(v) for k, v in zip(max_keys, maxes)})
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def summarize_loss_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Means of the DAPO loss report (``dapo_megatron.policy.loss.dapo_loss``)."""
    tokens = totals["tokens"]
    return {
        "loss": _ratio(totals["loss_sum"], totals["loss_count"]),
        "pg_loss": _ratio(totals["pg_loss_sum"], tokens),
        "entropy": _ratio(totals["entropy_sum"], tokens),
        "approx_kl": _ratio(totals["approx_kl_sum"], tokens),
        "pg_clipfrac_low": _ratio(totals["clipfrac_low_sum"], tokens),
        "pg_clipfrac_high": _ratio(totals["clipfrac_high_sum"], tokens),
        "pg_clipfrac_dual": _ratio(totals["clipfrac_dual_sum"], tokens),
        "ratio_mean": _ratio(totals["ratio_sum"], tokens),
        "ratio_max": totals["ratio_max"],
        "valid_tokens": tokens,
        "train/response_length/mean": _ratio(totals["response_length_sum"], totals["sequences"]),
        "train/response_length/max": totals["response_length_max"],
    }
