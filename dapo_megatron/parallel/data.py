"""The data-parallel split: which data-parallel rank trains which sequence (the one place).

A step's batch of ``N`` sequences is trained in mini-batches of ``mini_batch_size`` consecutive
sequences (one optimizer update each); every data-parallel rank takes ``mini_batch_size / dp`` of
each. Within a mini-batch the shares are balanced by token count (longest sequence first, to the
share with the fewest tokens that still has room; ties to the lower rank), so one rank does not get
all the long responses. Deterministic: every rank computes the same assignment from the lengths.
"""

from __future__ import annotations

from collections.abc import Sequence


def assign_data_parallel(lengths: Sequence[int], *, mini_batch_size: int, dp: int) -> list[list[int]]:
    """Global sequence indices per data-parallel rank, mini-batch after mini-batch.

    Args:
        lengths: ``[N]`` token count of each sequence (prompt + response).
        mini_batch_size: sequences per optimizer update over all ranks; divides ``N`` and is
            divisible by ``dp``.
        dp: number of data-parallel ranks.

    Returns:
        ``out[d]``: the ``N / dp`` indices rank ``d`` trains; its ``k``-th ``mini_batch_size / dp``
        entries belong to mini-batch ``k``, each share in ascending index order.

    Raises:
        ValueError: sizes that do not divide.
    """
    n = len(lengths)
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    if mini_batch_size < 1 or n % mini_batch_size:
        raise ValueError(f"batch of {n} sequences is not divisible by mini_batch_size={mini_batch_size}")
    if mini_batch_size % dp:
        raise ValueError(
            f"mini_batch_size={mini_batch_size} sequences must be divisible by the data-parallel size {dp}"
        )
    per_rank = mini_batch_size // dp
    out: list[list[int]] = [[] for _ in range(dp)]
    for start in range(0, n, mini_batch_size):
        members = range(start, start + mini_batch_size)
        order = sorted(members, key=lambda i: (-int(lengths[i]), i))
        shares: list[list[int]] = [[] for _ in range(dp)]
        tokens = [0] * dp
        for i in order:
            d = min((d for d in range(dp) if len(shares[d]) < per_rank), key=lambda d: (tokens[d], d))
            shares[d].append(i)
            tokens[d] += int(lengths[i])
        for d in range(dp):
            out[d] += sorted(shares[d])
    return out
