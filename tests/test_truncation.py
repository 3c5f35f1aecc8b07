"""top-k / top-p truncation (algo/truncation.py rule, policy/truncation.py vocab-parallel) in the
trainer's log-probs.

Reference (independent, written out here): the full vocabulary in float64, sorted descending;
top-k keeps values >= the k-th; top-p keeps, in that order, the tokens whose exclusive cumulative
probability (after top-k, renormalised) is < top_p; log_softmax over the kept set. The trainer side
runs ``token_log_probs`` on TP2 shards of the same logits (vocabulary padded 250 -> 256) for T in
{0.6, 1.0, 1.3} x {top_p 0.9, top_k 20, both}, plus a flat distribution whose nucleus needs several
candidate rounds. Tolerances: fp32 compute on logits of scale 4, as tests/test_logprobs.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dapo_megatron.algo.truncation import OUTSIDE_SET_LOG_PROB, check_truncation, truncate_logits
from dapo_megatron.policy.loss import token_log_probs
from dapo_megatron.policy.truncation import TOP_P_CANDIDATES, keep_threshold, vocab_parallel_truncate
from tests.helpers.distributed import run_on_ranks

VALUE_ATOL = 5e-6
GRAD_ATOL = 3e-6
TEMPERATURES = (0.6, 1.0, 1.3)
SETTINGS = {"top_p0.9": (-1, 0.9), "top_k20": (20, 1.0), "both": (20, 0.9)}
B, S, VOCAB, PADDED = 3, 7, 250, 256


def reference_keep(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean kept set of ``z [N, V]`` (float64), by sorting the whole row."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < z.shape[-1]:
        kth = z.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        keep &= z >= kth
    if top_p < 1.0:
        probs = torch.where(keep, z, torch.full_like(z, float("-inf"))).softmax(-1)
        p_sorted, order = probs.sort(dim=-1, descending=True)
        keep_sorted = (torch.cumsum(p_sorted, -1) - p_sorted) < top_p
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    return keep


def make_case(seed: int, scale: float = 4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, S, PADDED, generator=gen, dtype=torch.float64)
    logits[..., VOCAB:] = 30.0  # padding: must never be kept nor leak into the softmax
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    # Most targets are likely tokens (inside the kept set); the random ones often fall outside.
    likely = logits[..., :VOCAB].topk(3, dim=-1).indices
    pick = torch.randint(0, 3, (B, S, 1), generator=gen)
    inside = torch.rand(B, S, generator=gen) < 0.7
    ids[:, 1:] = torch.where(inside, likely.gather(-1, pick)[..., 0].roll(1, dims=1), ids)[:, 1:]
    g_logp = torch.randn(B, S, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(B, S, generator=gen, dtype=torch.float64)
    return logits, ids, g_logp, g_ent


def reference(logits, ids, g_logp, g_ent, temperature, top_k, top_p):
    """float64 log-probs / entropy of the truncated tempered distribution, and d/dlogits."""
    z = logits.clone().requires_grad_()
    scaled = z[:, :-1, :VOCAB] / temperature
    keep = reference_keep(scaled.detach().reshape(-1, VOCAB), top_k, top_p).view(scaled.shape)
    masked = scaled.masked_fill(~keep, float("-inf"))
    log_p = torch.log_softmax(masked, dim=-1)
    target = ids[:, 1:].unsqueeze(-1)
    inside = keep.gather(-1, target).squeeze(-1)
    logp = torch.zeros(B, S, dtype=torch.float64)
    ent = torch.zeros(B, S, dtype=torch.float64)
    safe = torch.where(keep, log_p, torch.zeros_like(log_p))
    logp[:, 1:] = torch.where(
        inside, safe.gather(-1, target).squeeze(-1), torch.full_like(logp[:, 1:], OUTSIDE_SET_LOG_PROB)
    )
    ent[:, 1:] = -(safe.exp() * safe * keep).sum(-1)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), z.grad, inside


def _cases():
    for seed, temperature in enumerate(TEMPERATURES):
        for name, (top_k, top_p) in SETTINGS.items():
            yield (seed, 4.0, temperature, top_k, top_p), f"T={temperature} {name}"
    # Flat logits: the 0.9-nucleus holds most of the vocabulary, beyond the first candidate round.
    yield (7, 0.3, 1.3, -1, 0.9), "flat top_p0.9"


def _layouts(case: str) -> tuple[bool, ...]:
    """GPTModel's [s, b, V] memory order everywhere; [b, s, V] too for one case."""
    return (False, True) if case == "T=1.3 both" else (True,)


def _ranks(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    shard = PADDED // world_size
    out = {}
    for (seed, scale, temperature, top_k, top_p), case in _cases():
        for sequence_major in _layouts(case):
            logits, ids, g_logp, g_ent = make_case(seed, scale)
            mine = logits[..., rank * shard : (rank + 1) * shard].float()
            if sequence_major:
                mine = mine.transpose(0, 1).contiguous().transpose(0, 1)
            mine.requires_grad_()
            logp, ent = token_log_probs(
                mine,
                ids,
                tp_group=dist.group.WORLD,
                vocab_size=VOCAB,
                with_entropy=True,
                sequence_major=sequence_major,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
            )
            ((logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()).backward()
            out[(case, sequence_major)] = (logp.detach(), ent.detach(), mine.grad.clone())
    return out


@pytest.mark.distributed
def test_tp2_truncated_log_probs_entropy_and_grads_match_full_vocabulary_reference():
    results = run_on_ranks(_ranks, 2, timeout=300)
    for (seed, scale, temperature, top_k, top_p), case in _cases():
        logits, ids, g_logp, g_ent = make_case(seed, scale)
        ref_logp, ref_ent, ref_grad, inside = reference(logits, ids, g_logp, g_ent, temperature, top_k, top_p)
        assert inside.any() and (~inside).any(), case  # both kinds of target are exercised
        for sequence_major in _layouts(case):
            per_rank = [r[(case, sequence_major)] for r in results]
            for logp, ent, _ in per_rank:
                assert (logp.double() - ref_logp).abs().max() <= VALUE_ATOL, case
                assert (ent.double() - ref_ent).abs().max() <= VALUE_ATOL, case
            grad = torch.cat([g for _, _, g in per_rank], dim=-1).double()
            assert (grad - ref_grad).abs().max() <= GRAD_ATOL, case
        # The truncation matters here (guards against a test that cannot fail).
        untruncated = torch.log_softmax(logits[:, :-1, :VOCAB] / temperature, -1)
        plain = untruncated.gather(-1, ids[:, 1:, None])[..., 0]
        assert (plain - ref_logp[:, 1:])[inside].abs().max() > 1e-3, case


def test_flat_case_needs_more_than_one_candidate_round():
    logits, _, _, _ = make_case(7, 0.3)
    keep = reference_keep(logits[..., :VOCAB].reshape(-1, VOCAB) / 1.3, -1, 0.9)
    assert keep.sum(-1).min() > 2 * TOP_P_CANDIDATES  # > one round's candidates of two shards


@pytest.mark.parametrize("top_k,top_p", [(-1, 0.9), (20, 1.0), (20, 0.9), (1, 1.0), (300, 0.5), (-1, 0.01)])
def test_single_process_kept_set_equals_sorting(top_k, top_p):
    gen = torch.Generator().manual_seed(5)
    z = 3.0 * torch.randn(40, VOCAB, generator=gen)
    expected = reference_keep(z.double(), top_k, top_p)
    # the whole-row rule (HF engine) and the candidate method (trainer), on one process
    for masked in (
        truncate_logits(z, top_k=top_k, top_p=top_p),
        vocab_parallel_truncate(z, top_k=top_k, top_p=top_p),
    ):
        kept = masked == z
        assert torch.equal(kept, expected)
        assert torch.equal(torch.softmax(masked, -1) > 0, kept)  # masked: probability exactly 0
    assert torch.equal(expected, z >= keep_threshold(z, top_k=top_k, top_p=top_p)[:, None])


def test_nothing_to_truncate_and_bad_arguments():
    z = torch.randn(4, 10)
    assert keep_threshold(z) is None and truncate_logits(z) is z and vocab_parallel_truncate(z) is z
    for top_k, top_p in ((0, 1.0), (-2, 1.0), (2.5, 1.0), (-1, 0.0), (-1, 1.5)):
        with pytest.raises(ValueError, match="top_k|top_p"):
            check_truncation(top_k, top_p)
