"""Write a Megatron-Core torch_dist checkpoint straight from HF safetensors, without a model.

``dist_checkpointing.save`` needs the model built (and its weights materialised) on every rank.
Here the *keys* come from Megatron itself - ``sharded_state_dict()`` of a TP1/PP1 model built on the
meta device gives every global key, global shape, stacked-layer offset, GLU factory split and
``_extra_state`` object - and the *data* of each stored chunk is produced on demand while
``torch.distributed.checkpoint`` writes it:

* :class:`_LazySavePlanner` plans one write item per chunk; ``resolve_data`` reads the HF tensors of
  that parameter (plain file reads, no memory map), applies the table's transform at TP1, casts,
  and returns the chunk. Only the current parameter's tensors and the next one's (read ahead by
  one background thread while the current one is written) are alive.
* :class:`_SequentialWriter` writes the items in plan order into one ``.distcp`` file and drops
  each tensor at once (torch's own writer keeps every tensor of a file until the file ends).

Chunks follow the layout a ``tp``-way save would write (each parameter split over TP ranks along
its TP dimension), further split where a parameter is a concatenation of independent parts (GLU
gate/up, vocabulary padding) so that no part is copied just to be concatenated. Chunking is only a
storage layout: Megatron reshards on load at any TP/PP. ``metadata.json`` and ``common.pt`` are
written with Megatron's own helpers, as ``dist_checkpointing.save`` writes them.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

from dapo_megatron.conversion.hf_io import HFCheckpointReader
from dapo_megatron.conversion.tables import NameResolver, WeightMapping, mappings_for
from dapo_megatron.conversion.transforms import (
    FusedQKV,
    GatedMLP,
    Replicated,
    ShardContext,
    TPSplit,
    VocabParallel,
)
from dapo_megatron.models.hf_arch import ModelArch


def _tp_dim(transform) -> int | None:
    """The dimension a parameter is split along over TP ranks (None: replicated / unknown)."""
    if isinstance(transform, TPSplit):
        return transform.dim
    if isinstance(transform, (VocabParallel, FusedQKV, GatedMLP)):
        return 0
    if isinstance(transform, Replicated):
        return None
    return None  # an unknown transform is stored whole; still loads at any TP


def _part_bounds(row: WeightMapping, ctx: ShardContext) -> list[int]:
    """Row offsets (dim 0 of the TP1 parameter) where independent parts begin."""
    if isinstance(row.transform, GatedMLP):
        return [0, row.transform.ffn_size(ctx)]
    if isinstance(row.transform, VocabParallel) and ctx.padded_vocab_size > ctx.arch.vocab_size:
        return [0, ctx.arch.vocab_size]
    return [0]


def _parts(row: WeightMapping, layer, reader: HFCheckpointReader, ctx: ShardContext, dtype) -> list:
    """The TP1 parameter as ``[(row offset, tensor), ...]`` parts (see :func:`_part_bounds`)."""
    names = row.hf_names(layer)
    tensors = [reader.read(n) for n in names]
    row.transform.check(names, tensors, ctx)
    if isinstance(row.transform, GatedMLP):
        gate, up = (t.to(dtype) for t in tensors)
        return [(0, gate), (gate.shape[0], up)]
    if isinstance(row.transform, VocabParallel) and ctx.padded_vocab_size > tensors[0].shape[0]:
        emb = tensors[0].to(dtype)
        pad = emb.new_zeros(ctx.padded_vocab_size - emb.shape[0], *emb.shape[1:])
        return [(0, emb), (emb.shape[0], pad)]
    return [(0, row.transform.to_shard(names, tensors, ctx).to(dtype))]


@dataclasses.dataclass
class _Chunk:
    """One stored chunk: ``param[region]`` (TP1 coordinates) at ``offsets`` of checkpoint ``key``."""

    key: str
    param: str  # Megatron parameter name (global layer index)
    region: tuple[tuple[int, int], ...]  # (start, length) per parameter dim
    offsets: tuple[int, ...]  # global offsets in the stored key (prepended axes first)
    sizes: tuple[int, ...]  # chunk shape in the stored key (prepended axes of size 1)
    global_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.sizes).numel() * self.dtype.itemsize


def _splits(length: int, pieces: int) -> list[tuple[int, int]]:
    step = length // pieces
    return [(i * step, step) for i in range(pieces)]


def _cut(intervals: list[tuple[int, int]], bounds: list[int]) -> list[tuple[int, int]]:
    """Split ``(start, length)`` intervals further at ``bounds``."""
    out = []
    for start, length in intervals:
        cuts = sorted({start, start + length, *(b for b in bounds if start < b < start + length)})
        out.extend((a, b - a) for a, b in zip(cuts, cuts[1:]))
    return out


@dataclasses.dataclass
class StreamPlan:
    chunks: list[_Chunk]
    objects: dict[str, bytes]  # ShardedObject unique key -> serialized data (``_extra_state``)
    common: dict  # what dist_checkpointing.save puts into common.pt
    rows: dict[str, tuple[WeightMapping, int | None]]  # param -> (row, global layer)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)


def plan_checkpoint(arch: ModelArch, *, tp: int, dtype: str, padded_vocab_size: int) -> StreamPlan:
    """Every chunk a ``tp``-way save of ``arch`` writes, from a TP1/PP1 model on the meta device.

    Needs Megatron's parallel state initialised at TP1/PP1 (one rank).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
        is_main_replica,
    )
    from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base

    from dapo_megatron.models import build_gpt_model, transformer_config_from_arch
    from dapo_megatron.models.builder import have_transformer_engine
    from dapo_megatron.parallel.layout import ParallelLayout

    config = transformer_config_from_arch(arch, ParallelLayout(), dtype=dtype, perform_initialization=False)
    with torch.device("meta"):
        model = build_gpt_model(arch, config, vocab_pad_multiple=padded_vocab_size)
    sharded = model.sharded_state_dict()
    resolver = NameResolver(mappings_for(arch, transformer_engine=have_transformer_engine()))
    ctx = ShardContext(arch=arch, tp_rank=0, tp_size=1, padded_vocab_size=padded_vocab_size)

    chunks: list[_Chunk] = []
    objects: dict[str, bytes] = {}
    rows: dict[str, tuple[WeightMapping, int | None]] = {}
    for name, entry in list(sharded.items()):
        if isinstance(entry, ShardedObject):
            data = entry.data
            if isinstance(data, torch.Tensor) and data.is_meta:
                if data.numel():
                    raise NotImplementedError(f"{name}: non-empty extra state on the meta device")
                data = torch.empty(data.shape, dtype=data.dtype)
            buf = io.BytesIO()
            torch.save([data], buf)  # as Megatron's torch_dist strategy packs ShardedObjects
            objects[entry.unique_key] = buf.getvalue()
            continue
        if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            continue
        row, layer = resolver.megatron(name)
        rows[name] = (row, layer)
        built = entry.build() if isinstance(entry, ShardedTensorFactory) else entry
        subs = list(nested_values(built)) if isinstance(built, (dict, list)) else [built]
        tp_dim, bounds = _tp_dim(row.transform), _part_bounds(row, ctx)
        for sub in subs:
            if not isinstance(sub, ShardedTensor) or sub.flattened_range is not None:
                raise NotImplementedError(f"{name}: unsupported sharded entry {type(sub).__name__}")
            if not is_main_replica(sub.replica_id):
                continue  # written by its main replica
            # At TP1 a sub-tensor's global offsets past the stacked-layer axes are its position in
            # the parameter (0 for a whole parameter; the GLU factory's up half starts at ffn).
            pre = sub.prepend_axis_num
            per_dim = [[(o, s)] for o, s in zip(sub.global_offset[pre:], sub.local_shape)]
            if tp_dim is not None and tp > 1:
                o, s = per_dim[tp_dim][0]
                per_dim[tp_dim] = [(o + a, b) for a, b in _splits(s, tp)]
            if per_dim:
                per_dim[0] = _cut(per_dim[0], bounds)
            regions: list[tuple[tuple[int, int], ...]] = [()]
            for intervals in per_dim:
                regions = [r + (iv,) for r in regions for iv in intervals]
            for region in regions:
                chunks.append(
                    _Chunk(
                        key=sub.key,
                        param=name,
                        region=region,
                        offsets=tuple(sub.global_offset[:pre]) + tuple(start for start, _ in region),
                        sizes=(1,) * pre + tuple(length for _, length in region),
                        global_shape=tuple(sub.global_shape),
                        dtype=sub.dtype,
                    )
                )
    _, rest = extract_sharded_base(sharded)
    _, common = extract_nonpersistent(rest)
    if any(isinstance(v, torch.Tensor) for v in nested_values(common)):
        raise NotImplementedError("tensors in the common (non-sharded) state are not supported")
    return StreamPlan(chunks=chunks, objects=objects, common=common, rows=rows)


def _index(fqn: str, offsets) -> MetadataIndex:
    return MetadataIndex(fqn=fqn, offset=torch.Size(offsets))


class _LazySavePlanner(SavePlanner):
    """Plans the chunks of a :class:`StreamPlan`; produces each chunk's data when it is written."""

    def __init__(self, plan: StreamPlan, resolve: Callable[[_Chunk], torch.Tensor]):
        self.stream_plan, self.resolve = plan, resolve
        self.by_index = {_index(c.key, c.offsets): c for c in plan.chunks}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.storage_meta = storage_meta

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(index=MetadataIndex(fqn=key), type=WriteItemType.BYTE_IO)
            for key in self.stream_plan.objects
        ]
        items += [
            WriteItem(
                index=_index(c.key, c.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self.stream_plan.chunks
        ]
        return SavePlan(items)

    def create_global_plan(self, all_plans):
        plans, metadata = create_default_global_save_plan(all_plans, rewrite_index_hints=False)
        metadata = dataclasses.replace(metadata, storage_meta=self.storage_meta)
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.stream_plan.objects[write_item.index.fqn])
        return self.resolve(self.by_index[_index(write_item.index.fqn, write_item.index.offset)])


class _SequentialWriter(FileSystemWriter):
    """All items, in plan order, into one ``.distcp`` file; each tensor is dropped once written.

    ``on_write(nbytes)`` is called after every item (progress).
    """

    def __init__(self, path, *, on_write: Callable[[int], None] | None = None, sync_files: bool = True):
        super().__init__(path, single_file_per_rank=True, sync_files=sync_files, thread_count=1)
        self.on_write = on_write

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future:
        file_name = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with open(Path(self.path) / file_name, "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                    nbytes = 0
                else:
                    data = data.detach().contiguous()
                    if data.untyped_storage().nbytes() != data.nbytes:
                        data = data.clone()  # torch.save writes the whole storage of a view
                    expected = tuple(item.tensor_data.chunk.sizes)
                    if tuple(data.shape) != expected:
                        raise RuntimeError(f"{item.index.fqn}: chunk shape {tuple(data.shape)} != {expected}")
                    torch.save(data, stream)
                    nbytes = data.nbytes
                length = stream.tell() - offset
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=length,
                        storage_data=_StorageInfo(file_name, offset, length),
                    )
                )
                del data
                if self.on_write is not None and nbytes:
                    self.on_write(nbytes)
            if self.sync_files:
                stream.flush()
                os.fsync(stream.fileno())
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(results)
        return fut


def write_checkpoint_from_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    arch: ModelArch,
    *,
    tp: int,
    dtype: str,
    padded_vocab_size: int,
    progress: bool = False,
    sync_files: bool = True,
) -> dict:
    """Write the torch_dist checkpoint of the HF model in ``hf_dir`` into the existing, empty
    ``out_dir`` (``metadata.json``, ``common.pt``, ``.metadata``, ``__0_0.distcp``), one chunk at a
    time. Call in a process with Megatron's parallel state initialised at TP1/PP1."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_common_strategy,
        get_default_save_sharded_strategy,
    )
    from torch.distributed.checkpoint import save as dcp_save

    plan = plan_checkpoint(arch, tp=tp, dtype=dtype, padded_vocab_size=padded_vocab_size)
    reader = HFCheckpointReader(hf_dir)
    ctx = ShardContext(arch=arch, tp_rank=0, tp_size=1, padded_vocab_size=padded_vocab_size)
    # Chunks of one parameter are consecutive. One background thread reads and transforms the next
    # parameter while the current one is written (file reads and writes release the GIL), so at
    # most two parameters are alive; only that thread touches the reader.
    order = list(dict.fromkeys(c.param for c in plan.chunks))
    position = {name: i for i, name in enumerate(order)}
    dtypes = {c.param: c.dtype for c in plan.chunks}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-read")
    cache: dict[str, Future] = {}

    def load(param: str) -> list:
        row, layer = plan.rows[param]
        return _parts(row, layer, reader, ctx, dtypes[param])

    def parts_of(param: str) -> list:
        i = position[param]
        for name in list(cache):
            if position[name] < i:
                del cache[name]  # done with it
        for name in order[i : i + 2]:
            if name not in cache:
                cache[name] = pool.submit(load, name)
        return cache[param].result()

    def resolve(chunk: _Chunk) -> torch.Tensor:
        start0, len0 = chunk.region[0] if chunk.region else (0, 0)
        for off, part in parts_of(chunk.param):
            if off <= start0 and start0 + len0 <= off + (part.shape[0] if part.dim() else 1):
                t = part
                for d, (start, length) in enumerate(chunk.region):
                    t = t.narrow(d, start - (off if d == 0 else 0), length)
                return t.reshape(chunk.sizes)
        raise RuntimeError(f"{chunk.param}: chunk {chunk.region} spans several parts")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=plan.nbytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="hf->megatron",
            smoothing=0.1,
        )
    sharded_strategy = get_default_save_sharded_strategy()
    get_default_save_common_strategy().save_common(plan.common, out_dir)
    writer = _SequentialWriter(str(out_dir), on_write=bar.update if bar else None, sync_files=sync_files)
    try:
        dcp_save({}, storage_writer=writer, planner=_LazySavePlanner(plan, resolve), no_dist=True)
    finally:
        for fut in cache.values():
            fut.cancel()
        pool.shutdown(wait=True)
        cache.clear()
        reader.close()
        if bar is not None:
            bar.close()
    save_config(CheckpointingConfig(sharded_strategy.backend, sharded_strategy.version), str(out_dir))
    return {"bytes": plan.nbytes, "chunks": len(plan.chunks)}
