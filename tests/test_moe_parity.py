"""Qwen3-MoE on Megatron-Core MoE layers: logits equal transformers' ``Qwen3MoeForCausalLM``, and the
HF tensors exported from every layout equal the checkpoint bit for bit.

Reference: the transformers forward of the same fp32 checkpoint, one process (softmax router in
fp32, top-2 of 4 experts, with and without ``norm_topk_prob``). Tolerance: max |logit diff| <= 1e-4
over valid positions (measured about 1e-6). Layouts: EP1 (one process), EP2 (experts split over
2 ranks), TP2xEP2 (4 ranks, each expert's MLP also split over TP), PP2 (uneven 2+1 layers).
"""

import pytest
import torch
from safetensors.torch import load_file

from dapo_megatron.verify import make_batch
from tests._moe_ranks import logits_and_export
from tests.helpers.distributed import run_on_ranks

TOL = 1e-4
LENGTHS = [13, 7, 10, 4]
LAYOUTS = {
    # name: (world, tp, pp, ep, sequences per micro-batch)
    "EP1": (1, 1, 1, 1, 4),
    "EP2": (2, 1, 1, 2, 2),
    "TP2xEP2": (4, 2, 1, 2, 4),
    "PP2": (2, 1, 2, 1, 2),
}


@pytest.fixture(scope="module")
def hf_reference(tiny_moe_dirs):
    from transformers import AutoModelForCausalLM

    ids, mask = make_batch(1003, LENGTHS)
    ref, weights = {}, {}
    for arch, d in tiny_moe_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            ref[arch] = model(input_ids=ids, attention_mask=mask).logits
        weights[arch] = load_file(f"{d}/model.safetensors")
    return ids, ref, weights


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_logits_and_export(layout, tiny_moe_dirs, hf_reference):
    world, tp, pp, ep, per_mb = LAYOUTS[layout]
    ids, ref, weights = hf_reference
    results = run_on_ranks(logits_and_export, world, tiny_moe_dirs, tp, pp, ep, ids, per_mb, timeout=600)
    for arch in tiny_moe_dirs:
        merged = {}
        for r in results:
            if r["logits"] is not None:
                merged.update(r["logits"][arch])
        assert sorted(merged) == list(range(len(LENGTHS))), f"{layout}/{arch}: missing sequences"
        worst = max((merged[i][:n] - ref[arch][i, :n]).abs().max().item() for i, n in enumerate(LENGTHS))
        print(f"{layout} {arch}: max |logit diff| = {worst:.2e}")
        assert worst <= TOL, f"{layout}/{arch}: max |logit diff| {worst:.3e} > {TOL}"
        # Export: every rank (each EP rank holds half the experts) yields every HF tensor, bitwise.
        for r, result in enumerate(results):
            exported = result["exported"][arch]
            assert sorted(exported) == sorted(weights[arch]), f"{layout}/{arch}: rank {r} names differ"
            for name, tensor in weights[arch].items():
                assert torch.equal(exported[name], tensor), f"{layout}/{arch}: rank {r} {name} differs"


def test_moe_arch_fields_and_errors(tiny_moe_dirs):
    from dapo_megatron.models import arch_from_hf_config
    from dapo_megatron.parallel.layout import ParallelLayout

    arch = arch_from_hf_config(tiny_moe_dirs["qwen3_moe"])
    assert (arch.num_experts, arch.moe_router_topk, arch.moe_norm_topk_prob) == (4, 2, True)
    assert arch.qk_norm and arch.is_moe
    with pytest.raises(ValueError, match="expert_model_parallel_size=3 must divide num_experts=4"):
        ParallelLayout(ep=3).validate(arch)
    dense = arch_from_hf_config(
        {"model_type": "qwen3", "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 1,
         "intermediate_size": 64, "vocab_size": 10}
    )
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        ParallelLayout(ep=2).validate(dense)
    bad = {"model_type": "qwen3_moe", "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2,
           "intermediate_size": 64, "vocab_size": 10, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 16, "mlp_only_layers": [1]}
    with pytest.raises(ValueError, match="mlp_only_layers"):
        arch_from_hf_config(bad)
