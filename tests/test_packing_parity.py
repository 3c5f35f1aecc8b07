"""Packed (THD) micro-batches and context parallelism give the single-process update.

Reference: the plain PyTorch DAPO update of ``tests/test_train_step_parity.py`` (transformers
forward on right-padded sequences, clipped surrogate, global token mean, ``clip_grad_norm_``,
AdamW), independent of dapo_megatron. Every layout below (packed micro-batches, DP2 also padded; CP always
packs) must match it: loss (rel 1e-5), pre-clip grad norm (rel 1e-5),
clipped gradients (abs 1e-6), updated weights (abs 1e-5), old log-probs (abs 1e-5).

The batch: 8 sequences, one 40 tokens long and the others 3-6 (more than 10x shorter), two of
length 3 (shorter than the 2 * CP = 4 zigzag chunks under CP2), and unequal response tokens per
DP rank (7 on rank 0, 42 on rank 1 under DP2). The token budgets force several bins with
different counts per rank before equalisation.
"""

import pytest
import torch

from tests._packing_ranks import packed_updates
from tests.helpers.distributed import run_on_ranks
from tests.test_train_step_parity import OPT, _hf, _log_probs, reference_update

ARCH = "qwen2-tied"
PROMPT_LENS = [2, 4, 3, 2, 3, 2, 4, 3]
RESPONSE_LENS = [1, 36, 2, 3, 2, 1, 2, 2]

# name: (tp, pp, sp, cp, micro_batch_size, max_tokens_per_micro_batch)
WORLD2 = {
    "TP2 packed": (2, 1, False, 1, 4, 48),
    "PP2 packed": (1, 2, False, 1, 2, 40),
    "TP2+SP packed": (2, 1, True, 1, 4, 48),
    "DP2 padded": (1, 1, False, 1, 2, None),
    "DP2 packed": (1, 1, False, 1, 2, 48),
    "CP2": (1, 1, False, 2, 4, None),
    "CP2 budget": (1, 1, False, 2, 4, 24),
}
WORLD4 = {
    "CP2xTP2": (2, 1, False, 2, 4, 24),
    "DP2xCP2": (1, 1, False, 2, 4, 24),
}


def make_batch(hf_dir, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS)])
    n, s = len(lengths), int(lengths.max())
    ids = torch.zeros(n, s, dtype=torch.long)
    resp = torch.zeros(n, s)
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids[i, : p + r] = torch.randint(3, 1003, (p + r,), generator=g)
        resp[i, p : p + r] = 1
    adv = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None] * torch.rand(n, 1, generator=g) * 2
    with torch.no_grad():
        logp = _log_probs(_hf(hf_dir), ids, lengths)
    old = (logp + 0.3 * torch.randn(n, s, generator=g)) * resp
    batch = {
        "input_ids": ids,
        "seq_lengths": lengths,
        "response_mask": resp,
        "advantages": adv.expand(n, s) * resp,
        "old_log_probs": old,
    }
    return batch, logp


def _reference_grad_norm(hf_dir, batch):
    model = _hf(hf_dir).train()
    logp = _log_probs(model, batch["input_ids"], batch["seq_lengths"])
    mask = batch["response_mask"].bool()
    ratio = torch.exp(logp - batch["old_log_probs"])
    adv = batch["advantages"]
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    (per_token[mask].sum() / mask.sum()).backward()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()


@pytest.fixture(scope="module")
def setup(tiny_hf_dirs):
    hf_dir = tiny_hf_dirs[ARCH]
    batch, ref_logp = make_batch(hf_dir)
    ref = reference_update(hf_dir, batch, mini_batch_size=len(PROMPT_LENS))
    return hf_dir, batch, ref_logp, ref, _reference_grad_norm(hf_dir, batch)


def _check(results, setup, tol=1.0):
    """``tol`` scales every tolerance (GPU kernels differ from the CPU reference more than gloo ranks)."""
    _, batch, ref_logp, (ref_loss, ref_grads, ref_weights), ref_norm = setup
    for name, (metrics, grads, weights, old) in results.items():
        g = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
        w = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        lp = max((old[i][:n] - ref_logp[i, :n]).abs().max().item() for i, n in enumerate(batch["seq_lengths"].tolist()))
        print(
            f"{name}: loss {metrics['loss']:.7f} vs {ref_loss:.7f}, grad norm {metrics['grad_norm']:.6f} vs "
            f"{ref_norm:.6f}, max|grad diff| {g:.1e}, max|weight diff| {w:.1e}, max|logp diff| {lp:.1e}"
        )
        assert sorted(old) == list(range(len(PROMPT_LENS))), f"{name}: old log-probs missing"
        assert metrics["valid_tokens"] == sum(RESPONSE_LENS), name
        assert metrics["train/response_length/mean"] == pytest.approx(sum(RESPONSE_LENS) / len(RESPONSE_LENS)), name
        assert metrics["train/response_length/max"] == max(RESPONSE_LENS), name
        assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5 * tol), f"{name}: loss"
        assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5 * tol), f"{name}: grad norm"
        assert g <= 1e-6 * tol, f"{name}: max |grad diff| {g:.3e}"
        assert w <= 1e-5 * tol, f"{name}: max |weight diff| {w:.3e}"
        assert lp <= 1e-5 * tol, f"{name}: max |old log-prob diff| {lp:.3e}"


@pytest.mark.distributed
def test_packed_and_cp_layouts_match_reference_world2(setup):
    hf_dir, batch = setup[0], setup[1]
    runs = [(k, *v) for k, v in WORLD2.items()]
    results = run_on_ranks(packed_updates, 2, hf_dir, runs, batch, OPT, timeout=600)[0]
    _check(results, setup)
    # packing changes the layout, not the numbers: old log-probs agree between padded and packed
    lengths = batch["seq_lengths"].tolist()
    for a, b in (("DP2 padded", "TP2 packed"), ("DP2 padded", "DP2 packed"), ("DP2 padded", "CP2")):
        diff = max((results[a][3][i][:n] - results[b][3][i][:n]).abs().max().item() for i, n in enumerate(lengths))
        assert diff <= 1e-6, f"old log-probs {a} vs {b}: {diff:.2e}"


@pytest.mark.distributed
def test_cp_with_tp_and_dp_match_reference_world4(setup):
    hf_dir, batch = setup[0], setup[1]
    runs = [(k, *v) for k, v in WORLD4.items()]
    results = run_on_ranks(packed_updates, 4, hf_dir, runs, batch, OPT, timeout=600)[0]
    _check(results, setup)


@pytest.mark.gpu
def test_packed_on_one_gpu_matches_reference(setup):
    """On a GPU the packed path runs TransformerEngine's THD attention when TE is installed (else
    the per-sequence SDPA); fp32 throughout, tolerances 10x the CPU ones."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf_dir, batch = setup[0], setup[1]
    runs = [("1 GPU padded", 1, 1, False, 1, 4, None), ("1 GPU packed", 1, 1, False, 1, 4, 48)]
    results = run_on_ranks(packed_updates, 1, hf_dir, runs, batch, OPT, timeout=600)[0]
    _check(results, setup, tol=10.0)
