"""Adaptive Clip-Higher and prompt skipping in the loop (issue 18 items 3, 4): config validation,
the controller's sequence and the skipper's choices against hand-computed values, state round trips.
The kill/resume run of both is in tests/test_trainer_resume_beyond.py."""

import pytest

from dapo_megatron.config import load_config
from dapo_megatron.data.sampler import EpochSampler
from dapo_megatron.trainer.clip_control import ClipHighController
from dapo_megatron.trainer.prompt_skip import PromptSkipper

REQUIRED = ["model.hf_dir=/m", "data.train_files=[/t.jsonl]"]


def _algo(*overrides):
    return load_config(None, REQUIRED + list(overrides)).algorithm


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.adaptive_clip_gain=-1"], "algorithm.adaptive_clip_gain must be >= 0"),
        (
            ["algorithm.adaptive_clip_entropy_low=0.5", "algorithm.adaptive_clip_entropy_high=0.4"],
            "algorithm.adaptive_clip_entropy_high must be >= adaptive_clip_entropy_low=0.5",
        ),
        (
            ["algorithm.adaptive_clip_min=0.3", "algorithm.adaptive_clip_max=0.2"],
            "algorithm.adaptive_clip_max",
        ),
        (
            ["algorithm.adaptive_clip_high=true", "algorithm.clip_ratio_high=0.6"],
            "algorithm.clip_ratio_high must be in [adaptive_clip_min=0.2, adaptive_clip_max=0.5]",
        ),
        (
            ["algorithm.prompt_skipping_explore_prob=0"],
            "algorithm.prompt_skipping_explore_prob must be in (0, 1]",
        ),
        (["algorithm.prompt_skiping=true"], "prompt_skipping"),  # unknown key, with the suggestion
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError) as info:
        _algo(*overrides)
    assert message in str(info.value)


def test_off_by_default():
    algo = _algo()
    assert algo.adaptive_clip_high is False and algo.prompt_skipping is False


def test_clip_high_controller_sequence_hand_computed():
    algo = _algo(
        "algorithm.adaptive_clip_high=true",
        "algorithm.clip_ratio_high=0.28",
        "algorithm.adaptive_clip_entropy_low=0.5",
        "algorithm.adaptive_clip_entropy_high=1.0",
        "algorithm.adaptive_clip_gain=0.1",
        "algorithm.adaptive_clip_min=0.2",
        "algorithm.adaptive_clip_max=0.4",
    )
    c = ClipHighController(algo)
    # entropy 0.3 < 0.5: +0.1*0.2; 0.7 in band: unchanged; 2.0 > 1: -0.1*1.0; 0.0: +0.05; then the cap
    expected = [0.30, 0.30, 0.20, 0.25, 0.30, 0.35, 0.40, 0.40]
    got = [c.observe(h) for h in (0.3, 0.7, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0)]
    assert got == pytest.approx(expected, abs=1e-12)
    # the value survives a state round trip; a disabled controller keeps the configured value
    d = ClipHighController(algo)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value and d.observe(2.0) == pytest.approx(0.3)
    off = ClipHighController(_algo())
    assert [off.observe(h) for h in (0.0, 9.0)] == [0.28, 0.28]
    with pytest.raises(ValueError, match="adaptive_clip_high"):
        off.load_state_dict(c.state_dict())


def _group(acc_values):
    return [{"acc": float(a)} for a in acc_values]


def test_prompt_skipper_history_and_choices():
    sk = PromptSkipper(enabled=True, explore_prob=1e-12, metric="acc")
    sampler = EpochSampler(4, 4, shuffle=False)
    # first round: no history, every prompt kept
    indices, scanned = sk.choose(sampler, 4, seed=0)
    assert (indices, scanned) == ([0, 1, 2, 3], 4)
    # prompt 0 all right, 1 mixed, 2 all wrong, 3 mixed -> streaks 1, 0, 1, 0
    sk.observe(indices, _group([1, 1]) + _group([0, 1]) + _group([0, 0]) + _group([1, 0]), n=2)
    assert sk.history == {0: 1, 1: 0, 2: 1, 3: 0}
    # keep probability 1e-12 for 0 and 2: they are skipped; the round draws 1, 3 and then stops at
    # one pass over the data (4 drawn), so only 2 prompts are generated
    indices, scanned = sk.choose(sampler, 4, seed=1)
    assert (indices, scanned) == ([1, 3], 4)
    sk.observe([1, 3], _group([0, 0]) + _group([1, 0]), n=2)
    assert sk.history == {0: 1, 1: 1, 2: 1, 3: 0}
    # every prompt but 3 skipped; draws 0, 1, 2, 3 (kept) ... stops after 4 drawn
    assert sk.choose(sampler, 2, seed=2) == ([3], 4)
    # all skipped: the last drawn prompt is generated anyway
    sk.observe([3], _group([1, 1]), n=2)
    assert sk.choose(sampler, 2, seed=3) == ([3], 4)
    with pytest.raises(ValueError, match="samples"):
        sk.observe([0, 1], _group([1, 1]), n=2)


def test_prompt_skipper_keeps_about_explore_prob_and_resumes_exactly():
    def run(skipper, sampler, rounds, start):
        out = []
        for r in range(start, start + rounds):
            idx, scanned = skipper.choose(sampler, 8, seed=100 + r)
            out.append((idx, scanned))
            skipper.observe(idx, [s for i in idx for s in _group([i % 2, i % 2])], n=2)  # all zero-advantage
        return out

    a, sa = PromptSkipper(enabled=True, explore_prob=0.5, metric="acc"), EpochSampler(64, 8, seed=3)
    first = run(a, sa, 8, 0)
    b, sb = PromptSkipper(enabled=True, explore_prob=0.5, metric="acc"), EpochSampler(64, 8, seed=3)
    b.load_state_dict(a.state_dict())
    sb.load_state_dict(sa.state_dict())
    assert all(scanned == 8 and len(idx) == 8 for idx, scanned in first)  # epoch 0: nothing to skip
    second = run(a, sa, 6, 8)
    assert run(b, sb, 6, 8) == second  # the resumed skipper makes the same choices
    # from epoch 1 on every prompt has a streak >= 1: kept with probability <= 0.5, so at least
    # about 2 drawn per kept one
    drawn, kept = sum(s for _, s in second), sum(len(i) for i, _ in second)
    assert 1.6 < drawn / kept < 8.0, second
    off = PromptSkipper(enabled=False, explore_prob=0.5, metric="acc")
    s1, s2 = EpochSampler(64, 8, seed=3), EpochSampler(64, 8, seed=3)
    assert off.choose(s1, 8, seed=0) == (s2.next_batch(8), 8)
    with pytest.raises(ValueError, match="prompt_skipping"):
        off.load_state_dict(a.state_dict())
