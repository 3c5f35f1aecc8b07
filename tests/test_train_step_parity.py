"""One DAPO update on Megatron-Core equals a plain single-process PyTorch reference.

Reference (written out here, independent of dapo_megatron): transformers forward, log_softmax,
the clipped surrogate ``max(-A r, -A clip(r, 1-0.2, 1+0.28))``, summed over the valid response
tokens of the mini-batch and divided by their number, backward, ``clip_grad_norm_``, AdamW
(no weight decay on 1-D parameters, as Megatron). Compared per layout:
loss (rel 1e-5), clipped gradients (abs 1e-6), updated weights (abs 1e-5 = 1% of lr). Adam's first
step is ``lr * g / (|g| + eps)``: with eps=1e-8 it turns fp32 noise in near-zero gradients (1e-8 at
gradients of 1e-8) into weight differences of a sizeable fraction of lr, so the test uses
adam_eps=1e-5, which keeps the update smooth in g while leaving it far from linear.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests._train_ranks import dapo_update, old_log_probs
from tests.helpers.distributed import run_on_ranks

ARCHS = ("qwen2-tied", "qwen3")
OPT = dict(
    lr=1e-3,
    weight_decay=0.1,
    clip_grad=1.0,
    lr_warmup_steps=0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_eps=1e-5,
)
# Even sequences (DP rank 0 under DP2) have long responses, odd ones short: unequal token counts per rank.
PROMPT_LENS = [4, 3, 5, 6, 3, 4, 5, 3]
RESPONSE_LENS = [21, 2, 17, 3, 19, 1, 23, 2]


def _hf(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def _log_probs(model, ids, lengths):
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    logits = model(input_ids=ids, attention_mask=mask.long()).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], dim=1)


def make_batch(hf_dir, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, s = len(PROMPT_LENS), max(p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS))
    ids = torch.zeros(n, s, dtype=torch.long)
    resp = torch.zeros(n, s)
    lengths = torch.tensor([p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS)])
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids[i, : p + r] = torch.randint(3, 1003, (p + r,), generator=g)
        resp[i, p : p + r] = 1
    adv = (
        torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None] * torch.rand(n, 1, generator=g) * 2
    )
    with torch.no_grad():
        logp = _log_probs(_hf(hf_dir), ids, lengths)
    old = (logp + 0.3 * torch.randn(n, s, generator=g)) * resp
    return {
        "input_ids": ids,
        "seq_lengths": lengths,
        "response_mask": resp,
        "advantages": adv.expand(n, s) * resp,
        "old_log_probs": old,
    }


def reference_update(hf_dir, batch, mini_batch_size, lrs=None):
    """``lrs``: the learning rate of each mini-batch update (default: ``OPT["lr"]`` for all)."""
    model = _hf(hf_dir).train()
    params = dict(model.named_parameters())
    optim = torch.optim.AdamW(
        [
            {"params": [p for p in params.values() if p.ndim > 1], "weight_decay": OPT["weight_decay"]},
            {"params": [p for p in params.values() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=OPT["lr"],
        betas=(OPT["adam_beta1"], OPT["adam_beta2"]),
        eps=OPT["adam_eps"],
    )
    total_loss, total_tokens = 0.0, 0
    for start in range(0, batch["input_ids"].shape[0], mini_batch_size):
        sl = slice(start, start + mini_batch_size)
        logp = _log_probs(model, batch["input_ids"][sl], batch["seq_lengths"][sl])
        mask = batch["response_mask"][sl].bool()
        ratio = torch.exp(logp - batch["old_log_probs"][sl])
        adv = batch["advantages"][sl]
        per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 0.2, 1 + 0.28))
        loss_sum = per_token[mask].sum()
        tokens = int(mask.sum())
        optim.zero_grad()
        (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip_grad"])
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        if lrs is not None:
            for group in optim.param_groups:
                group["lr"] = lrs[start // mini_batch_size]
        optim.step()
        total_loss += loss_sum.item()
        total_tokens += tokens
    weights = {n: p.detach().clone() for n, p in params.items()}
    return total_loss / total_tokens, grads, weights


@pytest.fixture(scope="module")
def setup(tiny_hf_dirs):
    dirs = {a: tiny_hf_dirs[a] for a in ARCHS}
    batches = {a: make_batch(d) for a, d in dirs.items()}
    refs = {a: reference_update(d, batches[a], mini_batch_size=8) for a, d in dirs.items()}
    return dirs, batches, refs


def _compare(name, got, ref, dirs):
    for arch in dirs:
        metrics, grads, weights = got[arch]
        ref_loss, ref_grads, ref_weights = ref[arch]
        assert sorted(grads) == sorted(ref_grads), f"{name}/{arch}: parameter names differ"
        g = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
        w = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        print(
            f"{name} {arch}: loss {metrics['loss']:.6f} vs {ref_loss:.6f}, max|grad diff| {g:.2e}, max|weight diff| {w:.2e}"
        )
        assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5), f"{name}/{arch}: loss"
        assert metrics["valid_tokens"] == sum(RESPONSE_LENS)
        assert g <= 1e-6, f"{name}/{arch}: max |grad diff| {g:.3e}"
        assert w <= 1e-5, f"{name}/{arch}: max |weight diff| {w:.3e}"


LAYOUTS = {
    # name: (world, tp, pp, sp, micro_batch_size)
    "single": (1, 1, 1, False, 8),
    "TP2": (2, 2, 1, False, 8),
    "PP2-4mb": (2, 1, 2, False, 2),
    "TP2+SP": (2, 2, 1, True, 4),
    "TP2xPP2+SP": (4, 2, 2, True, 2),
    "DP2": (2, 1, 1, False, 2),
    "DP2xTP2": (4, 2, 1, False, 4),
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dapo_update_matches_reference(layout, setup):
    dirs, batches, refs = setup
    world, tp, pp, sp, micro = LAYOUTS[layout]
    got = run_on_ranks(dapo_update, world, dirs, tp, pp, sp, batches, 8, micro, OPT, timeout=600)[0]
    _compare(layout, got, refs, dirs)


# Megatron's distributed optimizer (ZeRO-1), on gloo through dapo_megatron.parallel.cpu: gradients
# reduce-scattered, Adam on each rank's shard, parameters all-gathered. Gradients are compared
# after putting the DP shards of the clipped gradient back together (tests/_train_ranks.py).
DISTOPT_LAYOUTS = {"DP2": (2, 1, 1, False, 2), "DP2xTP2": (4, 2, 1, False, 4)}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(DISTOPT_LAYOUTS))
def test_distributed_optimizer_update_matches_reference(layout, setup):
    dirs, batches, refs = setup
    world, tp, pp, sp, micro = DISTOPT_LAYOUTS[layout]
    got = run_on_ranks(
        dapo_update, world, dirs, tp, pp, sp, batches, 8, micro, OPT, "fp32", "none", 1, 1, True, timeout=600
    )[0]
    for arch in dirs:
        assert got[arch][0]["distributed_optimizer"], f"{layout}/{arch}: not the distributed optimizer"
    _compare(f"{layout}+distopt", got, refs, dirs)


@pytest.mark.distributed
def test_global_token_normalisation_differs_from_per_rank_mean(setup):
    """DP2 ranks hold 103 vs 8 valid tokens. The global token mean is what we compute (checked
    above); a per-rank mean averaged over ranks would give a measurably different loss."""
    dirs, batches, refs = setup
    arch = ARCHS[0]
    b = batches[arch]
    model = _hf(dirs[arch])
    with torch.no_grad():
        logp = _log_probs(model, b["input_ids"], b["seq_lengths"])
    ratio = torch.exp(logp - b["old_log_probs"])
    per_token = torch.maximum(-b["advantages"] * ratio, -b["advantages"] * ratio.clamp(0.8, 1.28))
    mask = b["response_mask"].bool()
    rank_means = [per_token[i::2][mask[i::2]].mean().item() for i in range(2)]
    assert [int(mask[i::2].sum()) for i in range(2)] == [80, 8]
    global_mean = per_token[mask].mean().item()
    assert global_mean == pytest.approx(refs[arch][0], rel=1e-5)
    assert abs(sum(rank_means) / 2 - global_mean) > 1e-2, (
        "test batch does not separate the two normalisations"
    )


@pytest.mark.distributed
def test_minibatches_each_normalised_by_own_tokens(setup):
    """Two mini-batches = two optimizer steps, each divided by its own global token count;
    micro-batch count (1 vs 4 per mini-batch) does not change the result."""
    dirs, batches, _ = setup
    arch = ARCHS[0]
    ref = {arch: reference_update(dirs[arch], batches[arch], mini_batch_size=4)}
    one = {arch: dirs[arch]}
    got_mb4 = run_on_ranks(dapo_update, 1, one, 1, 1, False, batches, 4, 4, OPT, timeout=600)[0]
    got_mb1 = run_on_ranks(dapo_update, 2, one, 1, 1, False, batches, 4, 1, OPT, timeout=600)[0]
    _compare("2 mini-batches, 1 micro-batch", got_mb4, ref, one)
    _compare("2 mini-batches, DP2 x 2 micro-batches", got_mb1, ref, one)


@pytest.mark.distributed
def test_old_log_probs_match_reference(tiny_hf_dirs):
    arch = "qwen2"
    b = make_batch(tiny_hf_dirs[arch])
    with torch.no_grad():
        ref = _log_probs(_hf(tiny_hf_dirs[arch]), b["input_ids"], b["seq_lengths"])
    got = {}
    for r in run_on_ranks(old_log_probs, 4, tiny_hf_dirs[arch], 2, 1, b, timeout=600):
        got.update(r or {})
    assert sorted(got) == list(range(8))
    for i, n in enumerate(b["seq_lengths"].tolist()):
        assert (got[i][:n] - ref[i, :n]).abs().max().item() <= 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recomputation_keeps_the_update_exact(recompute, setup):
    dirs, batches, refs = setup
    one = {ARCHS[1]: dirs[ARCHS[1]]}
    got = run_on_ranks(dapo_update, 2, one, 2, 1, True, batches, 8, 4, OPT, "fp32", recompute, timeout=600)[0]
    _compare(f"TP2+SP recompute={recompute}", got, refs, one)


@pytest.mark.distributed
def test_bf16_mixed_precision_update(setup):
    """bf16 parameters and activations with fp32 master weights in the optimizer; log-probs and
    the loss in fp32. The loss stays within bf16 rounding of the fp32 reference."""
    dirs, batches, refs = setup
    arch = ARCHS[0]
    got = run_on_ranks(
        dapo_update, 2, {arch: dirs[arch]}, 2, 1, True, batches, 8, 4, OPT, "bf16", timeout=600
    )[0]
    metrics, grads, weights = got[arch]
    print(f"bf16 loss {metrics['loss']:.5f} vs fp32 reference {refs[arch][0]:.5f}")
    assert metrics["master_dtypes"] == ["torch.float32"]
    assert metrics["loss"] == pytest.approx(refs[arch][0], rel=0.05, abs=0.02)
    assert all(torch.isfinite(g).all() for g in grads.values())
    moved = max((weights[k] - refs[arch][2][k]).abs().max().item() for k in weights)
    assert moved < 0.05, "bf16 update went somewhere else entirely"
