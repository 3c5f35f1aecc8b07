"""Stream HF-named full tensors out of a sharded Megatron-Core model (weight sync, export, tests).

Each pipeline stage all-gathers its TP shards, undoes the transforms of the conversion table
(fused QKV, gated MLP, vocab padding) and broadcasts the resulting HF tensors to the other stages
of its pipeline group, in buckets of bounded size. Every rank of the TP x PP group then yields the
same ``(hf_name, tensor)`` sequence, in table order, stage by stage. Data-parallel replicas do
this independently. With one process it is a plain, collective-free walk over the parameters.

Mixture of experts: an expert-parallel rank holds only its own experts, so within a stage each
bucket's expert tensors are broadcast from their owner over the expert-parallel group (which lies
within the stage) before the bucket goes down the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from dapo_megatron.conversion.names import (
    expert_offset,
    is_expert_param,
    shift_expert,
    shift_layer,
    stage_layer_offset,
    unwrap_model,
)
from dapo_megatron.conversion.tables import NameResolver, mappings_for
from dapo_megatron.conversion.transforms import ShardContext
from dapo_megatron.models.builder import have_transformer_engine
from dapo_megatron.models.hf_arch import ModelArch

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def iter_hf_tensors(
    model,
    arch: ModelArch,
    *,
    padded_vocab_size: int,
    tp_group=None,
    pp_group=None,
    ep_group=None,
    getter: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the whole model on every rank of the TP x PP group.

    ``getter`` picks what to export per parameter (default: the parameter itself; e.g.
    ``lambda p: p.main_grad`` exports gradients through the same tables). ``dtype`` casts the
    result (default: the parameter's dtype). Tied embeddings are yielded once, as HF stores them.
    """
    getter = getter or (lambda p: p.data)
    model = unwrap_model(model)
    tp, pp, ep = _world(tp_group), _world(pp_group), _world(ep_group)
    ctx = ShardContext(arch=arch, tp_rank=_rank(tp_group), tp_size=tp, padded_vocab_size=padded_vocab_size)
    resolver = NameResolver(mappings_for(arch, transformer_engine=have_transformer_engine()))
    offset = stage_layer_offset(model)
    ep_rank, my_experts = _rank(ep_group), expert_offset(model)
    local_experts = arch.num_experts // ep if arch.is_moe else 0

    local = []  # (row, layer, param, owner EP rank or None) of this stage, in parameter order
    meta = []  # per entry: [(hf_name, shape, dtype)] computed on the meta device
    for local_name, param in model.named_parameters():
        name = shift_layer(local_name, offset)
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # HF stores the tied matrix once, as the embedding
        if ep > 1 and is_expert_param(name):
            # The same local expert slot on every EP rank: one entry per owner, same order everywhere.
            owned = [(shift_expert(name, o * local_experts), o) for o in range(ep)]
        else:
            owned = [(shift_expert(name, my_experts), None)]
        for global_name, owner in owned:
            row, layer = resolver.megatron(global_name)
            out_dtype = dtype or param.dtype
            fake = [torch.empty(param.shape, device="meta") for _ in range(tp)]
            hf_shapes = [tuple(t.shape) for t in row.transform.from_shards(fake, ctx)]
            local.append((row, layer, param if owner in (None, ep_rank) else None, owner))
            meta.append([(n, s, out_dtype) for n, s in zip(row.hf_names(layer), hf_shapes)])

    if pp > 1:
        all_meta: list = [None] * pp
        dist.all_gather_object(all_meta, meta, group=pp_group)
    else:
        all_meta = [meta]
    my_stage = _rank(pp_group)

    for stage, stage_meta in enumerate(all_meta):
        src = dist.get_global_rank(pp_group, stage) if pp > 1 else None
        is_src = stage == my_stage
        for bucket in _buckets(stage_meta, bucket_bytes):
            metas, tensors, owners = [], [], []
            for i in bucket:
                metas.extend(stage_meta[i])
                if is_src:
                    row, _, param, owner = local[i]
                    owners.extend([owner] * len(stage_meta[i]))
                    if param is not None:
                        tensors.extend(
                            _gather_hf(row, getter(param).detach(), ctx, tp_group, stage_meta[i][0][2])
                        )
                    else:
                        tensors.extend([None] * len(stage_meta[i]))
                else:
                    tensors.extend([None] * len(stage_meta[i]))
            if is_src and ep > 1:
                tensors = _share_experts(metas, tensors, owners, ep_group)
            yield from _broadcast_bucket(metas, tensors, is_src, src, pp_group)


def _buckets(stage_meta, bucket_bytes: int) -> list[list[int]]:
    """Group consecutive parameters (all HF tensors of one parameter together) up to ``bucket_bytes``."""
    buckets: list[list[int]] = [[]]
    size = 0
    for i, entries in enumerate(stage_meta):
        nbytes = sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in entries)
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return [b for b in buckets if b]


def _gather_hf(row, shard: torch.Tensor, ctx: ShardContext, tp_group, dtype) -> list[torch.Tensor]:
    """All-gather one parameter's TP shards and undo its transform into HF tensors."""
    if ctx.tp_size > 1:
        shards = [torch.empty_like(shard) for _ in range(ctx.tp_size)]
        dist.all_gather(shards, shard.contiguous(), group=tp_group)
    else:
        shards = [shard]
    return [t.to(dtype) for t in row.transform.from_shards(shards, ctx)]


def _share_experts(bucket_meta, tensors, owners, ep_group) -> list:
    """Fill in the expert tensors other EP ranks own: one flat broadcast per (owner, dtype)."""
    out = list(tensors)
    me = _rank(ep_group)
    for owner in sorted({o for o in owners if o is not None}):
        idx = [i for i, o in enumerate(owners) if o == owner]
        received = _broadcast_flat(
            [bucket_meta[i] for i in idx],
            [tensors[i] for i in idx],
            owner == me,
            dist.get_global_rank(ep_group, owner),
            ep_group,
        )
        for i, t in zip(idx, received):
            out[i] = t
    return out


def _broadcast_flat(bucket_meta, tensors, is_src: bool, src: int, group) -> list[torch.Tensor]:
    """Broadcast ``tensors`` (on the source) described by ``bucket_meta`` over ``group``."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (_, _, dt) in enumerate(bucket_meta):
        by_dtype.setdefault(dt, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(bucket_meta)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    for dt, idx in by_dtype.items():
        sizes = [torch.Size(bucket_meta[i][1]).numel() for i in idx]
        if is_src:
            flat = torch.cat([tensors[i].reshape(-1).to(device) for i in idx])
        else:
            flat = torch.empty(sum(sizes), dtype=dt, device=device)
        dist.broadcast(flat, src=src, group=group)
        for i, part in zip(idx, flat.split(sizes)):
            out[i] = part.view(bucket_meta[i][1])
    return out  # type: ignore[return-value]


def _broadcast_bucket(bucket_meta, tensors, is_src: bool, src, pp_group):
    if src is None:  # no pipeline parallelism: nothing to send
        for (name, _, _), t in zip(bucket_meta, tensors):
            yield name, t
        return
    # One flat buffer per dtype: a few large broadcasts instead of many small ones.
    out = _broadcast_flat(bucket_meta, tensors, is_src, src, pp_group)
    for (name, _, _), t in zip(bucket_meta, out):
        yield name, t
