"""Data types shared by every rollout engine: the sampling config, one response, the engine protocol."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample the responses of one :meth:`RolloutEngine.generate` call.

    Attributes:
        temperature: softmax temperature; ``0`` means greedy (argmax) decoding.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
            sums to at least ``top_p`` (``1.0`` keeps the whole vocabulary).
        top_k: keep only the ``top_k`` most likely tokens; ``-1`` keeps the whole vocabulary.
        max_new_tokens: the most tokens generated per response; a response cut here has
            ``finish_reason == "length"``.
        stop_token_ids: token ids that end a response (``finish_reason == "stop"``), in addition to
            the model's EOS ids. The stop token is kept as the last token of the response.
        seed: makes sampling reproducible: the same seed, prompts, ``n`` and weights give the same
            tokens, whatever else is in the batch. Sample ``j`` of prompt ``i`` uses the seed
            ``seed + i * n + j``. ``None`` draws from the engine's own generator (seeded once at
            construction).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingConfig.top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        stop = tuple(self.stop_token_ids)
        for tok in stop:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"SamplingConfig.stop_token_ids must be non-negative ints, got {tok!r}")
        object.__setattr__(self, "stop_token_ids", stop)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SamplingConfig.seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (``temperature == 0``)."""
        return self.temperature == 0.0


@dataclass
class Response:
    """One generated response.

    Attributes:
        token_ids: the generated token ids (prompt excluded); a stop/EOS token that ended the
            response is its last element.
        logprobs: ``logprobs[t]`` is the log-probability of ``token_ids[t]`` under the distribution
            the engine sampled it from: ``log_softmax(logits / temperature)`` restricted to the
            ``top_k`` / ``top_p`` set and renormalised; with the default ``top_k=-1, top_p=1.0``
            this is exactly ``log_softmax(logits / temperature)``. For greedy decoding
            (``temperature == 0``) it is ``log_softmax(logits)``. Always computed in fp32.
        finish_reason: ``"stop"`` when the response ended with an EOS or stop token, ``"length"``
            when it was truncated at ``max_new_tokens``.
        routed_experts: mixture-of-experts engines that record routing: the experts the engine's
            router chose, int ``[prompt + response tokens, num_layers, top_k]`` (the last response
            token never went through the model; its row repeats the one before). ``None``
            otherwise.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Response.logprobs has {len(self.logprobs)} entries but token_ids has {len(self.token_ids)}"
            )
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"Response.finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")


@runtime_checkable
class RolloutEngine(Protocol):
    """An inference engine that samples responses from token-id prompts and takes new weights."""

    def generate(
        self, prompt_token_ids: list[list[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Response]]:
        """Sample ``n`` responses per prompt; returns one list of ``n`` responses per prompt."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace every weight with the given full tensors (HF names); later generations use them.
        A sleeping engine wakes as part of the update (weights first, KV cache after loading)."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory (weights and KV cache) while the trainer runs."""
        ...

    def wake_up(self) -> None:
        """Undo :meth:`sleep` before the next generation."""
        ...

    def close(self) -> None:
        """Release every resource the engine holds."""
        ...
