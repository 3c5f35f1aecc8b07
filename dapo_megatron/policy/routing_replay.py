"""Routing replay (R3) for mixture-of-experts policies: route each token to the experts the rollout
engine chose for it, in the trainer's old-log-prob and update forwards.

The training forward and the engine compute router logits with different kernels (and often
dtypes), so near-ties between experts flip, and a token whose experts differ gets a different
log-prob: train/rollout mismatch that no importance ratio corrects. Replaying the engine's expert
ids removes that source; the gate weights are still the trainer's own (differentiable) softmax
over the replayed experts. Megatron-Core implements the mechanism (``RouterReplay``, built when
``moe_enable_routing_replay`` is set, see :class:`~dapo_megatron.models.MoESettings`); this module
hands it the recorded ids of each micro-batch.

Batch layout: ``routed_experts`` int ``[b, s, num_layers, top_k]`` (global layer index), right-padded
like ``input_ids``; Megatron's routers see tokens sequence-major (``[s * b]``), and with sequence
parallelism only this TP rank's sequence chunk.
"""

from __future__ import annotations

import torch

from dapo_megatron.conversion.names import unwrap_model


def moe_routers(model) -> list[torch.nn.Module]:
    """This stage's Megatron MoE routers, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for m in unwrap_model(model).modules() if isinstance(m, TopKRouter)]
    return sorted(routers, key=lambda r: r.layer_number)


def set_replay_targets(model, routed_experts: torch.Tensor | None) -> None:
    """Make the next forward of ``model`` use ``routed_experts`` (``None``: route afresh).

    Raises ``ValueError`` when ids are given for a model built without routing replay.
    """
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for router in moe_routers(model):
        replay = router.router_replay
        if replay is None:
            if routed_experts is not None:
                raise ValueError(
                    "routed_experts given but the model was built without routing replay "
                    "(model.routing_replay: rollout / MoESettings(routing_replay=True))"
                )
            continue
        replay.clear_indices()
        if routed_experts is None:
            replay.clear_router_replay_action()
            continue
        ids = routed_experts[:, :, router.layer_number - 1].transpose(0, 1)  # [s, b, k]
        config = router.config
        if config.sequence_parallel and config.tensor_model_parallel_size > 1:
            from megatron.core import parallel_state as ps

            ids = ids.chunk(config.tensor_model_parallel_size, dim=0)[ps.get_tensor_model_parallel_rank()]
        replay.set_target_indices(ids.reshape(-1, ids.shape[-1]).to(torch.long))
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def routing_agreement(recorded: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of (token, layer) pairs whose expert *sets* agree.

    ``recorded``, ``chosen``: int ``[n, s, L, k]``; ``mask``: bool ``[n, s]`` (tokens to count).
    """
    a = torch.sort(recorded, dim=-1).values
    b = torch.sort(chosen, dim=-1).values
    same = (a == b).all(dim=-1)  # [n, s, L]
    m = mask[..., None].expand_as(same)
    return float(same[m].float().mean()) if m.any() else 1.0


def routed_mask(seq_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Bool ``[b, width]``: the positions whose routing went through the engine's model, every
    token of a sequence but its last (the engine never forwards the token it sampled last)."""
    return torch.arange(width)[None, :] < (seq_lengths.long()[:, None] - 1)


class ExpertAgreement:
    """Train/rollout expert agreement, measured in a no-grad pass over micro-batches.

    For every (token, layer, slot) of the engine's choices (``routed_experts``), whether the
    expert is among the experts the training router of that layer actually used (its routing
    map): with routing replay this is 1.0 by construction of a working replay, without it it is
    the train/rollout routing drift. Counted on the layers of this pipeline stage; tokens are
    those of :func:`routed_mask`.

    Use as a context manager around one :func:`~dapo_megatron.policy.schedule.run_microbatches`
    call on ``micro_batches`` (padded ones, each with ``routed_experts [b, s, L, k]`` and
    ``seq_lengths``): the schedule forwards them in order and every router of the stage runs once
    per micro-batch, so the ``c``-th call of a router belongs to micro-batch ``c``. With sequence
    parallelism a router sees this TP rank's chunk of the (padded) sequence.
    ``sums()``: ``{"expert_agree_sum", "expert_slots"}`` (float64 tensors).
    """

    def __init__(self, model, micro_batches: list[dict]):
        self.routers = moe_routers(model)
        self.micro_batches = micro_batches
        self.calls = {id(r): 0 for r in self.routers}
        self.agree = torch.zeros((), dtype=torch.float64)
        self.slots = torch.zeros((), dtype=torch.float64)
        self._handles = []

    def __enter__(self) -> ExpertAgreement:
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, router, inputs, output) -> None:
        mb = self.micro_batches[self.calls[id(router)]]
        self.calls[id(router)] += 1
        routing_map = output[1]  # [tokens, E] bool, tokens sequence-major ([s, b] flattened)
        ids = mb["routed_experts"][:, :, router.layer_number - 1]  # [b, s, k]
        mask = routed_mask(mb["seq_lengths"], ids.shape[1])
        b = ids.shape[0]
        config = router.config
        split = config.tensor_model_parallel_size if config.sequence_parallel else 1
        width = routing_map.shape[0] * split // b  # the sequence as the model saw it (SP padding)
        ids = torch.nn.functional.pad(ids, (0, 0, 0, width - ids.shape[1]))
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
        ids, mask = ids.transpose(0, 1), mask.transpose(0, 1)  # [s, b, ...]
        if split > 1:
            from megatron.core import parallel_state as ps

            rank = ps.get_tensor_model_parallel_rank()
            ids, mask = ids.chunk(split, dim=0)[rank], mask.chunk(split, dim=0)[rank]
        ids = ids.reshape(-1, ids.shape[-1]).to(routing_map.device)
        mask = mask.reshape(-1).to(routing_map.device)
        hit = routing_map.gather(1, ids)[mask]  # [valid tokens, k]
        self.agree += hit.sum().double().cpu()
        self.slots += float(hit.numel())

    def sums(self) -> dict[str, torch.Tensor]:
        return {"expert_agree_sum": self.agree, "expert_slots": self.slots}
