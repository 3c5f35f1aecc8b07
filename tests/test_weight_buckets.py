"""Bucketing and layout of the CUDA-IPC weight transfer (:mod:`dapo_megatron.rollout.weight_buckets`),
on CPU tensors: everything but opening a CUDA IPC handle (tests/test_weight_sync.py, marked gpu)."""

from __future__ import annotations

import pickle

import pytest
import torch

from dapo_megatron.rollout.weight_buckets import (
    ALIGN_BYTES,
    iter_buckets,
    local_device_index,
    open_ipc_payload,
    pack_bucket,
    unpack_bucket,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(37, 16, generator=g)),  # 2368 bytes, not aligned
        ("model.layers.0.input_layernorm.weight", torch.randn(16, generator=g).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g).to(torch.float16)),
        ("step", torch.tensor(3, dtype=torch.int64)),  # 0-dim
        ("empty", torch.zeros(0, 4)),
        ("model.norm.weight", torch.randn(16, generator=g)),
    ]


def test_buckets_keep_order_and_respect_the_size():
    items = _tensors()
    buckets = list(iter_buckets(items, bucket_bytes=2560))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in items]  # every tensor once, in order
    # embed (2368 -> 2560 aligned) fills the first bucket; the small ones share the second
    assert [[n for n, _ in b] for b in buckets][0] == ["model.embed_tokens.weight"]
    for b in buckets:
        assert (
            len(b) == 1
            or sum(-(-t.numel() * t.element_size() // ALIGN_BYTES) * ALIGN_BYTES for _, t in b) <= 2560
        )
    # a tensor larger than the bucket travels alone
    assert [len(b) for b in iter_buckets(items, bucket_bytes=300)][0] == 1
    assert len(list(iter_buckets(items, bucket_bytes=1 << 20))) == 1
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(items, bucket_bytes=0))


def test_pack_unpack_is_bitwise_and_aligned():
    items = _tensors()
    flat, entries = pack_bucket(items)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert all(e.offset % ALIGN_BYTES == 0 for e in entries)
    out = unpack_bucket(flat, entries)
    assert [n for n, _ in out] == [n for n, _ in items]
    for (name, want), (_, got) in zip(items, out):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    # views, not copies: what the worker loads is the shared buffer itself
    assert out[0][1].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="model.norm.weight"):
        unpack_bucket(flat[: entries[-1].offset], entries)
    with pytest.raises(TypeError, match="'bad'"):
        pack_bucket([("bad", [1.0, 2.0])])


def test_payload_round_trip_and_device_mapping():
    """The payload format (handle, GPU UUID, layout) through pickle; a CPU tensor's handle is a
    plain copy, so this checks the framing and the layout travel, not CUDA IPC itself."""
    from torch.multiprocessing.reductions import reduce_tensor

    items = _tensors()
    flat, entries = pack_bucket(items)
    payload = pickle.dumps((reduce_tensor(flat), None, entries))
    got_flat, got_entries = open_ipc_payload(payload)
    assert got_entries == entries
    for (name, want), (_, got) in zip(items, unpack_bucket(got_flat, got_entries)):
        assert torch.equal(got, want), name
    # the receiving process numbers GPUs by its own CUDA_VISIBLE_DEVICES
    assert local_device_index("GPU-b", ["GPU-a", "GPU-b"]) == 1
    with pytest.raises(RuntimeError, match="GPU-c is not visible"):
        local_device_index("GPU-c", ["GPU-a", "GPU-b"])
