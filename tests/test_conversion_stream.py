"""The streaming HF -> Megatron writer (default) against the reference path that builds the model on
TP x PP ranks and calls ``dist_checkpointing.save`` (``materialize=True``): same keys, global shapes,
dtypes, chunk layout (up to the extra split at the vocabulary padding) and, read back whole, the
same values bit for bit. Loading at other layouts is covered by tests/test_conversion_tools.py,
which converts with the streaming writer.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

pytestmark = pytest.mark.distributed


def _read_all(ckpt: Path) -> tuple[dict, dict]:
    """``({key: whole tensor or raw bytes}, {key: sorted chunk offsets})``."""
    md = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    state, chunks = {}, {}
    for key, m in md.items():
        if isinstance(m, BytesStorageMetadata):
            continue
        state[key] = torch.empty(m.size, dtype=m.properties.dtype)
        chunks[key] = sorted(tuple(c.offsets) for c in m.chunks)
    dcp_load(state, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    raw = {k: None for k, m in md.items() if isinstance(m, BytesStorageMetadata)}
    return {**state, **raw}, chunks


@pytest.mark.parametrize("dtype", ["bf16"])
def test_stream_matches_materialized(tiny_hf_dirs, tmp_path, dtype):
    from dapo_megatron.conversion.checkpoint import validate_checkpoint
    from dapo_megatron.conversion.convert import convert_hf_to_megatron_many

    archs = ["llama", "qwen2-tied", "qwen3"]
    stream = {a: tmp_path / f"{a}.stream" for a in archs}
    ref = {a: tmp_path / f"{a}.ref" for a in archs}
    kw = dict(tp=2, pp=2, dtype=dtype, hash_sources=False, timeout=600)
    convert_hf_to_megatron_many([(tiny_hf_dirs[a], stream[a]) for a in archs], **kw)
    convert_hf_to_megatron_many([(tiny_hf_dirs[a], ref[a]) for a in archs], materialize=True, **kw)
    for a in archs:
        _, meta_s = validate_checkpoint(stream[a])
        _, meta_r = validate_checkpoint(ref[a])
        assert meta_s == meta_r
        assert json.loads((stream[a] / "metadata.json").read_text()) == json.loads(
            (ref[a] / "metadata.json").read_text()
        )
        assert torch.load(stream[a] / "common.pt") == torch.load(ref[a] / "common.pt")
        got, got_chunks = _read_all(stream[a])
        want, want_chunks = _read_all(ref[a])
        assert sorted(got) == sorted(want), f"{a}: keys differ: {set(got) ^ set(want)}"
        for key, t in want.items():
            if t is None:
                continue
            assert got[key].dtype == t.dtype and got[key].shape == t.shape, f"{a}: {key}"
            assert torch.equal(got[key], t), f"{a}: {key} differs"
            if key not in ("embedding.word_embeddings.weight", "output_layer.weight"):
                assert got_chunks[key] == want_chunks[key], f"{a}: {key} chunk layout"
            else:  # the streaming writer also splits at the vocabulary padding
                assert set(want_chunks[key]) <= set(got_chunks[key]), f"{a}: {key} chunk layout"


def test_reader_read_matches_safetensors(tiny_hf_dirs):
    from safetensors.torch import load_file

    from dapo_megatron.conversion.hf_io import HFCheckpointReader

    d = tiny_hf_dirs["qwen3"]
    ref = load_file(Path(d, "model.safetensors"))
    reader = HFCheckpointReader(d)
    for name, t in ref.items():
        got = reader.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    reader.close()
