"""Vocab-parallel log-probs and entropy against log_softmax of the gathered full vocabulary.

Reference: the full (padded) logits tensor is drawn from a seed in float64, the true-vocabulary
part goes through ``torch.log_softmax`` and autograd, with random upstream gradients on both the
log-probs and the entropy. Ranks receive only their fp32/bf16 shard of the same tensor and send
back their outputs and shard gradients; the test concatenates the shard gradients and compares
them with the reference gradient (padding columns included, which must be exactly zero).

Tolerances are the constants below (fp32 compute; measured max errors are ~6e-7 for values and
~4e-7 for gradients, with logits of scale 4 and a vocabulary of ~1000).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dapo_megatron.policy.logprobs import vocab_parallel_log_probs
from tests.helpers.distributed import run_on_ranks

FP32_VALUE_ATOL = 5e-6  # log-probs (magnitude <= ~40: a few fp32 ulps) and entropy
FP32_GRAD_ATOL = 3e-6  # gradients of the logits (magnitude <= ~4), fp32
BF16_GRAD_RTOL = 2.0**-8  # bf16 gradient: one rounding of an fp32-accurate value (half ulp 2^-9)
FP16_GRAD_RTOL = 2.0**-10  # fp16 gradient: half ulp 2^-11 ...
FP16_GRAD_FLOOR = 2.0**-14  # ... relative to max(|ref|, 2^-14): fp16 is subnormal below 2^-14
CHUNK_ATOL = 1e-6  # chunked vs unchunked (the per-row arithmetic is the same)

SHAPE = (2, 7)  # leading dims [B, T]


# ---------------------------------------------------------------------------------------------
# Shared case definitions and reference (used by the parent process and by the ranks)
# ---------------------------------------------------------------------------------------------
def make_case(seed: int, vocab_size: int, padded_vocab: int, shape: tuple[int, ...] = SHAPE):
    """Full padded logits [*shape, padded_vocab] (float64), targets and upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    logits = 4.0 * torch.randn(*shape, padded_vocab, generator=gen, dtype=torch.float64)
    # Large padding logits: if they leaked into the softmax the results would be far off.
    logits[..., vocab_size:] = 30.0 + torch.randn(*shape, padded_vocab - vocab_size, generator=gen)
    targets = torch.randint(0, vocab_size, shape, generator=gen)
    flat = targets.view(-1)
    flat[0] = vocab_size - 1  # last valid id (last shard, next to the padding)
    flat[1] = 0
    grad_log_probs = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad_entropy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return logits, targets, grad_log_probs, grad_entropy


def reference(logits, targets, vocab_size, grad_log_probs, grad_entropy, with_entropy=True):
    """log_softmax over the true vocabulary of the gathered logits, float64 autograd."""
    full = logits.detach().double().requires_grad_()
    log_p = torch.log_softmax(full[..., :vocab_size], dim=-1)
    log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = 0.0
    if grad_log_probs is not None:
        loss = loss + (log_probs * grad_log_probs).sum()
    if with_entropy and grad_entropy is not None:
        loss = loss + (entropy * grad_entropy).sum()
    if isinstance(loss, torch.Tensor):
        loss.backward()
    return log_probs.detach(), entropy.detach(), full.grad


# Cases: name -> (vocab_size, padded_vocab, dtype, with_entropy, use lp grad, use entropy grad, chunk)
CASES = {
    "fp32_pad1004": (1003, 1004, torch.float32, True, True, True, None),
    "fp32_pad1008": (1003, 1008, torch.float32, True, True, True, None),
    "fp32_logp_only": (1003, 1008, torch.float32, False, True, False, None),
    "fp32_entropy_grad_only": (1003, 1008, torch.float32, True, False, True, None),
    "fp32_chunked": (1003, 1008, torch.float32, True, True, True, 3),
    # with tp=4, rank 3 holds only padding ids [900, 1200)
    "fp32_padding_only_shard": (700, 1200, torch.float32, True, True, True, 4),
    "bf16": (1003, 1008, torch.bfloat16, True, True, True, None),
    "bf16_chunked": (1003, 1008, torch.bfloat16, True, True, True, 5),
    "fp16": (1003, 1008, torch.float16, True, True, True, None),
}


def run_case(name: str, seed: int, group_rank: int, group_size: int, tp_group, unchunked: bool = False):
    """Run one case on this rank's shard; return (log_probs, entropy, shard grad) as float64."""
    vocab_size, padded, dtype, with_entropy, use_lp, use_ent, chunk = CASES[name]
    chunk = None if unchunked else chunk
    logits, targets, g_lp, g_ent = make_case(seed, vocab_size, padded)
    shard_size = padded // group_size
    shard = logits[..., group_rank * shard_size : (group_rank + 1) * shard_size]
    shard = shard.to(dtype).contiguous().requires_grad_()
    log_probs, entropy = vocab_parallel_log_probs(
        shard,
        targets,
        tp_group=tp_group,
        with_entropy=with_entropy,
        chunk_size=chunk,
        vocab_size=vocab_size,
    )
    loss = torch.zeros((), dtype=torch.float32)
    if use_lp:
        loss = loss + (log_probs * g_lp.float()).sum()
    if use_ent:
        loss = loss + (entropy * g_ent.float()).sum()
    loss.backward()
    assert log_probs.dtype == torch.float32 and log_probs.shape == targets.shape
    assert shard.grad.dtype == dtype
    ent = entropy.detach().double() if entropy is not None else None
    return log_probs.detach().double(), ent, shard.grad.double()


def check_case(name: str, seed: int, per_rank: list[tuple]) -> dict[str, float]:
    """Compare per-rank results of one case with the gathered reference; return max errors."""
    vocab_size, padded, dtype, with_entropy, use_lp, use_ent, _ = CASES[name]
    logits, targets, g_lp, g_ent = make_case(seed, vocab_size, padded)
    logits = logits.to(dtype).double()  # the reference sees the same rounded inputs as the ranks
    ref_lp, ref_ent, ref_grad = reference(
        logits, targets, vocab_size, g_lp if use_lp else None, g_ent if use_ent else None, with_entropy
    )
    errors = {}
    for rank, (lp, ent, _) in enumerate(per_rank):
        errors[f"log_probs[rank{rank}]"] = (lp - ref_lp).abs().max().item()
        if with_entropy:
            errors[f"entropy[rank{rank}]"] = (ent - ref_ent).abs().max().item()
        else:
            assert ent is None
    grad = torch.cat([g for _, _, g in per_rank], dim=-1)
    assert grad.shape == ref_grad.shape
    assert torch.all(grad[..., vocab_size:] == 0), f"{name}: padding columns got a gradient"
    if dtype != torch.float32:
        # scale-aware: bf16 keeps 8 significant bits, fp16 11
        floor = 1e-6 if dtype == torch.bfloat16 else FP16_GRAD_FLOOR
        errors["grad_rel"] = ((grad - ref_grad).abs() / ref_grad.abs().clamp_min(floor)).max().item()
    else:
        errors["grad"] = (grad - ref_grad).abs().max().item()
    return errors


def assert_errors(name: str, errors: dict[str, float]) -> None:
    dtype = CASES[name][2]
    for key, err in errors.items():
        if key == "grad_rel":
            tol = BF16_GRAD_RTOL if dtype == torch.bfloat16 else FP16_GRAD_RTOL
        elif key == "grad":
            tol = FP32_GRAD_ATOL
        else:
            tol = FP32_VALUE_ATOL
        assert err <= tol, f"{name} ({dtype}): {key} max error {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------------
# Rank functions (module level: spawned processes import them)
# ---------------------------------------------------------------------------------------------
def _ranks_tp4_tp2_megatron(rank: int, world_size: int) -> dict:
    """On 4 ranks: TP=4 over the default group, TP=2 over new_group pairs {0,2},{1,3} (group rank
    differs from global rank), and TP=2 from Megatron's parallel_state (groups {0,1},{2,3})."""
    from megatron.core import parallel_state

    out: dict = {"tp4": {}, "tp4_unchunked": {}, "tp2_new_group": {}, "tp2_megatron": {}}
    world = dist.group.WORLD
    for seed, name in enumerate(CASES):
        out["tp4"][name] = run_case(name, seed, rank, world_size, world)
        if CASES[name][-1] is not None:
            out["tp4_unchunked"][name] = run_case(name, seed, rank, world_size, world, unchunked=True)

    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group
    pair = pairs[rank % 2]
    pair_rank = dist.get_rank(group=pair)
    for seed, name in enumerate(CASES):
        out["tp2_new_group"][name] = (pair_rank, run_case(name, 100 + seed, pair_rank, 2, pair))

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name in ("fp32_pad1008", "bf16", "fp32_chunked"):
        out["tp2_megatron"][name] = (tp_rank, run_case(name, 200, tp_rank, 2, tp_group))
    return out


@pytest.fixture(scope="module")
def four_rank_results():
    return run_on_ranks(_ranks_tp4_tp2_megatron, 4, timeout=240)


def _group_results(results: list[dict], key: str, name: str, members: list[int]) -> list[tuple]:
    """Per-rank results of one case for the ranks of one group, ordered by group rank."""
    by_group_rank = dict(results[r][key][name] for r in members)
    return [by_group_rank[i] for i in range(len(members))]


@pytest.mark.distributed
def test_tp4_matches_gathered_log_softmax(four_rank_results):
    for seed, name in enumerate(CASES):
        per_rank = [four_rank_results[r]["tp4"][name] for r in range(4)]
        assert_errors(name, check_case(name, seed, per_rank))


@pytest.mark.distributed
def test_tp2_new_group_matches_gathered_log_softmax(four_rank_results):
    for seed, name in enumerate(CASES):
        for members in ([0, 2], [1, 3]):
            per_rank = _group_results(four_rank_results, "tp2_new_group", name, members)
            assert_errors(name, check_case(name, 100 + seed, per_rank))


@pytest.mark.distributed
def test_tp2_megatron_parallel_state_group(four_rank_results):
    for name in ("fp32_pad1008", "bf16", "fp32_chunked"):
        for members in ([0, 1], [2, 3]):
            per_rank = _group_results(four_rank_results, "tp2_megatron", name, members)
            assert_errors(name, check_case(name, 200, per_rank))


@pytest.mark.distributed
def test_tp4_chunked_equals_unchunked(four_rank_results):
    checked = 0
    for name, unchunked in four_rank_results[0]["tp4_unchunked"].items():
        for r in range(4):
            chunked = four_rank_results[r]["tp4"][name]
            unchunked = four_rank_results[r]["tp4_unchunked"][name]
            for what, a, b in zip(("log_probs", "entropy", "grad"), chunked, unchunked):
                err = (a - b).abs().max().item()
                assert err <= CHUNK_ATOL, f"{name} rank {r}: {what} chunked vs unchunked differ by {err:.3g}"
            checked += 1
    assert checked == 3 * 4  # three chunked cases on four ranks


# ---------------------------------------------------------------------------------------------
# Single process (tp_group=None)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_distributed(monkeypatch):
    """Any torch.distributed call fails the test: tp_group=None must not touch it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was called with tp_group=None")

    for fn in ("all_reduce", "get_rank", "get_world_size", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, fn, forbidden)


@pytest.mark.parametrize("name", list(CASES))
def test_no_tp_matches_log_softmax(name, no_distributed):
    per_rank = [run_case(name, 300, 0, 1, None)]
    assert_errors(name, check_case(name, 300, per_rank))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked_values_and_grads(dtype):
    logits, targets, g_lp, g_ent = make_case(7, 1003, 1008, shape=(3, 5, 11))
    results = []
    for chunk in (None, 1, 4, 16, 165, 1000):
        x = logits.to(dtype).requires_grad_()
        lp, ent = vocab_parallel_log_probs(x, targets, with_entropy=True, chunk_size=chunk, vocab_size=1003)
        ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()
        results.append((chunk, lp.detach(), ent.detach(), x.grad.float()))
    _, lp0, ent0, grad0 = results[0]
    for chunk, lp, ent, grad in results[1:]:
        assert (lp - lp0).abs().max().item() <= CHUNK_ATOL, chunk
        assert (ent - ent0).abs().max().item() <= CHUNK_ATOL, chunk
        assert (grad - grad0).abs().max().item() <= CHUNK_ATOL, chunk


def test_leading_dims_and_layout():
    """[T, B, V] (a transposed, non-contiguous view) gives the same numbers as [B, T, V]."""
    logits, targets, *_ = make_case(11, 50, 50, shape=(4, 6))
    lp_bt, ent_bt = vocab_parallel_log_probs(logits.float(), targets, with_entropy=True)
    lp_tb, ent_tb = vocab_parallel_log_probs(
        logits.float().transpose(0, 1), targets.transpose(0, 1), with_entropy=True
    )
    assert lp_tb.shape == (6, 4)
    torch.testing.assert_close(lp_tb, lp_bt.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(ent_tb, ent_bt.transpose(0, 1), rtol=0, atol=0)
    lp_1d, _ = vocab_parallel_log_probs(logits[0, 0].float(), targets[0, 0])
    assert lp_1d.shape == ()
    torch.testing.assert_close(lp_1d, lp_bt[0, 0])


def test_strided_input_gradient_is_contiguous_in_given_shape():
    """A [T, B, V] view of [B, T, V] memory is read in place (any chunking) and its gradient comes
    back contiguous as [T, B, V] (what ``token_log_probs(sequence_major=True)`` relies on), with the
    same values as the gradient of the contiguous input."""
    logits, targets, g_lp, g_ent = make_case(13, 1003, 1008, shape=(3, 5))
    x_bt = logits.float().requires_grad_()
    lp, ent = vocab_parallel_log_probs(x_bt, targets, with_entropy=True, vocab_size=1003)
    ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()
    for chunk in (None, 1, 7):
        x_tb = logits.float().transpose(0, 1).detach().requires_grad_()
        lp_tb, ent_tb = vocab_parallel_log_probs(
            x_tb, targets.t(), with_entropy=True, chunk_size=chunk, vocab_size=1003
        )
        loss = (lp_tb * g_lp.float().t()).sum() + (ent_tb * g_ent.float().t()).sum()
        (grad,) = torch.autograd.grad(loss, x_tb)
        assert grad.shape == (5, 3, 1008) and grad.is_contiguous(), chunk
        assert (lp_tb.t() - lp).abs().max().item() <= CHUNK_ATOL, chunk
        assert (ent_tb.t() - ent).abs().max().item() <= CHUNK_ATOL, chunk
        assert (grad.transpose(0, 1) - x_bt.grad).abs().max().item() <= CHUNK_ATOL, chunk


def test_token_log_probs_sequence_major_same_values_and_grads():
    """``token_log_probs(sequence_major=True)`` changes only the gradient's memory order."""
    from dapo_megatron.policy.loss import token_log_probs

    logits, _, g_lp, g_ent = make_case(14, 300, 304, shape=(2, 9))
    input_ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(14))
    out = {}
    for seq_major in (False, True):
        # [b, s, V] as GPTModel hands it out: a contiguous copy of [s, b, V] logits
        x_sb = logits.float().transpose(0, 1).contiguous().requires_grad_()
        x = x_sb.transpose(0, 1).contiguous()
        lp, ent = token_log_probs(
            x, input_ids, tp_group=None, vocab_size=300, with_entropy=True, sequence_major=seq_major
        )
        ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()
        out[seq_major] = (lp.detach(), ent.detach(), x_sb.grad)
    for a, b in zip(out[False], out[True]):
        assert (a - b).abs().max().item() <= CHUNK_ATOL
    assert out[True][0][:, 0].eq(0).all()  # the first token has no prediction


def test_no_grad_recomputation():
    logits, targets, *_ = make_case(12, 100, 104)
    x = logits.float().requires_grad_()
    with torch.no_grad():
        lp, ent = vocab_parallel_log_probs(x, targets, with_entropy=True, vocab_size=100)
    assert lp.grad_fn is None and ent.grad_fn is None
    ref_lp, ref_ent, _ = reference(logits, targets, 100, None, None)
    assert (lp.double() - ref_lp).abs().max().item() <= FP32_VALUE_ATOL
    assert (ent.double() - ref_ent).abs().max().item() <= FP32_VALUE_ATOL


def test_input_validation():
    logits = torch.randn(2, 3, 10)
    targets = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="target_ids shape"):
        vocab_parallel_log_probs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target_ids must be an integer"):
        vocab_parallel_log_probs(logits, targets.float())
    with pytest.raises(ValueError, match="target_ids must lie in"):
        vocab_parallel_log_probs(logits, targets - 100)
    with pytest.raises(ValueError, match="target_ids must lie in"):
        vocab_parallel_log_probs(logits, targets + 9, vocab_size=9)  # a padding id
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_log_probs(logits, targets, vocab_size=11)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_log_probs(logits, targets, chunk_size=0)
    with pytest.raises(ValueError, match="logits must be"):
        vocab_parallel_log_probs(logits.double(), targets)
