"""The HF engine's vectorised sampler and batching, against hand-built references (no model for the first).

``sample_rows`` draws by inverse CDF from one uniform per row. With N stratified uniforms
``(k + 0.5) / N`` the count of each token is within 1 of ``N * p`` exactly, so the empirical
frequencies must equal an independently computed processed distribution to ``1 / N``.
"""

from __future__ import annotations

import math

import pytest
import torch

from dapo_megatron.rollout import SamplingConfig, create_engine
from dapo_megatron.rollout.hf_engine import sample_rows
from tests._rollout_reference import long_prompts

V = 50
N = 20_000


def processed_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[float]:
    """softmax(logits / T) on the top-k set, then the top-p set, renormalised: plain Python, one row."""
    scaled = [float(x) / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda v: -scaled[v])
    keep = order if top_k == -1 else order[:top_k]
    peak = max(scaled[v] for v in keep)
    weights = {v: math.exp(scaled[v] - peak) for v in keep}
    total = sum(weights.values())
    kept, mass = [], 0.0
    for v in keep:  # descending probability; a token stays while the mass before it is < top_p
        if mass >= top_p and kept:
            break
        kept.append(v)
        mass += weights[v] / total
    z = sum(weights[v] for v in kept)
    return [weights[v] / z if v in kept else 0.0 for v in range(len(scaled))]


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, -1, 1.0), (0.7, 10, 1.0), (1.3, -1, 0.8), (1.0, 20, 0.6)]
)
def test_draws_follow_the_processed_distribution(temperature, top_k, top_p):
    logits = 1.5 * torch.randn(V, generator=torch.Generator().manual_seed(0))
    ref = processed_probs(logits, temperature, top_k, top_p)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    uniforms = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    ids, logp = sample_rows(logits.expand(N, V).clone(), cfg, uniforms)
    freq = torch.bincount(ids, minlength=V).double() / N
    assert (freq - torch.tensor(ref, dtype=torch.float64)).abs().max().item() <= 1 / N + 1e-6
    assert all(freq[v] == 0 for v in range(V) if ref[v] == 0.0)
    expected = torch.tensor([math.log(ref[v]) for v in ids.tolist()])
    assert (logp - expected).abs().max().item() <= 1e-5
    # The check can fail: an unfiltered distribution is far from a filtered one.
    if top_k != -1 or top_p < 1:
        plain = torch.tensor(processed_probs(logits, temperature, -1, 1.0), dtype=torch.float64)
        assert (freq - plain).abs().max().item() > 10 / N


def test_largest_uniform_never_draws_a_filtered_token():
    logits = torch.zeros(2, V)
    logits[:, 0] = 5.0  # top_k=1 keeps token 0 only; the last tokens are the filtered ones
    u = torch.full((2,), torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0)).item())
    ids, logp = sample_rows(logits, SamplingConfig(top_k=1), u.double())
    assert ids.tolist() == [0, 0] and logp.abs().max().item() < 1e-6
    ids, _ = sample_rows(torch.zeros(1, V), SamplingConfig(), u[:1].double())
    assert ids.tolist() == [V - 1]


def test_uneven_batches_split_inside_a_prompt_give_the_same_rows(tiny_hf_dirs):
    """Rows of one prompt spread over two batches (shared prefill, reordered cache): same tokens."""
    model_dir = tiny_hf_dirs["llama"]
    prompts = long_prompts(5, lens=(40, 33, 21))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)
    whole = create_engine("hf", model_dir).generate(prompts, 3, cfg)
    split = create_engine("hf", model_dir, max_batch_rows=4).generate(prompts, 3, cfg)
    assert [[r.token_ids for r in g] for g in whole] == [[r.token_ids for r in g] for g in split]
    worst = max(
        abs(a - b)
        for gw, gs in zip(whole, split)
        for rw, rs in zip(gw, gs)
        for a, b in zip(rw.logprobs, rs.logprobs)
    )
    assert worst <= 1e-5
    # The n rows of one prompt (same prefill) still differ: each has its own seed.
    assert all(len({tuple(r.token_ids) for r in g}) > 1 for g in whole)


def test_budget_sets_rows_per_batch(tiny_hf_dirs):
    model_dir = tiny_hf_dirs["llama"]
    engine = create_engine("hf", model_dir, kv_cache_gib=0.001)
    per_token = 3 * 2 * 2 * 16 * 4  # 3 layers x (K, V) x 2 KV heads x head_dim 16 x fp32 bytes
    per_row = 100 * per_token + 48 * 1003  # + sampling buffers: 48 bytes per vocabulary entry
    assert engine.rows_per_batch(100) == int(0.001 * 2**30) // per_row == 8
    assert create_engine("hf", model_dir, kv_cache_gib=0.001, max_batch_rows=1).rows_per_batch(100) == 1
    with pytest.raises(ValueError, match="kv_cache_gib"):
        create_engine("hf", model_dir, kv_cache_gib=0)
