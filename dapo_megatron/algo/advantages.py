"""Group-relative outcome advantages (GRPO / DAPO / Dr.GRPO)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from dapo_megatron.algo._common import (
    as_1d_float,
    as_bool_mask,
    check_finite,
    check_rank,
    group_index,
    group_spread,
)


def group_advantages(
    scores: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[Hashable],
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Outcome advantage of each response relative to the other responses to the same prompt.

    For response ``i`` in group ``g`` (the ``G_g`` responses sampled for one prompt)::

        mean_g = (1 / G_g) * sum_{j in g} s_j
        std_g  = sqrt( sum_{j in g} (s_j - mean_g)^2 / (G_g - 1) )      unbiased sample std
        A_i    = (s_i - mean_g) / (std_g + eps)      norm_by_std=True   (GRPO, DAPO)
        A_i    =  s_i - mean_g                       norm_by_std=False  (Dr.GRPO)

    A group of one response gets ``A = 0`` (it has no baseline to compare against), and so does
    every member of a group whose scores are all equal (exactly 0, whatever ``eps``).

    Args:
        scores: ``[B]`` scalar reward per response (after any length shaping).
        group_ids: ``[B]`` prompt id per response: an integer tensor or any sequence of hashable
            ids (e.g. uid strings). Members of a group need not be contiguous.
        norm_by_std: divide by the group std.
        eps: added to the std; ``>= 0``.

    Returns:
        ``[B]`` advantages in ``scores``' floating dtype (float32 for integer tensors and lists),
        computed in float64.

    Raises:
        ValueError: ``scores`` not 1-D or not finite, ``group_ids`` length mismatch, ``eps < 0``.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    scores_t = as_1d_float("scores", scores)
    check_finite("scores", scores_t)
    out_dtype = (
        scores.dtype if isinstance(scores, torch.Tensor) and scores.is_floating_point() else torch.float32
    )
    values = scores_t.to(torch.float64)
    index, num_groups = group_index(group_ids, values.numel(), values.device)

    counts = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(
        0, index, torch.ones_like(values)
    )
    sums = torch.zeros_like(counts).index_add_(0, index, values)
    centered = values - (sums / counts)[index]
    if norm_by_std:
        sq_dev = torch.zeros_like(counts).index_add_(0, index, centered * centered)
        std = torch.sqrt(sq_dev / (counts - 1).clamp(min=1))
        centered = centered / (std[index] + eps)
    # Exactly 0 (not a rounding residue over eps, nor 0/0 with eps=0) for groups without contrast,
    # which includes every group of one.
    no_contrast = group_spread(values, index, num_groups)[index] == 0
    advantages = torch.where(no_contrast, torch.zeros_like(centered), centered)
    return advantages.to(out_dtype)


def broadcast_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Spread one advantage per response over its tokens: ``out[i, t] = A_i * m[i, t]``.

    Args:
        advantages: ``[B]``.
        response_mask: ``[B, T]``, bool or 0/1.

    Returns:
        ``[B, T]`` in ``advantages``' dtype, 0 on masked tokens.
    """
    check_rank("advantages", advantages, 1)
    check_rank("response_mask", response_mask, 2)
    if response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"response_mask has {response_mask.shape[0]} rows but advantages has "
            f"{advantages.shape[0]} entries"
        )
    mask = as_bool_mask(response_mask)
    expanded = advantages.unsqueeze(-1).expand(mask.shape)
    return torch.where(mask, expanded, torch.zeros((), dtype=advantages.dtype, device=advantages.device))
