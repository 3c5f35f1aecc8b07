"""The demo starting policy: tokenizer, chat template, saved directory, determinism, starting accuracy."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dapo_megatron.demo.model import (
    build_tokenizer,
    evaluate_sampled_accuracy,
    main,
    make_demo_model,
    noisy_answer,
)
from dapo_megatron.demo.task import make_demo_rows
from dapo_megatron.rewards.math import compute_score

# A cheap build (a few SFT steps) for the tests that only look at files and determinism.
QUICK = dict(steps=6, num_train=32, batch_size=8)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The default demo model (the one the README demo builds)."""
    return make_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=0)


def test_tokenizer_is_deterministic_with_fixed_special_ids():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
    assert len(a) % 2 == 1  # odd on purpose: exercises vocabulary padding under TP


@pytest.mark.parametrize("ops", ["+", "-", "*"])
def test_task_text_round_trips_without_unknown_tokens(ops):
    tok = build_tokenizer()
    for row in make_demo_rows(20, seed=1, max_operand=99, ops=(ops,)):
        text = row["prompt"][0]["content"]
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    for answer in ("Answer: 7", "Answer: -12", "5 + 3 = 8.\nAnswer: 8"):
        ids = tok.encode(answer, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == answer


def test_chat_template_and_prompt_length():
    tok = build_tokenizer()
    content = make_demo_rows(1, seed=0)[0]["prompt"][0]["content"]
    messages = [{"role": "user", "content": content}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == f"<bos><user>{content}<assistant>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<user>")]
    assert ids[-1] == tok.convert_tokens_to_ids("<assistant>")
    assert len(ids) <= 40
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "Answer: 3"}], tokenize=False)
    assert full == f"<bos><user>{content}<assistant>Answer: 3<eos>"
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_generated_answer_decodes_to_a_scored_answer():
    tok = build_tokenizer()
    right = tok.encode("Answer: 16", add_special_tokens=False) + [tok.eos_token_id]
    wrong = tok.encode("Answer: 15", add_special_tokens=False) + [tok.eos_token_id]
    text = tok.decode(right, skip_special_tokens=True)
    assert text == "Answer: 16"
    assert compute_score(text, "16")["acc"] is True
    assert compute_score(tok.decode(wrong, skip_special_tokens=True), "16")["acc"] is False


def test_noisy_answer_distribution():
    rng = random.Random(0)
    draws = [noisy_answer(10, rng, 0.4) for _ in range(4000)]
    assert set(draws) == {8, 9, 10, 11, 12}
    assert 0.36 < draws.count(10) / len(draws) < 0.44


def test_saved_directory_loads(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    names = {p.name for p in demo_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not [p for p in demo_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    tok = AutoTokenizer.from_pretrained(demo_dir)
    cfg = model.config
    assert cfg.num_attention_heads % 2 == 0 and cfg.num_key_value_heads % 2 == 0
    assert cfg.vocab_size == len(tok) and model.dtype == torch.float32
    gen = GenerationConfig.from_pretrained(demo_dir)
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id) == (2, 0)
    built = build_tokenizer()
    text = built.apply_chat_template(
        make_demo_rows(1)[0]["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert tok.chat_template == built.chat_template
    assert (
        tok(text, add_special_tokens=False)["input_ids"] == built(text, add_special_tokens=False)["input_ids"]
    )
    info = json.loads((demo_dir / "demo_model.json").read_text())
    assert info["max_operand"] == 9 and info["ops"] == ["+"] and info["seed"] == 0


def test_starting_accuracy_is_partial(demo_dir):
    """Sampled at T=1 the model has the format but only part of the answers: RL has signal."""
    m = evaluate_sampled_accuracy(demo_dir, num_prompts=32, n=8, seed=0)
    assert 0.1 < m["acc"] < 0.8, m
    assert m["format_ok"] > 0.9, m
    assert m["informative"] >= 0.5, m


def test_build_is_deterministic(tmp_path):
    a = make_demo_model(tmp_path / "a", seed=3, **QUICK)
    b = make_demo_model(tmp_path / "b", seed=3, **QUICK)
    c = make_demo_model(tmp_path / "c", seed=4, **QUICK)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_existing_directory_and_bad_options(tmp_path):
    out = make_demo_model(tmp_path / "m", **QUICK)
    with pytest.raises(FileExistsError, match="already exists"):
        make_demo_model(out, **QUICK)
    make_demo_model(out, overwrite=True, seed=1, **QUICK)
    assert json.loads((out / "demo_model.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(TypeError, match="unknown options.*'bogus'"):
        make_demo_model(tmp_path / "x", bogus=1)
    with pytest.raises(ValueError, match="p_correct"):
        make_demo_model(tmp_path / "x", p_correct=1.5)
    with pytest.raises(ValueError, match="divisible"):
        make_demo_model(tmp_path / "x", num_heads=3)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--steps", "3", "--ops", "+-", "--max-operand", "5"]) == 0
    assert "wrote" in capsys.readouterr().out
    info = json.loads((out / "demo_model.json").read_text())
    assert info["ops"] == ["+", "-"] and info["max_operand"] == 5 and info["steps"] == 3
    with pytest.raises(SystemExit):
        main(["--out", str(out)])
