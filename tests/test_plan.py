"""The memory plan: exact parameter counts, the example configs fit 80 GB GPUs, bad layouts are named."""

from pathlib import Path

import pytest
import torch

from dapo_megatron.config import load_config
from dapo_megatron.models.hf_arch import arch_from_hf_config
from dapo_megatron.plan import count_parameters, main, memory_plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2-tied", "qwen3", "qwen3_moe"])
def test_parameter_count_equals_transformers(family):
    import transformers

    from tests.helpers.tiny_models import tiny_hf_config

    hf_config = tiny_hf_config(family)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    expected = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert count_parameters(arch_from_hf_config(hf_config)).total == expected


@pytest.mark.parametrize(
    "name, published", [("qwen2.5-7b", 7.62e9), ("qwen2.5-32b", 32.76e9), ("qwen3-30b-a3b", 30.5e9)]
)
def test_parameter_count_matches_published_sizes(name, published):
    arch = arch_from_hf_config(EXAMPLES / "hf_configs" / f"{name}.json")
    assert count_parameters(arch).total == pytest.approx(published, rel=0.005)


@pytest.mark.parametrize(
    "config, nodes, model",
    [
        ("qwen2.5_7b_dapo.yaml", 1, "qwen2.5-7b"),
        ("qwen2.5_32b_dapo.yaml", 16, "qwen2.5-32b"),
        ("qwen3_30b_a3b_dapo.yaml", 4, "qwen3-30b-a3b"),
    ],
)
def test_examples_fit_80gb(config, nodes, model, capsys):
    rc = main(["--config", str(EXAMPLES / config), "--nodes", str(nodes), "--gpus-per-node", "8",
               "--gpu-memory-gib", "80", "--hf-config", str(EXAMPLES / "hf_configs" / f"{model}.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fits" in out and "DOES NOT FIT" not in out


def test_plan_names_what_does_not_fit():
    cfg = load_config(EXAMPLES / "qwen2.5_32b_dapo.yaml", require_inputs=False)
    arch = arch_from_hf_config(EXAMPLES / "hf_configs" / "qwen2.5-32b.json")
    # Same 32B recipe on one node with TP1: 32.8B params x 18 B cannot sit on one 80 GB GPU.
    cfg.parallel.tensor_model_parallel_size = 1
    cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    cfg.rollout.tensor_parallel_size = 1
    plan = memory_plan(cfg, arch, world_size=8, gpus_per_node=8, gpu_memory_gib=80)
    assert any(p.startswith("rollout phase") for p in plan.problems), plan.problems
    assert any(p.startswith("training phase") for p in plan.problems), plan.problems
    # The engine of a single GPU cannot hold a 22.5k-token sequence next to 65 GB of weights.
    assert any("KV cache" in p for p in plan.problems), plan.problems
    # The distributed optimizer shards the 12 optimizer bytes over data-parallel ranks.
    cfg.parallel.tensor_model_parallel_size = 8
    cfg.parallel.sequence_parallel = True
    plain = memory_plan(cfg, arch, world_size=16, gpus_per_node=8, gpu_memory_gib=80)
    opt = next(ln for ln in plain.training if ln.name.startswith("optimizer"))
    weights = next(ln for ln in plain.training if ln.name == "weights")
    assert opt.gib == pytest.approx(weights.gib * 12 / 2 / 2)  # 12 B / dp=2 vs 2 B of weights


def test_plan_cli_errors_name_the_input(tmp_path, capsys):
    rc = main(["--config", str(EXAMPLES / "qwen2.5_7b_dapo.yaml"), "--nodes", "1", "--gpus-per-node", "8",
               "--gpu-memory-gib", "80", "--hf-config", str(tmp_path / "missing.json")])
    assert rc == 2
    assert "missing.json" in capsys.readouterr().err
