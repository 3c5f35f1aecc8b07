"""Length-aware reward shaping: DAPO's soft overlong punishment and overlong filtering.

The two are independent switches: the soft penalty changes the *reward* of long responses, the
filter removes *truncated* responses from the *loss* (their reward is noise: a correct reasoning cut
off by the length limit scores as wrong).
"""

from __future__ import annotations

import torch

from dapo_megatron.algo._common import check_rank


def _as_lengths(lengths) -> torch.Tensor:
    tensor = lengths if isinstance(lengths, torch.Tensor) else torch.as_tensor(lengths)
    check_rank("lengths", tensor, 1)
    return tensor


def overlong_penalty(
    lengths: torch.Tensor,
    *,
    max_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the task reward of each response.

    With ``L`` the response length in tokens and ``L_exp = max_len - buffer_len``::

        R_len(L) = 0                                         L <= L_exp
                 = -(L - L_exp) / buffer_len * penalty_factor L_exp < L <= max_len
                 = -penalty_factor                           L > max_len

    Piecewise linear and continuous: 0 at ``L_exp``, ``-penalty_factor`` at ``max_len``.

    Args:
        lengths: ``[B]`` response lengths (integer or float tensor, or a list).
        max_len: maximum response length ``> 0`` (the generation limit).
        buffer_len: length of the punishment interval, in ``(0, max_len]``.
        penalty_factor: penalty at and beyond ``max_len``, ``>= 0``.

    Returns:
        ``[B]`` float32 penalties (``<= 0``).

    Raises:
        ValueError: ``max_len <= 0``, ``buffer_len`` outside ``(0, max_len]``, ``penalty_factor < 0``,
            ``lengths`` not 1-D.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    length = _as_lengths(lengths).to(torch.float32)
    expected_len = max_len - buffer_len
    exceed = (length - expected_len).clamp(min=0.0, max=float(buffer_len))
    return -exceed / buffer_len * penalty_factor


def overlong_mask(
    lengths: torch.Tensor,
    truncated: torch.Tensor | None = None,
    *,
    max_len: int | None = None,
) -> torch.Tensor:
    """Overlong filtering: which responses stay in the loss (``True`` = keep).

    A response is dropped when it was truncated by the length limit. Pass ``truncated`` from the
    rollout engine (finish reason ``"length"``) when you have it; otherwise pass ``max_len`` and a
    response counts as truncated when ``L >= max_len`` (a response that ends with EOS exactly at the
    limit is then dropped too; the engine's flag is the exact signal). Apply it to the token mask as
    ``response_mask * keep[:, None]``; with the default ``token-mean`` aggregation the dropped tokens
    then leave both the loss sum and the token count.

    Args:
        lengths: ``[B]`` response lengths.
        truncated: optional ``[B]`` bool (or 0/1), ``True`` where generation hit the length limit.
        max_len: the generation limit; used only when ``truncated`` is ``None``.

    Returns:
        ``[B]`` bool keep-mask.

    Raises:
        ValueError: neither ``truncated`` nor ``max_len`` given, ``max_len <= 0``, or a shape mismatch.
    """
    length = _as_lengths(lengths)
    if truncated is not None:
        flag = truncated if isinstance(truncated, torch.Tensor) else torch.as_tensor(truncated)
        if flag.shape != length.shape:
            raise ValueError(
                f"truncated has shape {tuple(flag.shape)} but lengths has shape {tuple(length.shape)}"
            )
        return ~(flag.to(torch.bool))
    if max_len is None:
        raise ValueError("overlong_mask needs truncated (preferred) or max_len")
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    return length < max_len
