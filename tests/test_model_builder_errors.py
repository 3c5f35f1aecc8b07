"""Bad models and layouts fail early with errors that name the field or tensor."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from dapo_megatron.models import arch_from_hf_config, padded_vocab_size, pipeline_layer_split
from dapo_megatron.parallel.layout import ParallelLayout
from tests._parity_ranks import load_error
from tests.helpers.distributed import run_on_ranks
from tests.helpers.tiny_models import tiny_hf_config


def test_unknown_architecture():
    cfg = tiny_hf_config("llama").to_dict()
    cfg["model_type"] = "gpt_neox"
    with pytest.raises(ValueError, match="model_type='gpt_neox'"):
        arch_from_hf_config(cfg)


def test_unsupported_rope_scaling():
    cfg = tiny_hf_config("llama").to_dict()
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    with pytest.raises(ValueError, match="rope_scaling"):
        arch_from_hf_config(cfg)


@pytest.mark.parametrize(
    "layout, match",
    [
        (ParallelLayout(tp=3), "must divide num_attention_heads=4"),
        (ParallelLayout(tp=4), "must divide num_key_value_heads=2"),
        (ParallelLayout(pp=4), "pipeline_model_parallel_size=4 is larger than num_hidden_layers=3"),
        (ParallelLayout(tp=1, sp=True), "sequence_parallel"),
    ],
)
def test_bad_layouts(layout, match):
    arch = arch_from_hf_config(tiny_hf_config("qwen2"))
    with pytest.raises(ValueError, match=match):
        layout.validate(arch)


def test_vocab_padding_and_layer_split():
    assert padded_vocab_size(1003, 1, 128) == 1024
    assert padded_vocab_size(1003, 2, 1) == 1004
    assert padded_vocab_size(151936, 8, 128) == 151936 + (-151936 % 1024)
    assert pipeline_layer_split(3, 2) == [2, 1]
    assert pipeline_layer_split(7, 3) == [3, 2, 2]
    assert sum(pipeline_layer_split(61, 8)) == 61


def _corrupt(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.mark.distributed
def test_missing_extra_and_misshaped_weights(tiny_hf_dirs, tmp_path):
    from pathlib import Path

    import torch

    src = Path(tiny_hf_dirs["qwen2"])
    missing = _corrupt(src, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    extra = _corrupt(
        src, tmp_path / "extra", lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2))
    )
    shaped = _corrupt(
        src,
        tmp_path / "shaped",
        lambda t: t.__setitem__("model.layers.2.self_attn.k_proj.weight", torch.zeros(8, 64)),
    )
    errors = [run_on_ranks(load_error, 1, d, timeout=300)[0] for d in (missing, extra, shaped)]
    assert errors[0] and "model.layers.1.mlp.up_proj.weight" in errors[0] and "missing" in errors[0]
    assert (
        errors[1] and "model.layers.0.mlp.extra.weight" in errors[1] and "no conversion mapping" in errors[1]
    )
    assert errors[2] and "model.layers.2.self_attn.k_proj.weight" in errors[2] and "(8, 64)" in errors[2]


def test_missing_shard_file(tiny_hf_dirs, tmp_path):
    from dapo_megatron.conversion import HFCheckpointReader

    d = tmp_path / "sharded"
    shutil.copytree(tiny_hf_dirs["llama"], d)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        HFCheckpointReader(d)
