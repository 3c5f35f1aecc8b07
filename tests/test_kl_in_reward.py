"""KL in the reward (``algorithm.kl_coef > 0``, ``use_kl_loss: false``) on the sharded data plane.

DP2 (2 gloo ranks, two HF engines, the demo's tiny Llama): the real trainer collects a batch,
delivers each replica its rows (a group's responses land on both ranks), computes the old
log-probs and the reference log-probs of a *different* model (the frozen initial policy would give
KL 0 at step 1), and recomputes the group advantages of ``reward - kl_coef * KL``. The reference
is a single-process computation in plain torch over the whole gathered batch: the reference model's
log-probs from ``transformers``, ``k3 = exp(x) - x - 1`` with ``x = ref - old`` (capped at 10 per
token, as low_var_kl) summed over each response, the group mean and unbiased std. Tolerances (fp32): log-probs abs 1e-5, advantages abs
1e-5; with ``kl_coef = 0`` the recomputed advantages equal the engines' exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests._kl_reward_ranks import kl_reward_step
from tests.helpers.distributed import run_on_ranks

KL_COEF = 0.05
N = 8  # rollout.n of the demo config
LOGPROB_TOL = 1e-5
ADV_TOL = 1e-5

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from dapo_megatron.demo.model import make_demo_model
    from dapo_megatron.demo.task import write_demo_dataset

    root = tmp_path_factory.mktemp("kl_reward_demo")
    make_demo_model(root / "model", seed=0, steps=60)
    make_demo_model(root / "reference", seed=1, steps=10)
    write_demo_dataset(root / "data", num_train=128, num_val=16, seed=0, formats=("jsonl",))
    return root


def _hf_log_probs(model_dir, ids, lengths):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], dim=1)


def _group_advantages_by_hand(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(values)
    for g in groups.unique():
        members = groups == g
        v = values[members]
        if bool((v == v[0]).all()):
            continue  # no contrast: 0
        out[members] = (v - v.mean()) / (v.std(unbiased=True) + 1e-6)
    return out


def test_dp2_kl_in_reward_advantages_match_single_process(demo_root):
    results = run_on_ranks(
        kl_reward_step,
        2,
        str(demo_root),
        str(demo_root / "reference"),
        KL_COEF,
        # one generation round (GRPO-style: no dynamic sampling); responses cut at 4 tokens, the
        # truncated ones out of the loss (advantage 0) but in their group's baseline
        [
            "algorithm.dynamic_sampling=false",
            "trainer.gen_batch_size=4",
            "rollout.max_response_length=4",
            "algorithm.overlong_buffer_len=2",
            "algorithm.overlong_filter=true",
        ],
        timeout=600,
    )
    assert sorted(r["dp_rank"] for r in results) == [0, 1]
    ids = torch.cat([r["batch"]["sequence_ids"] for r in results])
    assert sorted(ids.tolist()) == list(range(ids.numel())), "every sequence on exactly one replica"
    groups_per_rank = [set((r["batch"]["sequence_ids"] // N).tolist()) for r in results]
    assert groups_per_rank[0] & groups_per_rank[1], (
        "no group is split over the replicas: the test could not fail"
    )

    for r in results:
        b, delivered = r["batch"], r["delivered"]
        # kl_coef = 0: the same advantages as the engines computed (bit for bit)
        assert torch.equal(r["advantages_at_kl_0"], delivered["advantages"])
        assert torch.equal(b["sequence_rewards"], delivered["sequence_rewards"])

    # The single-process reference over the whole batch, in global sequence order.
    def cat(key):
        return [t for r in results for t in torch.unbind(r["batch"][key])]

    order = torch.argsort(ids)
    width = max(t.numel() for t in cat("input_ids"))

    def stacked(key):
        rows = cat(key)
        if rows[0].dim() == 0:
            return torch.stack(rows)[order]
        return torch.stack([torch.nn.functional.pad(t, (0, width - t.numel())) for t in rows])[order]

    input_ids, lengths, prompts = stacked("input_ids"), stacked("seq_lengths"), stacked("prompt_lengths")
    old, ref, mask = stacked("old_log_probs"), stacked("ref_log_probs"), stacked("response_mask")
    rewards, advantages = stacked("sequence_rewards"), stacked("advantages")
    pos = torch.arange(width)[None]
    response = (pos >= prompts[:, None]) & (pos < lengths[:, None])

    hf_ref = _hf_log_probs(demo_root / "reference", input_ids, lengths)
    assert (ref - hf_ref)[response].abs().max().item() <= LOGPROB_TOL
    hf_old = _hf_log_probs(demo_root / "model", input_ids, lengths)
    assert (old - hf_old)[response].abs().max().item() <= LOGPROB_TOL

    x = (hf_ref.double() - hf_old.double()) * response
    assert x.abs().max() < 20  # the clamp of x in low_var_kl is not reached
    k3 = torch.exp(x) - x - 1
    clamped = int((k3 > 10).sum())  # low_var_kl caps each token's estimate at 10 (as verl)
    kl = k3.clamp(max=10).sum(1)
    want = _group_advantages_by_hand(rewards - KL_COEF * kl, torch.arange(len(kl)) // N)
    want_tokens = want.float()[:, None] * mask
    diff = (advantages - want_tokens).abs().max().item()
    plain = _group_advantages_by_hand(rewards, torch.arange(len(kl)) // N).float()[:, None] * mask
    effect = (want_tokens - plain).abs().max().item()
    filtered = int((mask.sum(1) == 0).sum())
    print(
        f"max|adv - single process| {diff:.2e}; the KL moves advantages by up to {effect:.3f}; "
        f"mean KL sum {kl.mean():.4f}; {filtered} of {len(kl)} rows out of the loss; "
        f"{clamped} token estimates capped at 10"
    )
    assert effect > 1e-2, "the KL barely changes the advantages: the test could not fail"
    assert 0 < filtered < len(kl), "overlong filtering is not exercised"
    assert diff <= ADV_TOL
    for r in results:
        assert r["metrics"]["actor/kl_in_reward"] == pytest.approx(kl.mean().item(), rel=1e-5)
