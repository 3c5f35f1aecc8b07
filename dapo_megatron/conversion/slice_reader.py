"""Read arbitrary slices of a Megatron-Core torch_dist checkpoint in one process, without Megatron's
load path (which wants every rank's whole share of each key).

Megatron stores a stacked parameter (e.g. ``decoder.layers.self_attention.linear_qkv.weight`` of
shape ``[num_layers, ...]``) as one key with chunks at global offsets. :func:`read_sharded` takes
the ``ShardedTensor`` / ``ShardedTensorFactory`` objects of a model built on the meta device (so
keys, offsets and factory merges are exactly Megatron's) and reads only the chunks they cover,
with ``torch.distributed.checkpoint`` and a small load planner.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


class _SliceLoadPlanner(LoadPlanner):
    """Reads ``requests[uid] = (checkpoint key, global offsets, destination view)``."""

    def __init__(self, requests: dict[str, tuple[str, tuple[int, ...], torch.Tensor]]):
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for uid, (key, offsets, dest) in self.requests.items():
            md = self.metadata.state_dict_metadata.get(key)
            if md is None:
                raise KeyError(f"tensor key {key!r} is not in the checkpoint")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            for item in create_read_items_for_chunk_list(key, md, [chunk]):
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(uid, item.dest_index.offset)))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise RuntimeError(f"unexpected non-tensor read of {read_item.storage_index.fqn!r}")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.requests[read_item.dest_index.fqn][2]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # read in place


def read_sharded(entries: dict, ckpt_dir: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load ``{name: ShardedTensor | ShardedTensorFactory}`` (data on any device, e.g. meta) from
    ``ckpt_dir``; return ``{name: tensor}`` with factories merged as Megatron would."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    requests: dict[str, tuple[str, tuple[int, ...], torch.Tensor]] = {}

    def allocate(sh):
        if not isinstance(sh, ShardedTensor):
            raise TypeError(f"cannot read {type(sh).__name__} {getattr(sh, 'key', sh)!r}")
        if sh.flattened_range is not None:
            raise NotImplementedError(
                f"{sh.key!r}: flattened (distributed-optimizer) tensors are not supported"
            )
        out = torch.empty(sh.local_shape, dtype=sh.dtype, device=device)
        view = out.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
        requests[f"r{len(requests)}"] = (sh.key, tuple(sh.global_offset), view)
        return out

    built = {k: (v.build() if isinstance(v, ShardedTensorFactory) else v) for k, v in entries.items()}
    loaded = dict_list_map_outplace(allocate, built)
    assert len(requests) == len(list(nested_values(built)))
    dcp_load(
        {}, storage_reader=FileSystemReader(str(ckpt_dir)), planner=_SliceLoadPlanner(requests), no_dist=True
    )
    return {
        k: (entries[k].merge_fn(loaded[k]) if isinstance(entries[k], ShardedTensorFactory) else loaded[k])
        for k in entries
    }
