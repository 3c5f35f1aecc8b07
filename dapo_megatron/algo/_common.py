"""Private helpers shared by the algorithm modules: argument checks, masks, group indexing."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def check_rank(name: str, tensor: torch.Tensor, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first tensor in ``others`` whose shape differs from ``reference``."""
    for name, tensor in others.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {reference_name} has shape "
                f"{tuple(reference.shape)}; they must match"
            )


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for half precision and integers, float64 kept as is: the loss math runs in fp32 at least."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Any dtype -> bool, nonzero = valid."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (bool); 0 when the mask is empty."""
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1)


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of ``values`` over ``mask`` (bool); 0 when the mask is empty."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    if values.numel() == 0:
        return zero
    return torch.where(mask.any(), values.masked_fill(~mask, float("-inf")).max(), zero)


def as_1d_float(name: str, values) -> torch.Tensor:
    """A ``[B]`` float tensor from a tensor (float dtype kept) or a sequence of numbers (float64)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.float64)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor


def group_index(
    group_ids: torch.Tensor | Sequence[Hashable], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Map ``group_ids`` (``[B]`` integer tensor or any sequence of hashables) to dense indices.

    Returns ``(index, num_groups)`` with ``index`` a ``LongTensor[B]`` in ``[0, num_groups)``. For a
    sequence, groups are numbered in order of first appearance; for a tensor, in sorted id order.
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids.shape)}")
        if group_ids.is_floating_point():
            raise ValueError("group_ids must be an integer tensor or a sequence of hashable ids")
        unique, index = torch.unique(group_ids, return_inverse=True)
        num_groups = int(unique.numel())
        index = index.to(device)
    else:
        dense: dict[Hashable, int] = {}
        index_list = [dense.setdefault(gid, len(dense)) for gid in group_ids]
        num_groups = len(dense)
        index = torch.tensor(index_list, dtype=torch.long, device=device)
    if index.numel() != batch_size:
        raise ValueError(f"group_ids has {index.numel()} entries but there are {batch_size} samples")
    return index, num_groups


def group_spread(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``max - min`` of ``values [B]`` within each group: ``[num_groups]`` (0 for a group of one)."""
    group_max = torch.full((num_groups,), -torch.inf, dtype=values.dtype, device=values.device)
    group_min = torch.full((num_groups,), torch.inf, dtype=values.dtype, device=values.device)
    group_max.scatter_reduce_(0, index, values, "amax")
    group_min.scatter_reduce_(0, index, values, "amin")
    return group_max - group_min


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or inf")
