"""Learning-rate warm-up counts optimizer steps and the first update trains at lr / warmup.

One DAPO update of two mini-batches (two optimizer steps) with ``lr_warmup_steps=4`` must equal
the plain PyTorch AdamW reference of ``test_train_step_parity`` run at the hand-computed rates
``lr * 1/4`` and ``lr * 2/4`` (update k uses ``lr * k / warmup``), not at 0 for the first update.
"""

import pytest

from tests._train_ranks import dapo_update
from tests.helpers.distributed import run_on_ranks
from tests.test_train_step_parity import OPT, _compare, make_batch, reference_update

WARMUP = 4


@pytest.mark.distributed
def test_first_update_uses_lr_over_warmup(tiny_hf_dirs):
    arch = "qwen2-tied"
    one = {arch: tiny_hf_dirs[arch]}
    batches = {arch: make_batch(one[arch])}
    opt = dict(OPT, lr_warmup_steps=WARMUP)
    got = run_on_ranks(dapo_update, 1, one, 1, 1, False, batches, 4, 4, opt, timeout=600)[0]
    metrics = got[arch][0]
    assert metrics["num_updates"] == 2
    # first update's rate, hand-computed: 1e-3 * 1/4
    assert metrics["lr"] == pytest.approx(2.5e-4, rel=1e-12), metrics["lr"]
    ref = {arch: reference_update(one[arch], batches[arch], 4, lrs=[2.5e-4, 5e-4])}
    _compare("warm-up 4, 2 optimizer steps", got, ref, one)
    # the same weights at a constant lr would differ: the schedule is what the test pins
    const = reference_update(one[arch], batches[arch], 4)[2]
    w = max((got[arch][2][k] - const[k]).abs().max().item() for k in const)
    assert w > 1e-4, f"warm-up made no measurable difference ({w:.2e})"
