"""Qwen3-MoE trained by the real trainer (torchrun, 2 gloo ranks, EP2, HF engine) with routing replay.

The policy: a tiny random Qwen3-MoE (4 experts, top-2) over the demo tokenizer; the reward is the
parity of the response text's length (informative groups from a random policy). Each engine
records its router's top-2 experts per token; the data plane carries them to the training ranks
(int16, one more tensor per sender), where the old-log-prob and update forwards replay them.

* ``model.routing_replay=rollout``, 2 steps at EP2 (two replicas, two engines): expert agreement
  (the engine's choices that the training forward used) is exactly 1.0, old log-probs equal the
  engine's (fp32, same weights; step 2 after the weight sync), loss finite; resuming from the
  step-1 checkpoint gives the same step 2.
* A perturbed engine router (``tests/_moe_train_entry.py``: N(0, 0.03) on every ``mlp.gate``,
  a stand-in for train/rollout router drift), one step each: without replay the expert agreement
  drops below 1 and the log-prob mismatch grows; with replay the agreement is 1.0 and the
  mismatch is lower (measured, printed).
"""

from __future__ import annotations

import math

import pytest

from tests.test_trainer_e2e import ROOT, _metrics, _train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ENTRY = ROOT / "tests" / "_moe_train_entry.py"
ROUTER_PERTURB_STD = 0.03
LOGPROB_TOL = 1e-4  # fp32, same weights: Megatron (EP2, grouped experts) vs the HF engine


@pytest.fixture(scope="module")
def moe_inputs(tmp_path_factory):
    from dapo_megatron.demo.model import build_tokenizer
    from dapo_megatron.demo.task import write_demo_dataset
    from tests.helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("moe_trainer")
    tokenizer = build_tokenizer()
    make_tiny_hf_model("qwen3_moe", root / "model", seed=21, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(root / "model")
    write_demo_dataset(root / "data", num_train=64, num_val=8, seed=0, formats=("jsonl",))
    return root


def _moe_train(inputs, run_dir, *overrides, perturb: float = 0.0, check: bool = True):
    return _train(
        inputs,
        run_dir,
        "data.val_files=[]",
        "parallel.tensor_model_parallel_size=1",
        "parallel.expert_model_parallel_size=2",
        "parallel.max_tokens_per_micro_batch=null",
        "parallel.micro_batch_size=4",
        "rollout.n=4",
        "trainer.train_batch_size=2",
        "trainer.gen_batch_size=4",
        "trainer.ppo_mini_batch_size=1",
        "trainer.val_every=0",
        "reward.reward_fn=tests._reward_test_fns:length_parity",
        "reward.num_workers=0",
        "optimizer.lr_warmup_steps=0",  # step 1 changes the weights: step 2 checks the sync
        "checkpoint.export_hf_at_end=false",
        "logging.tensorboard=false",
        *overrides,
        check=check,
        entry=[str(ENTRY), "--router-perturb", str(perturb)],
    )


def test_ep2_routing_replay_trains_and_resumes(moe_inputs, tmp_path):
    common = ("model.routing_replay=rollout", "trainer.total_steps=2", "trainer.save_every=1")
    _moe_train(moe_inputs, tmp_path / "straight", *common)
    rows = _metrics(tmp_path / "straight")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/expert_agreement"] == 1.0, r["rollout/expert_agreement"]
        assert r["rollout/logprob_diff_max"] < LOGPROB_TOL, r["rollout/logprob_diff_max"]
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["num_updates"] == 2
    ckpt = tmp_path / "straight" / "checkpoints" / "step_000001"
    assert ckpt.is_dir()
    resumed = _moe_train(moe_inputs, tmp_path / "resumed", *common, f"checkpoint.resume={ckpt}")
    assert "resumed from" in resumed.stdout
    (again,) = _metrics(tmp_path / "resumed")
    assert again["step"] == 2
    for key, value in rows[1].items():
        if key.startswith(("timing/", "memory/", "reward/elapsed")) or key in ("time", "step_time", "tokens_per_second"):
            continue
        assert again[key] == value, f"step 2 {key}: {again[key]} after resume vs {value} uninterrupted"


def test_replay_lowers_mismatch_on_a_perturbed_router(moe_inputs, tmp_path):
    figures = {}
    for mode in ("none", "rollout"):
        run = tmp_path / mode
        _moe_train(
            moe_inputs,
            run,
            f"model.routing_replay={mode}",
            "rollout.record_routing=true",
            "trainer.total_steps=1",
            "trainer.save_every=0",
            perturb=ROUTER_PERTURB_STD,
        )
        (row,) = _metrics(run)
        figures[mode] = row
        print(
            f"perturbed router (std {ROUTER_PERTURB_STD}), routing_replay={mode:7s}: expert agreement "
            f"{row['rollout/expert_agreement']:.4f}, |old - rollout log-prob| mean "
            f"{row['rollout/logprob_diff_mean']:.3e} max {row['rollout/logprob_diff_max']:.3e}"
        )
    assert figures["none"]["rollout/expert_agreement"] < 0.99  # guard: the perturbation flips experts
    assert figures["rollout"]["rollout/expert_agreement"] == 1.0
    assert figures["rollout"]["rollout/logprob_diff_mean"] < figures["none"]["rollout/logprob_diff_mean"]
