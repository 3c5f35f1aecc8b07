"""The policy log-prob is that of the sampling distribution ``softmax(logits / T)`` (issue 20).

``token_log_probs`` (used for old, new and reference log-probs and the entropy) at TP2 against
``log_softmax(logits / T)`` of the gathered logits in float64 autograd, for T in {0.6, 1.0, 1.3},
in both memory layouts, with random upstream gradients on log-probs and entropy. Tolerances
as in tests/test_logprobs.py (fp32 compute, logits of scale 4).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dapo_megatron.algo import AlgorithmConfig
from dapo_megatron.policy.loss import LossSettings, token_log_probs
from dapo_megatron.policy.metrics import summarize_loss_metrics
from tests.helpers.distributed import run_on_ranks

VALUE_ATOL = 5e-6  # log-probs and entropy, fp32
GRAD_ATOL = 3e-6  # gradient of the logits, fp32
TEMPERATURES = (0.6, 1.0, 1.3)
B, S, VOCAB, PADDED = 2, 6, 250, 256


def make_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = 4.0 * torch.randn(B, S, PADDED, generator=gen, dtype=torch.float64)
    logits[..., VOCAB:] = 30.0  # padding: must not leak into the softmax
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    g_logp = torch.randn(B, S, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(B, S, generator=gen, dtype=torch.float64)
    return logits, ids, g_logp, g_ent


def reference(seed: int, temperature: float):
    """``out[:, t] = log_softmax(z[:, t-1] / T)[ids[:, t]]``, entropy of the same distribution."""
    logits, ids, g_logp, g_ent = make_case(seed)
    z = logits.clone().requires_grad_()
    log_p = torch.log_softmax(z[:, :-1, :VOCAB] / temperature, dim=-1)
    logp = torch.zeros(B, S, dtype=torch.float64)
    ent = torch.zeros(B, S, dtype=torch.float64)
    logp[:, 1:] = log_p.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ent[:, 1:] = -(log_p.exp() * log_p).sum(-1)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, z.grad


def _ranks(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    shard = PADDED // world_size
    out = {}
    for seed, temperature in enumerate(TEMPERATURES):
        for sequence_major in (False, True):
            logits, ids, g_logp, g_ent = make_case(seed)
            mine = logits[..., rank * shard : (rank + 1) * shard].float()
            if sequence_major:  # [b, s, V] view of [s, b, V] memory, as GPTModel hands it out
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
            )
            ((logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()).backward()
            out[(temperature, sequence_major)] = (logp.detach(), ent.detach(), mine.grad.clone())
    return out


@pytest.mark.distributed
def test_tp2_log_probs_and_entropy_of_tempered_distribution():
    results = run_on_ranks(_ranks, 2, timeout=240)
    for seed, temperature in enumerate(TEMPERATURES):
        ref_logp, ref_ent, ref_grad = reference(seed, temperature)
        for sequence_major in (False, True):
            per_rank = [r[(temperature, sequence_major)] for r in results]
            case = f"T={temperature} sequence_major={sequence_major}"
            for logp, ent, _ in per_rank:
                assert (logp.double() - ref_logp).abs().max() <= VALUE_ATOL, case
                assert (ent.double() - ref_ent).abs().max() <= VALUE_ATOL, case
            grad = torch.cat([g for _, _, g in per_rank], dim=-1).double()
            assert (grad - ref_grad).abs().max() <= GRAD_ATOL, case
    # The temperature matters at this scale (guards against a test that cannot fail).
    assert (reference(0, 0.6)[0] - reference(0, 1.0)[0]).abs().max() > 1e-1


def test_temperature_must_be_positive():
    logits, ids, _, _ = make_case(0)
    with pytest.raises(ValueError, match="temperature"):
        token_log_probs(logits.float(), ids, tp_group=None, vocab_size=VOCAB, temperature=0.0)


def test_loss_settings_carry_rollout_temperature():
    settings = LossSettings(algorithm=AlgorithmConfig(), temperature=0.6)
    assert settings.temperature == 0.6


def test_update_response_length_does_not_overwrite_rollout_keys():
    """The update's response lengths (kept, trained-on sequences) are ``train/response_length/*``;
    ``response_length/*`` stay the rollout's (every response generated)."""
    totals = {
        k: 1.0
        for k in (
            "loss_sum", "loss_count", "tokens", "pg_loss_sum", "entropy_sum", "approx_kl_sum",
            "clipfrac_low_sum", "clipfrac_high_sum", "clipfrac_dual_sum", "ratio_sum", "ratio_max",
        )
    }
    totals.update(sequences=2.0, response_length_sum=10.0, response_length_max=7.0)
    m = summarize_loss_metrics(totals)
    assert not {k for k in m if k.startswith("response_length/")}
    assert m["train/response_length/mean"] == 5.0 and m["train/response_length/max"] == 7.0


def test_dr_grpo_normaliser_independent_of_micro_batching():
    """``seq-mean-token-sum-norm``: the global loss (sum over micro-batches / summed count) is the
    same with 1 and with 4 micro-batches (trimmed to different widths) of the same sequences,
    and its denominator is ``N * max_response_length``, not the trimmed widths (prompt included)."""
    from dapo_megatron.policy.loss import dapo_loss
    from dapo_megatron.policy.train_step import make_microbatches

    gen = torch.Generator().manual_seed(3)
    n, s, vocab, max_response = 4, 9, 50, 16
    lengths = torch.tensor([9, 4, 6, 3])
    prompt = 2
    ids = torch.randint(0, vocab, (n, s), generator=gen)
    pos = torch.arange(s)
    mask = (pos >= prompt) & (pos < lengths[:, None])
    batch = {
        "input_ids": ids,
        "seq_lengths": lengths,
        "response_mask": mask.float(),
        "advantages": torch.randn(n, 1, generator=gen).expand(n, s).contiguous() * mask,
        "old_log_probs": -torch.rand(n, s, generator=gen),
    }
    logits = torch.randn(n, s, vocab, generator=gen)
    settings = LossSettings(algorithm=AlgorithmConfig(loss_agg_mode="seq-mean-token-sum-norm"), norm_length=max_response)

    def global_loss(micro_batch_size):
        total, count = 0.0, 0
        for mb in make_microbatches(batch, list(range(n)), micro_batch_size):
            width = mb["input_ids"].shape[1]
            loss_sum, c, _ = dapo_loss(
                mb, logits[mb["index"], :width], settings=settings, tp_group=None, vocab_size=vocab
            )
            total, count = total + float(loss_sum), count + int(c)
        return total / count, count

    one, count_one = global_loss(4)
    four, count_four = global_loss(1)
    assert count_one == count_four == n * max_response
    assert abs(one - four) <= 1e-6 * max(1.0, abs(one)), (one, four)
    with pytest.raises(ValueError, match="norm_length"):
        dapo_loss(
            make_microbatches(batch, [0], 1)[0],
            logits[:1],
            settings=LossSettings(algorithm=AlgorithmConfig(loss_agg_mode="seq-mean-token-sum-norm")),
            tp_group=None,
            vocab_size=vocab,
        )
