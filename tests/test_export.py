"""HF -> sharded Megatron (in memory) -> HF is bitwise exact for every architecture and layout."""

import pytest
import torch
from safetensors.torch import load_file

from tests._parity_ranks import export_roundtrip
from tests.helpers.distributed import run_on_ranks


@pytest.mark.distributed
@pytest.mark.parametrize("world, tp, pp", [(1, 1, 1), (4, 2, 2)])
def test_export_roundtrip_bitwise(world, tp, pp, tiny_hf_dirs):
    results = run_on_ranks(export_roundtrip, world, tiny_hf_dirs, tp, pp, timeout=600)
    exported = results[0]
    for arch, d in tiny_hf_dirs.items():
        ref = load_file(f"{d}/model.safetensors")
        assert sorted(exported[arch]) == sorted(ref), f"{arch}: tensor names differ"
        for name, t in ref.items():
            got = exported[arch][name]
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert torch.equal(got, t), f"{arch}: {name} differs after round trip"
    # every rank of the group yields the same names
    for r in results[1:]:
        assert r == sorted(exported["llama"])
