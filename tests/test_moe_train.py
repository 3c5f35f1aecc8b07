"""One DAPO update of a Qwen3-MoE policy at EP2 (experts split over 2 ranks, which are also 2
data-parallel ranks with unequal token counts) equals the plain single-process PyTorch reference of
``tests/test_train_step_parity.py`` (transformers forward, token-level clipped surrogate, global
token mean, clip_grad_norm_, AdamW). The load-balancing loss is off (``moe_aux_loss_coeff=0``).

transformers keeps each layer's experts fused (``gate_up_proj`` [E, 2F, H], ``down_proj``
[E, H, F]); the reference's gradients and weights are split into the per-expert HF names the
checkpoint (and our export) uses. Tolerances as the dense test: loss rel 1e-5, gradients abs 1e-6,
weights abs 1e-5.
"""

import pytest
import torch

from tests._train_ranks import dapo_update
from tests.helpers.distributed import run_on_ranks
from tests.test_train_step_parity import OPT, RESPONSE_LENS, make_batch, reference_update


def per_expert_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused in-memory expert tensors -> the per-expert checkpoint names."""
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"] = gate
                out[f"{base}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def test_per_expert_names_match_the_checkpoint(tiny_moe_dirs):
    """The name split above is what save_pretrained writes (so the reference is compared right)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d = tiny_moe_dirs["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    split = per_expert_names(dict(model.named_parameters()))
    saved = load_file(f"{d}/model.safetensors")
    assert sorted(split) == sorted(saved)
    assert all(torch.equal(split[n].detach(), saved[n]) for n in saved)


@pytest.mark.distributed
def test_dapo_update_at_ep2_matches_reference(tiny_moe_dirs):
    arch = "qwen3_moe"
    hf_dir = tiny_moe_dirs[arch]
    batch = make_batch(hf_dir)
    ref_loss, ref_grads, ref_weights = reference_update(hf_dir, batch, mini_batch_size=8)
    ref_grads, ref_weights = per_expert_names(ref_grads), per_expert_names(ref_weights)
    got = run_on_ranks(
        dapo_update, 2, {arch: hf_dir}, 1, 1, False, {arch: batch}, 8, 2, OPT, "fp32", "none", 2, timeout=600
    )[0]
    metrics, grads, weights = got[arch]
    assert sorted(grads) == sorted(ref_grads)
    g = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    w = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    expert_g = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads if ".experts." in k)
    print(f"EP2 {arch}: loss {metrics['loss']:.6f} vs {ref_loss:.6f}, max|grad diff| {g:.2e} "
          f"(experts {expert_g:.2e}), max|weight diff| {w:.2e}")  # fmt: skip
    assert metrics["valid_tokens"] == sum(RESPONSE_LENS)
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert max(ref_grads[k].abs().max().item() for k in ref_grads if ".experts." in k) > 1e-3
    assert g <= 1e-6, f"max |grad diff| {g:.3e}"
    assert w <= 1e-5, f"max |weight diff| {w:.3e}"
