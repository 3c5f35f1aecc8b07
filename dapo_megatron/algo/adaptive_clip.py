"""Entropy-targeted Clip-Higher: a controller that moves ``clip_ratio_high`` to hold entropy in a band."""

from __future__ import annotations

import math


def adaptive_clip_high(
    clip_ratio_high: float,
    entropy: float,
    *,
    target_low: float,
    target_high: float,
    gain: float,
    min_value: float = 0.2,
    max_value: float = 0.5,
) -> float:
    """One step of the proportional controller of ``eps_high``.

    A larger upper clip lets low-probability tokens with positive advantage grow, which raises
    policy entropy (DAPO's Clip-Higher motivation); a smaller one lets entropy fall. With ``H`` the
    step's mean token entropy and the band ``[H_lo, H_hi]``::

        e' = e + gain * (H_lo - H)   if H < H_lo        (entropy collapsing: open the clip)
        e' = e - gain * (H - H_hi)   if H > H_hi        (entropy exploding: close it)
        e' = e                       otherwise
        e' = clamp(e', min_value, max_value)

    Args:
        clip_ratio_high: current ``eps_high`` (scalar).
        entropy: the measured mean token entropy of this step (nats).
        target_low, target_high: the entropy band, ``0 <= target_low <= target_high``.
        gain: ``>= 0``, change of ``eps_high`` per nat outside the band.
        min_value, max_value: bounds of ``eps_high``, ``0 <= min_value <= max_value``.

    Returns:
        The next ``eps_high`` (float).

    Raises:
        ValueError: a non-finite entropy, an empty band, a negative gain or inverted bounds.
    """
    if not math.isfinite(entropy):
        raise ValueError(f"entropy must be finite, got {entropy}")
    if not 0.0 <= target_low <= target_high:
        raise ValueError(f"need 0 <= target_low <= target_high, got {target_low}, {target_high}")
    if gain < 0.0:
        raise ValueError(f"gain must be >= 0, got {gain}")
    if not 0.0 <= min_value <= max_value:
        raise ValueError(f"need 0 <= min_value <= max_value, got {min_value}, {max_value}")
    value = float(clip_ratio_high)
    if entropy < target_low:
        value += gain * (target_low - entropy)
    elif entropy > target_high:
        value -= gain * (entropy - target_high)
    return min(max(value, min_value), max_value)
