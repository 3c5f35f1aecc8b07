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
