"""Learning-rate warm-up is given in training steps, ramps per update, and the first update learns.

One training step of two mini-batches (two optimizer steps, ``updates_per_step=2``) with
``lr_warmup_steps=2`` training steps, i.e. a warm-up of 4 updates, must equal the plain PyTorch
AdamW reference of ``test_train_step_parity`` run at the hand-computed rates ``lr * 1/4`` and
``lr * 2/4`` (update k uses ``lr * k / (lr_warmup_steps * updates_per_step)``): not 0 for the first
update, and not ``lr * 1/2`` as a warm-up counted in optimizer steps would give.
"""

import pytest

from tests._train_ranks import dapo_update
from tests.helpers.distributed import run_on_ranks
from tests.test_train_step_parity import OPT, _compare, make_batch, reference_update

WARMUP = 2  # training steps
UPDATES_PER_STEP = 2  # mini-batches of 4 in the batch of 8


@pytest.mark.distributed
def test_first_update_uses_lr_over_warmup(tiny_hf_dirs):
    arch = "qwen2-tied"
    one = {arch: tiny_hf_dirs[arch]}
    batches = {arch: make_batch(one[arch])}
    opt = dict(OPT, lr_warmup_steps=WARMUP)
    got = run_on_ranks(
        dapo_update, 1, one, 1, 1, False, batches, 4, 4, opt, "fp32", "none", 1, UPDATES_PER_STEP, timeout=600
    )[0]
    metrics = got[arch][0]
    assert metrics["num_updates"] == 2
    # first update's rate, hand-computed: 1e-3 * 1 / (2 training steps * 2 updates)
    assert metrics["lr"] == pytest.approx(2.5e-4, rel=1e-12), metrics["lr"]
    ref = {arch: reference_update(one[arch], batches[arch], 4, lrs=[2.5e-4, 5e-4])}
    _compare("warm-up 2 steps x 2 updates, 2 optimizer steps", got, ref, one)
    # the same weights at a constant lr would differ: the schedule is what the test pins
    const = reference_update(one[arch], batches[arch], 4)[2]
    w = max((got[arch][2][k] - const[k]).abs().max().item() for k in const)
    assert w > 1e-4, f"warm-up made no measurable difference ({w:.2e})"
