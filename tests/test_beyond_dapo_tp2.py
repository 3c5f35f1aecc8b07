"""Issue 18 wiring: ``dapo_loss`` with ``token_weighting=entropy_top_rho`` and ``policy_loss=kl_cov``
at TP2 (gloo) against an independent single-process float64 reference.

The top-rho selection is over the valid tokens of each micro-batch (documented in
``algo/token_weighting.py``): the vocab-parallel entropy is already reduced over the TP group, so
both ranks select the same tokens without a gather. The reference gathers nothing: it takes the
full logits, ``log_softmax`` in float64, sorts the entropies by hand, and differentiates the
hand-written clipped surrogate. Tolerances: fp32 compute on logits of scale 3.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dapo_megatron.algo import AlgorithmConfig
from dapo_megatron.policy.loss import LossSettings, dapo_loss
from tests.helpers.distributed import run_on_ranks

LOSS_ATOL = 2e-5
GRAD_ATOL = 2e-6
B, S, VOCAB, PADDED = 3, 7, 250, 256
RHO = 0.3
EPS_LOW, EPS_HIGH = 0.2, 0.28
KL_RATIO, KL_COEF = 0.2, 0.7


def make_case():
    gen = torch.Generator().manual_seed(11)
    logits = 3.0 * torch.randn(B, S, PADDED, generator=gen, dtype=torch.float64)
    logits[..., VOCAB:] = 30.0
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    mask = torch.zeros(B, S)
    mask[0, 2:7] = 1
    mask[1, 3:5] = 1
    mask[2, 2:6] = 1
    adv = torch.tensor([[1.0], [-0.5], [2.0]]).expand(B, S) * mask
    old = -3.0 * torch.rand(B, S, generator=gen) * mask
    return logits, ids, mask, adv.contiguous(), old


def reference(mode: str):
    logits, ids, mask, adv, old = make_case()
    z = logits.clone().requires_grad_()
    log_p = torch.log_softmax(z[:, :-1, :VOCAB], dim=-1)
    logp = torch.zeros(B, S, dtype=torch.float64)
    ent = torch.zeros(B, S, dtype=torch.float64)
    logp[:, 1:] = log_p.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ent[:, 1:] = -(log_p.exp() * log_p).sum(-1)
    valid = [(i, t) for i in range(B) for t in range(S) if mask[i, t]]
    ratio = torch.exp(logp - old.double())
    a = adv.double()
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    w = torch.zeros(B, S, dtype=torch.float64)
    if mode == "top_rho":
        k = math.ceil(RHO * len(valid))
        for i, t in sorted(valid, key=lambda it: -float(ent.detach()[it]))[:k]:
            w[i, t] = 1.0
        loss = (w * pg).sum()
    else:  # kl_cov: + coef * |log r| on the top kl_ratio tokens by centred covariance
        lp_d = logp.detach()
        n = len(valid)
        mean_lp = sum(float(lp_d[it]) for it in valid) / n
        mean_a = sum(float(a[it]) for it in valid) / n
        cov = {it: (float(lp_d[it]) - mean_lp) * (float(a[it]) - mean_a) for it in valid}
        k = math.ceil(KL_RATIO * n)
        loss = sum(pg[it] for it in valid)
        for it in sorted(valid, key=lambda it: -cov[it])[:k]:
            loss = loss + KL_COEF * (logp[it] - old[it].double()).abs()
    loss.backward()
    return float(loss.detach()), z.grad, len(valid)


def _ranks(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    logits, ids, mask, adv, old = make_case()
    shard = PADDED // world_size
    mb = {"input_ids": ids, "response_mask": mask, "advantages": adv, "old_log_probs": old}
    out = {}
    for mode, settings in (
        ("top_rho", LossSettings(algorithm=AlgorithmConfig(token_weighting="entropy_top_rho", token_weighting_rho=RHO))),
        ("kl_cov", LossSettings(algorithm=AlgorithmConfig(policy_loss="kl_cov", kl_cov_ratio=KL_RATIO, kl_cov_coef=KL_COEF))),
    ):
        mine = logits[..., rank * shard : (rank + 1) * shard].float().requires_grad_()
        loss_sum, count, _ = dapo_loss(mb, mine, settings=settings, tp_group=dist.group.WORLD, vocab_size=VOCAB)
        loss_sum.backward()
        out[mode] = (float(loss_sum), int(count), mine.grad.double())
    return out


@pytest.mark.distributed
def test_tp2_entropy_top_rho_and_kl_cov_match_single_process_reference():
    results = run_on_ranks(_ranks, 2, timeout=240)
    shard = PADDED // 2
    for mode in ("top_rho", "kl_cov"):
        ref_loss, ref_grad, n_valid = reference(mode)
        for rank, res in enumerate(results):
            loss, count, grad = res[mode]
            assert count == n_valid  # token-mean denominator: all valid tokens, not the selected ones
            assert abs(loss - ref_loss) <= LOSS_ATOL, (mode, rank, loss, ref_loss)
            torch.testing.assert_close(
                grad, ref_grad[..., rank * shard : (rank + 1) * shard], rtol=0, atol=GRAD_ATOL
            )
