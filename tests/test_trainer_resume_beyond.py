"""Exact resume with adaptive Clip-Higher and prompt skipping on (issue 18 items 3, 4): a job
SIGKILLed after step 2 and resumed logs the same step 3 as an uninterrupted run, including the
controller's clip_ratio_high and the skipper's choices (both in the checkpoint)."""

import signal

import pytest

from tests.test_trainer_e2e import _metrics, _train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# A band above any entropy the demo model reaches: the controller opens the clip every step.
# 16 training prompts, 8 per round: every prompt is revisited from the third round on and about a
# third of the groups (n=4) are all right or all wrong, so the skipper has history to act on.
BEYOND = (
    "algorithm.adaptive_clip_high=true",
    "algorithm.adaptive_clip_entropy_low=10.0",
    "algorithm.adaptive_clip_entropy_high=10.0",
    "algorithm.adaptive_clip_gain=0.01",
    "algorithm.prompt_skipping=true",
    "algorithm.prompt_skipping_explore_prob=0.25",
    "rollout.n=4",
    "algorithm.max_num_gen_batches=0",
    "trainer.total_steps=3",
    "trainer.save_every=1",
    "trainer.val_every=0",
    "checkpoint.export_hf_at_end=false",
)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from dapo_megatron.demo.model import make_demo_model
    from dapo_megatron.demo.task import write_demo_dataset

    root = tmp_path_factory.mktemp("demo_small")
    make_demo_model(root / "model", seed=0, steps=150)
    write_demo_dataset(root / "data", num_train=16, num_val=4, seed=0, formats=("jsonl",))
    return root


def test_exact_resume_with_adaptive_clip_and_prompt_skipping(small_demo, tmp_path):
    _train(small_demo, tmp_path / "straight", *BEYOND)
    killed = _train(small_demo, tmp_path / "resumed", *BEYOND, kill_after_step=2, check=False)
    assert killed.returncode == -signal.SIGKILL, f"the job was not killed (rc={killed.returncode})"
    resumed = _train(small_demo, tmp_path / "resumed", *BEYOND)
    assert "resumed from" in resumed.stdout
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in a] == [1, 2, 3] and [r["step"] for r in b] == [1, 2, 3]

    # the controller acted: entropy < 10 nats, so eps_high grew by 0.01 * (10 - H) after each step
    clip = [r["algorithm/clip_ratio_high"] for r in a]
    assert clip[0] == 0.28
    for k in (1, 2):
        assert clip[k] == pytest.approx(clip[k - 1] + 0.01 * (10.0 - a[k - 1]["entropy"]), abs=1e-12)
    # the skipper acted: some prompts skipped after the first round
    assert sum(r["prompt_skipping/skipped_prompts"] for r in a) > 0
    assert all(r["rollout/responses_per_kept_group"] >= 2 for r in a)

    for key, value in a[2].items():
        if (
            key.startswith(("timing/", "memory/"))
            or key in ("time", "step_time", "tokens_per_second")
            or key.startswith("reward/elapsed")
        ):
            continue
        assert b[2][key] == value, f"step 3 {key}: {b[2][key]} after resume vs {value} uninterrupted"
