"""A NaN/inf loss or gradient norm skips the optimizer step; K in a row stop the run (issue 20).

Real Megatron-Core updates on two gloo ranks (DP2, a tiny Llama). Injected faults:

1. a NaN advantage on one sequence of data-parallel rank 1 only: its gradient is NaN before the
   all-reduce, so both ranks must skip (no parameter, optimizer-state or LR-schedule change,
   ``train/skipped_steps == 1``, finite metrics);
2. then a clean batch: the update happens (parameters move), the skip counter resets;
3. then a NaN in one weight of rank 1's replica: every update is skipped, and the second in a row
   raises the error naming ``trainer.max_consecutive_skipped_steps``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.distributed import run_on_ranks

PROMPT, RESPONSE, N = 4, 6, 4


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = PROMPT + RESPONSE
    mask = torch.zeros(N, s)
    mask[:, PROMPT:] = 1
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * mask
    return {
        "input_ids": torch.randint(3, 1003, (N, s), generator=g),
        "seq_lengths": torch.full((N,), s),
        "response_mask": mask,
        "advantages": adv,
    }


def _snapshot(loaded, optimizer, scheduler):
    params = {k: v.detach().clone() for k, v in loaded.model.module.state_dict().items() if v is not None}
    inner = [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])]
    state = [
        {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for o in inner for s in o.state.values()
    ]
    return params, state, scheduler.num_steps


def _same(a, b) -> bool:
    return (
        a[0].keys() == b[0].keys()
        and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        and (
            len(a[1]) == len(b[1])
            and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a[1], b[1]))
        )
        and a[2] == b[2]
    )


def _ranks(rank, world_size, hf_dir):
    from dapo_megatron.config import OptimizerConfig
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.optim import build_optimizer, wrap_ddp
    from dapo_megatron.policy.train_step import PolicyTrainer

    layout = ParallelLayout(tp=1)
    initialize_parallel(layout)
    loaded = build_model_from_hf(hf_dir, layout)
    wrap_ddp(loaded, use_distributed_optimizer=False)
    opt = OptimizerConfig(lr=1e-3, lr_warmup_steps=0, clip_grad=1.0)
    optimizer, scheduler = build_optimizer(loaded, opt, total_steps=10, use_distributed_optimizer=False)
    trainer = PolicyTrainer(
        loaded, optimizer, scheduler, LossSettings(), micro_batch_size=1, max_consecutive_skipped_steps=2
    )
    batch = _batch()
    batch["old_log_probs"] = trainer.compute_log_probs(batch)
    out = {}

    # 1. NaN advantage on sequence 1 (data-parallel rank 1's) only.
    poisoned = dict(batch, advantages=batch["advantages"].clone())
    poisoned["advantages"][1, PROMPT + 2] = float("nan")
    before = _snapshot(loaded, optimizer, scheduler)
    out["nan_adv"] = trainer.update(poisoned, mini_batch_size=N)
    out["nan_adv_unchanged"] = _same(before, _snapshot(loaded, optimizer, scheduler))

    # 2. A clean batch updates.
    out["clean"] = trainer.update(batch, mini_batch_size=N)
    out["clean_changed"] = not _same(before, _snapshot(loaded, optimizer, scheduler))
    out["counter_after_clean"] = trainer.consecutive_skipped_steps

    # 3. A NaN weight on rank 1's replica: skipped every time; the second skip in a row stops.
    if rank == 1:
        with torch.no_grad():
            weight = next(p for name, p in loaded.model.module.named_parameters() if "linear_fc1" in name)
            weight.view(-1)[0] = float("nan")
    out["nan_param"] = trainer.update(batch, mini_batch_size=N)
    try:
        trainer.update(batch, mini_batch_size=N)
        out["error"] = None
    except RuntimeError as exc:
        out["error"] = str(exc)
    return out


@pytest.mark.distributed
def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path):
    from tests.helpers.tiny_models import make_tiny_hf_model

    make_tiny_hf_model("llama", tmp_path / "llama", seed=0)
    results = run_on_ranks(_ranks, 2, str(tmp_path / "llama"), timeout=600)
    for rank, r in enumerate(results):
        assert r["nan_adv"]["train/skipped_steps"] == 1 and r["nan_adv"]["num_updates"] == 0, rank
        assert r["nan_adv_unchanged"], f"rank {rank}: a skipped step changed parameters or state"
        assert math.isfinite(r["nan_adv"]["loss"]), rank  # the skipped update is left out
        assert r["clean"]["train/skipped_steps"] == 0 and r["clean"]["num_updates"] == 1, rank
        assert r["clean_changed"] and r["counter_after_clean"] == 0, rank
        assert math.isfinite(r["clean"]["grad_norm"]) and r["clean"]["grad_norm"] > 0, rank
        assert r["nan_param"]["train/skipped_steps"] == 1, rank
        assert r["error"] and "trainer.max_consecutive_skipped_steps=2" in r["error"], rank
