"""The entropy-targeted Clip-Higher controller's state across steps (the math: algo/adaptive_clip.py).

Step ``k`` trains with ``eps_high(k)``; its update measures the mean token entropy ``H(k)`` (reduced
over every rank, so each rank holds the same value and runs the same controller); then
``eps_high(k + 1) = adaptive_clip_high(eps_high(k), H(k), ...)``. The value is part of the trainer
state, so a resumed run continues with the value an uninterrupted run would use.
"""

from __future__ import annotations

from typing import Any

from dapo_megatron.algo.adaptive_clip import adaptive_clip_high


class ClipHighController:
    """``eps_high`` for the next step; constant ``algorithm.clip_ratio_high`` when disabled."""

    def __init__(self, algo) -> None:
        self.enabled = bool(algo.adaptive_clip_high)
        self.value = float(algo.clip_ratio_high)
        self._band = (algo.adaptive_clip_entropy_low, algo.adaptive_clip_entropy_high)
        self._gain = algo.adaptive_clip_gain
        self._bounds = (algo.adaptive_clip_min, algo.adaptive_clip_max)

    def observe(self, entropy: float) -> float:
        """Feed the step's measured mean token entropy; return the next step's ``eps_high``."""
        if self.enabled:
            self.value = adaptive_clip_high(
                self.value,
                entropy,
                target_low=self._band[0],
                target_high=self._band[1],
                gain=self._gain,
                min_value=self._bounds[0],
                max_value=self._bounds[1],
            )
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "clip_ratio_high": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["enabled"]) != self.enabled:
            raise ValueError(
                f"checkpoint was written with algorithm.adaptive_clip_high={state['enabled']} but this run "
                f"has {self.enabled}; resume with the same setting"
            )
        if self.enabled:  # disabled: the configured clip_ratio_high stays in force
            self.value = float(state["clip_ratio_high"])
