"""The rollout batch: what the rollout side hands to the policy trainer, one typed object.

One spelling per field, everywhere (rollout, data plane, loss, tests). All per-token tensors are
``[N, S]``, right-padded, aligned with ``input_ids`` (position ``t`` scores token ``t``; prompt and
padding positions are zero and masked out by ``response_mask``); the per-row tensors
(:attr:`RolloutBatch.PER_ROW`) are ``[N]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class RolloutBatch:
    """``N`` sequences (prompt + response each) for one policy update.

    Attributes:
        input_ids: ``[N, S]`` long, prompt then response tokens, right-padded.
        seq_lengths: ``[N]`` long, prompt + response length of each row.
        response_mask: ``[N, S]`` float, 1 on response tokens that count in the loss (0 for every
            token of a truncated response under overlong filtering).
        advantages: ``[N, S]`` float, the group-relative advantage of the row on its masked tokens.
        rollout_log_probs: ``[N, S]`` float, the engine's log-probs of the response tokens (TIS,
            the trainer-vs-engine mismatch metric), or ``None``.
        old_log_probs: ``[N, S]`` float, the policy's log-probs before the update (set by the
            trainer with :meth:`~dapo_megatron.policy.train_step.PolicyTrainer.compute_log_probs`).
        ref_log_probs: ``[N, S]`` float, a reference policy's log-probs (KL), or ``None``.
        token_weights: ``[N, S]`` float per-token loss weights, or ``None``.
        routed_experts: ``[N, S, num_layers, top_k]`` long, the engine's expert choices per token
            (MoE routing replay, ``model.routing_replay=rollout``), or ``None``.
        sequence_rewards: ``[N]`` float64, the shaped scalar reward of each row (score plus the
            overlong penalty: what ``advantages`` were computed from), or ``None``. This field and
            the next two are set only with KL in the reward (``algorithm.kl_coef > 0``,
            ``use_kl_loss: false``), where the trainer recomputes the group advantages from
            KL-shaped rewards (:func:`~dapo_megatron.trainer.rollout.kl_in_reward_advantages`).
        sequence_ids: ``[N]`` long, the row's position in the step's whole batch, in the order
            (round, engine, prompt, response) of :func:`~dapo_megatron.trainer.rollout.deliver_rows`;
            its group (prompt) is ``sequence_ids // rollout.n``; or ``None``.
        prompt_lengths: ``[N]`` long, the prompt length of each row, or ``None``: its response
            tokens are the positions ``prompt_lengths <= t < seq_lengths`` (also for a row out of the
            loss, whose ``response_mask`` is 0).
    """

    PER_ROW: ClassVar[tuple[str, ...]] = ("seq_lengths", "sequence_rewards", "sequence_ids", "prompt_lengths")
    """The ``[N]`` fields (one value per row); every other field is per token."""

    input_ids: torch.Tensor
    seq_lengths: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_log_probs: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None
    sequence_rewards: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    prompt_lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(
                f"RolloutBatch.input_ids must be [N, S], got shape {tuple(self.input_ids.shape)}"
            )
        n, s = self.input_ids.shape
        for name, t in self.tensors().items():
            if name in self.PER_ROW:
                if tuple(t.shape) != (n,):
                    raise ValueError(f"RolloutBatch.{name} must be [{n}], got {tuple(t.shape)}")
            elif name == "routed_experts":
                if t.dim() != 4 or tuple(t.shape[:2]) != (n, s):
                    raise ValueError(
                        f"RolloutBatch.routed_experts must be [{n}, {s}, layers, top_k], got {tuple(t.shape)}"
                    )
            elif name != "input_ids" and tuple(t.shape) != (n, s):
                raise ValueError(
                    f"RolloutBatch.{name} must be [{n}, {s}] like input_ids, got {tuple(t.shape)}"
                )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RolloutBatch:
        """From a mapping of field name -> tensor; an unknown name raises ``ValueError`` naming it."""
        unknown = sorted(set(tensors) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"RolloutBatch has no field(s) {unknown}; fields are {list(cls.field_names())}")
        return cls(**tensors)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f: getattr(self, f) for f in self.field_names() if getattr(self, f) is not None}

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, indices: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """The rows ``indices``, in that order, trimmed to their longest sequence."""
        idx = torch.as_tensor(
            list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.long
        )
        width = int(self.seq_lengths[idx].max()) if idx.numel() else 0
        return RolloutBatch(
            **{k: (t[idx] if k in self.PER_ROW else t[idx, :width]) for k, t in self.tensors().items()}
        )

    # Mapping-style access by field name (``batch["old_log_probs"]``), for code that fills fields
    # in a loop; only the dataclass fields exist.
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.field_names():
            raise KeyError(f"RolloutBatch has no field {name!r}")
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"RolloutBatch.{name} is not set")
        return value

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name not in self.field_names():
            raise KeyError(f"RolloutBatch has no field {name!r}")
        setattr(self, name, value)

    def __contains__(self, name: object) -> bool:
        return name in self.field_names() and getattr(self, name) is not None
