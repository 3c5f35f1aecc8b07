"""vLLM worker extension for engines whose core runs in a separate process.

``collective_rpc`` pickles its arguments to the engine-core process (tensors arrive as lists),
so weights travel as one ``safetensors`` byte string and are loaded there through the worker's
own ``reload_weights`` (which re-runs the CPU backend's weight repacking).
"""

from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class via ``LLM(worker_extension_cls=...)``."""

    def load_weights_from_bytes(self, data: bytes) -> None:
        from safetensors.torch import load

        self.reload_weights(weights_iterator=iter(load(data).items()))
