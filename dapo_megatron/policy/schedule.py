"""Run micro-batches through Megatron-Core's own pipeline schedule.

``run_microbatches`` is the single entry point used for training (forward + backward) and for
no-grad passes (old log-probs, evaluation). Each micro-batch is a dict of CPU/GPU tensors with at
least ``input_ids [b, s]``; sequences are right-padded and attention is causal, so padding never
affects a valid position and no attention mask is needed.

``loss_fn(micro_batch, logits)`` is called on the last pipeline stage with this rank's vocab shard
of the logits ``[b, s, V/tp]``. For training it must return Megatron's 3-tuple
``(loss_sum, num_tokens, report)`` (``config.calculate_per_token_loss`` is on, so Megatron divides
the gradients by the token count summed over all micro-batches and data-parallel ranks). For
``forward_only=True`` it may return anything; the per-micro-batch results are returned in order.

Packed micro-batches (:func:`dapo_megatron.parallel.packing.pack_micro_batch`, ``input_ids
[1, T_local]`` plus a ``packed`` spec) are forwarded in THD with Megatron's ``PackedSeqParams``
(and this rank's CP group); their logits are ``[1, T_local, V/tp]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int, pad_values: dict[str, Any] | None = None):
    """Right-pad every ``[b, s, ...]`` tensor of ``batch`` so ``s`` is a multiple of ``multiple``
    (sequence parallelism splits the sequence over TP ranks)."""
    seq = batch["input_ids"].shape[1]
    extra = (-seq) % multiple
    if not extra:
        return batch
    pad_values = pad_values or {}
    out = {}
    for key, t in batch.items():
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == seq:
            pad = t.new_full((t.shape[0], extra, *t.shape[2:]), pad_values.get(key, 0))
            out[key] = torch.cat([t, pad], dim=1)
        else:
            out[key] = t
    return out


def _on_device(mb: dict, device: torch.device) -> dict:
    """The micro-batch's tensors on the model's device (no-op on CPU); other values unchanged."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def _forward_step(loss_fn, data_iterator, model):
    mb = next(data_iterator)
    if torch.cuda.is_available():
        mb = _on_device(mb, torch.device("cuda", torch.cuda.current_device()))
    if _replays_routing(model):
        # MoE routing replay: this micro-batch's recorded expert ids, or none (route afresh). A
        # model built without replay routes afresh; ids it is given are only measured
        # (routing_replay.ExpertAgreement).
        from dapo_megatron.policy.routing_replay import set_replay_targets

        set_replay_targets(model, mb.get("routed_experts"))
    input_ids = mb["input_ids"]
    position_ids = mb.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    packed = mb.get("packed")
    if packed is None:
        output = model(input_ids, position_ids, attention_mask=None)
    else:
        from megatron.core import parallel_state as ps

        params = packed.packed_seq_params(input_ids.device, ps.get_context_parallel_group())
        output = model(input_ids, position_ids, attention_mask=None, packed_seq_params=params)
    return output, partial(_loss_adapter, loss_fn, mb)


def _replays_routing(model) -> bool:
    while hasattr(model, "module"):
        model = model.module
    return bool(getattr(getattr(model, "config", None), "moe_enable_routing_replay", False))


def _loss_adapter(loss_fn, mb, output, non_loss_data: bool = False):
    return loss_fn(mb, output)


def run_microbatches(
    model,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    loss_fn: Callable[[dict, torch.Tensor], Any],
    *,
    forward_only: bool,
    sequence_parallel_multiple: int = 1,
) -> list[Any]:
    """Run ``micro_batches`` through the Megatron schedule for this model's layout.

    Every rank of a pipeline/tensor group must pass the same micro-batch shapes. Returns the list
    of ``loss_fn`` results (last pipeline stage only; other stages get ``[]``).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("run_microbatches: micro_batches is empty")
    if sequence_parallel_multiple > 1:  # packed micro-batches are padded per sequence already
        micro_batches = [
            mb if "packed" in mb else pad_to_multiple(mb, sequence_parallel_multiple) for mb in micro_batches
        ]
    seq_length = max(mb["input_ids"].shape[1] for mb in micro_batches)
    micro_batch_size = max(mb["input_ids"].shape[0] for mb in micro_batches)
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iter(micro_batches),
        model=[model] if not isinstance(model, list) else model,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )
