"""Named tensors packed into flat byte buckets, for weight transfer to an engine in another process.

With vLLM on GPU the engine core (and its workers) run in their own processes. Pickling full
tensors through ``collective_rpc`` copies every weight through host memory; instead each bucket of
weights is copied into one flat CUDA ``uint8`` buffer, the buffer is shared by a CUDA IPC handle
(``torch.multiprocessing.reductions.reduce_tensor``, the mechanism ``torch.multiprocessing`` uses
for CUDA tensors), and only the handle and the layout (name, dtype, shape, byte offset of each
tensor) cross the RPC. The worker rebuilds the buffer on its own device index, takes views of it and
calls ``model.load_weights`` (:meth:`~dapo_megatron.rollout.vllm_worker.WeightSyncExtension.load_weights_from_ipc`).
verl (``BucketedWeightSender``) and NeMo-RL (IPC handles per refit) do the same.

Everything here except :func:`ipc_payload` / :func:`open_ipc_payload` on CUDA tensors runs on CPU
tensors as well, so the bucketing and layout are unit-tested without a GPU.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

ALIGN_BYTES = 256  # every tensor starts at a multiple of this in its bucket (any dtype view is aligned)


@dataclass(frozen=True)
class BucketEntry:
    """Where one tensor lives in a bucket's flat ``uint8`` buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer; a multiple of ALIGN_BYTES
    nbytes: int


def _aligned(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of ``named_tensors`` (order kept) whose aligned sizes sum to at most
    ``bucket_bytes``; a tensor larger than ``bucket_bytes`` is a bucket of its own. Lazy: a bucket
    is yielded as soon as it is full, so a streaming export is never materialised whole."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        need = _aligned(tensor.numel() * tensor.element_size())
        if bucket and size + need > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += need
    if bucket:
        yield bucket


def pack_bucket(
    bucket: list[tuple[str, torch.Tensor]], device: torch.device | str | None = None
) -> tuple[torch.Tensor, list[BucketEntry]]:
    """Copy ``bucket`` into one flat ``uint8`` tensor on ``device`` (default: the first tensor's)
    and return it with the layout. The tensors may have different dtypes and devices."""
    if not bucket:
        raise ValueError("pack_bucket: empty bucket")
    for name, tensor in bucket:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"pack_bucket: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    device = torch.device(device) if device is not None else bucket[0][1].device
    entries, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(BucketEntry(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        offset += _aligned(nbytes)
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for entry, (_, tensor) in zip(entries, bucket):
        _view(flat, entry).copy_(tensor.detach(), non_blocking=True)
    return flat, entries


def _view(flat: torch.Tensor, entry: BucketEntry) -> torch.Tensor:
    return flat[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)


def unpack_bucket(flat: torch.Tensor, entries: list[BucketEntry]) -> list[tuple[str, torch.Tensor]]:
    """``(name, view)`` of every tensor of a packed bucket (views into ``flat``, no copy)."""
    if entries and entries[-1].offset + entries[-1].nbytes > flat.numel():
        raise ValueError(
            f"unpack_bucket: {entries[-1].name!r} ends at byte {entries[-1].offset + entries[-1].nbytes} "
            f"of a {flat.numel()}-byte buffer"
        )
    return [(e.name, _view(flat, e)) for e in entries]


def ipc_payload(flat: torch.Tensor, entries: list[BucketEntry]) -> bytes:
    """Bytes for ``collective_rpc``: the IPC handle of ``flat`` (``reduce_tensor``), the UUID of the
    GPU that holds it, and the layout. The sender must keep ``flat`` alive, and its writes finished
    (``torch.cuda.synchronize``), until the receiver is done with it."""
    from torch.multiprocessing.reductions import reduce_tensor

    uuid = str(torch.cuda.get_device_properties(flat.device).uuid) if flat.is_cuda else None
    return pickle.dumps((reduce_tensor(flat), uuid, entries))


def local_device_index(uuid: str, visible_uuids: list[str]) -> int:
    """This process's index of the GPU ``uuid`` (processes number GPUs differently when
    ``CUDA_VISIBLE_DEVICES`` differs: an engine worker need not see the sender's GPU as its ``0``)."""
    if uuid not in visible_uuids:
        raise RuntimeError(
            f"weight sync over CUDA IPC: the sender's GPU {uuid} is not visible to this engine "
            f"process (visible: {visible_uuids}); the engine's GPUs must include the sender's"
        )
    return visible_uuids.index(uuid)


def open_ipc_payload(payload: bytes) -> tuple[torch.Tensor, list[BucketEntry]]:
    """The receiver's side of :func:`ipc_payload`: the shared buffer and the layout. A CUDA handle is
    opened on this process's index of the sender's GPU (:func:`local_device_index`)."""
    (rebuild, args), uuid, entries = pickle.loads(payload)
    if uuid is not None:
        args = list(args)
        visible = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        args[6] = local_device_index(uuid, visible)  # rebuild_cuda_tensor(..., storage_device, handle, ...)
    return rebuild(*args), entries
