"""The RolloutEngine contract, checked the same way for every engine kind.

Each ``check_*`` takes a built engine (and the transformers references it is held to) plus the
knobs on which the engine test modules differ (prompt seed and lengths, token counts); the test
modules own their fixtures, markers and engine-specific tests and call these for the shared part.
"""

from __future__ import annotations

import pytest

from dapo_megatron.rollout import RolloutEngine, SamplingConfig, create_engine
from tests._rollout_reference import (
    VOCAB,
    load_hf,
    long_prompts,
    make_model_pair,
    max_logprob_diff,
    transformers_greedy,
)

TOL = 1e-4  # fp32 engine vs teacher-forced transformers


def engine_fixtures(kind: str, engine_scope: str):
    """Fixtures ``(model_dirs, models, engine)`` for one engine kind; bind all three in the test module.

    ``model_dirs`` (two random tiny Llamas) and ``models`` (their transformers references) are
    module-scoped; ``engine`` (fp32, seed 0, on model A) has ``engine_scope``.
    """

    @pytest.fixture(scope="module")
    def model_dirs(tmp_path_factory):
        return make_model_pair(tmp_path_factory.mktemp(f"rollout_{kind}"))

    @pytest.fixture(scope="module")
    def models(model_dirs):
        return load_hf(model_dirs[0]), load_hf(model_dirs[1])

    @pytest.fixture(scope=engine_scope)
    def engine(model_dirs):
        eng = create_engine(kind, model_dirs[0], dtype="float32", seed=0)
        yield eng
        eng.close()

    return model_dirs, models, engine


def check_protocol(engine) -> None:
    assert isinstance(engine, RolloutEngine)


def check_sampled_logprobs_match_teacher_forced(engine, model, sampling: dict, seed: int = 1) -> None:
    """Sampled responses carry one log-prob per token, equal to the teacher-forced reference."""
    prompts = long_prompts(seed)
    out = engine.generate(prompts, 2, SamplingConfig(max_new_tokens=12, seed=3, **sampling))
    assert [len(group) for group in out] == [2, 2]
    assert all(len(r.token_ids) == len(r.logprobs) > 0 for group in out for r in group)
    assert max_logprob_diff(model, prompts, out, **sampling) <= TOL


def check_update_weights_then_matches_new_model(engine, model_a, model_b, seed: int = 2) -> None:
    """After ``update_weights(B)`` greedy and sampled outputs follow model B, not model A."""
    prompts = long_prompts(seed)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    before = engine.generate(prompts, 1, greedy)  # fills any prefix cache with model A's KV
    assert max_logprob_diff(model_a, prompts, before, temperature=0.0) <= TOL

    engine.update_weights(model_b.state_dict().items())

    after = engine.generate(prompts, 1, greedy)
    for prompt, group in zip(prompts, after):
        assert group[0].token_ids == transformers_greedy(model_b, prompt, 12)
    assert max_logprob_diff(model_b, prompts, after, temperature=0.0) <= TOL
    # The check can fail: model A's log-probs of the same tokens are far away.
    assert max_logprob_diff(model_a, prompts, after, temperature=0.0) > 1e-2
    sampled = engine.generate(prompts, 2, SamplingConfig(max_new_tokens=12, seed=11))
    assert max_logprob_diff(model_b, prompts, sampled, temperature=1.0) <= TOL


def check_greedy_matches_transformers(engine, model, seed: int, lens, max_new_tokens: int) -> None:
    prompts = long_prompts(seed, lens=lens)
    out = engine.generate(prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    for prompt, group in zip(prompts, out):
        assert group[0].token_ids == transformers_greedy(model, prompt, max_new_tokens)


def check_same_seed_same_tokens_and_samples_differ(engine, seed: int):
    """Same seed, same tokens; the n samples of a prompt differ. Returns (prompts, cfg, first)."""
    prompts = long_prompts(seed, lens=(40, 33))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=1234)
    first = engine.generate(prompts, 4, cfg)
    second = engine.generate(prompts, 4, cfg)
    assert [[r.token_ids for r in g] for g in first] == [[r.token_ids for r in g] for g in second]
    for group in first:
        assert len({tuple(r.token_ids) for r in group}) == 4, "n samples of one prompt should differ"
    return prompts, cfg, first


def check_finish_reason_length_and_stop(engine, seed: int) -> None:
    prompt = long_prompts(seed, lens=(50,))
    out = engine.generate(prompt, 1, SamplingConfig(temperature=0.0, max_new_tokens=6))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert 2 not in out.token_ids  # EOS would have stopped it
    stop_at = out.token_ids[3]
    stopped = engine.generate(
        prompt, 1, SamplingConfig(temperature=0.0, max_new_tokens=6, stop_token_ids=(stop_at,))
    )[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == out.token_ids[: out.token_ids.index(stop_at) + 1]
    # Sampling: a stop set covering nearly the whole vocabulary ends every response at once.
    sampled = engine.generate(
        prompt, 3, SamplingConfig(max_new_tokens=6, seed=0, stop_token_ids=tuple(range(3, VOCAB)))
    )[0]
    assert all(r.finish_reason == "stop" and len(r.token_ids) == 1 for r in sampled)


def check_update_weights_tied_embeddings(engine, model_b, named, seed: int, lens, warm_cache: bool) -> None:
    """A tied-embedding model updated with ``named`` (B's tensors) then matches model B.

    ``warm_cache`` generates once before the update, so a stale prefix cache would show.
    """
    prompts = long_prompts(seed, lens=lens)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    if warm_cache:
        engine.generate(prompts, 1, greedy)
    engine.update_weights(named)
    out = engine.generate(prompts, 1, greedy)
    assert out[0][0].token_ids == transformers_greedy(model_b, prompts[0], 8)
    assert max_logprob_diff(model_b, prompts, out, temperature=0.0) <= TOL
