"""Megatron-Core GPTModel built from HF weights gives transformers' logits in every layout.

Reference: ``transformers`` forward of the same fp32 checkpoint, one process, with an attention
mask for the right padding. Tolerance: max |logit diff| <= 1e-4 (fp32), over valid positions.
"""

import pytest
import torch

from dapo_megatron.verify import make_batch
from tests._parity_ranks import logits_by_layout
from tests.helpers.distributed import run_on_ranks

TOL = 1e-4
LENGTHS = [13, 7, 10, 4]  # right-padded to 13; an odd length exercises SP padding


@pytest.fixture(scope="module")
def hf_reference(tiny_hf_dirs):
    from transformers import AutoModelForCausalLM

    ids, mask = make_batch(1003, LENGTHS)
    ref = {}
    for arch, d in tiny_hf_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            ref[arch] = model(input_ids=ids, attention_mask=mask).logits
    return ids, mask, ref


LAYOUTS = {
    # name: (world, tp, pp, sp, sequences per micro-batch)
    "TP1": (1, 1, 1, False, 4),
    "TP2": (2, 2, 1, False, 2),
    "PP2": (2, 1, 2, False, 1),
    "TP2+SP": (2, 2, 1, True, 2),
    "TP2xPP2+SP": (4, 2, 2, True, 1),
    "DP2": (2, 1, 1, False, 1),
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers(layout, tiny_hf_dirs, hf_reference):
    world, tp, pp, sp, per_mb = LAYOUTS[layout]
    ids, mask, ref = hf_reference
    results = run_on_ranks(logits_by_layout, world, tiny_hf_dirs, tp, pp, sp, ids, per_mb, timeout=600)
    merged = {arch: {} for arch in tiny_hf_dirs}
    for r in results:
        if r is not None:
            for arch, per_seq in r.items():
                merged[arch].update(per_seq)
    for arch in tiny_hf_dirs:
        assert sorted(merged[arch]) == list(range(len(LENGTHS))), f"{layout}/{arch}: missing sequences"
        worst = 0.0
        for i, n in enumerate(LENGTHS):
            diff = (merged[arch][i][:n] - ref[arch][i, :n]).abs().max().item()
            worst = max(worst, diff)
        print(f"{layout} {arch}: max |logit diff| = {worst:.2e}")
        assert worst <= TOL, f"{layout}/{arch}: max |logit diff| {worst:.3e} > {TOL}"
