"""Rank functions for the DAPO train-step parity tests."""

import torch


def distributed_optimizer_tensors(optimizer, pick) -> dict:
    """{model parameter: whole tensor of the parameter's shape} for every parameter of the
    distributed optimizers in ``optimizer`` (collective over their data-parallel group).

    Each DP rank holds a flat shard of every per-parameter quantity (fp32 master weights, their
    gradients, Adam moments); ``pick(states)`` selects one from the dict Megatron keeps for a
    parameter's shard on this rank ({"param", "exp_avg", "exp_avg_sq"}). The shards are put at
    their offsets in zeros and summed over the DP group: the whole tensor, on every rank."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    out = {}
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        for p in (p for buf in inner.buffers for p in buf.params):
            whole = torch.zeros(p.numel(), dtype=torch.float32)
            if p in inner.model_param_gbuf_map:
                gbuf, dtype, bucket = inner.model_param_gbuf_map[p]
                rng = inner.gbuf_ranges[gbuf][dtype][bucket]["param_map"][p]["param"]
                whole[rng.start : rng.end] = pick(inner._get_main_param_and_optimizer_states(p)).detach()
            torch.distributed.all_reduce(whole, group=inner.data_parallel_group)
            out[p] = whole.view(p.shape)
    return out


def clipped_grad_getter(optimizer):
    """The last update's clipped gradient of a parameter, whole on every rank. Plain optimizer:
    ``main_grad`` (all-reduced over DP, clipped in place). Distributed optimizer: the gradient of
    each rank's shard of the master weights, put together over DP."""
    sharded = distributed_optimizer_tensors(optimizer, lambda states: states["param"].grad)
    return lambda p: sharded[p] if p in sharded else p.main_grad


def dapo_update(
    rank,
    world_size,
    hf_dirs,
    tp,
    pp,
    sp,
    batch,
    mini_batch_size,
    micro_batch_size,
    opt,
    dtype="fp32",
    recompute="none",
    ep=1,
    updates_per_step=1,
    use_distributed_optimizer=None,
):
    """One DAPO update (possibly several mini-batches) of every model in ``hf_dirs`` at (tp, pp, sp, ep).

    ``updates_per_step`` goes to ``build_optimizer`` (it scales the warm-up given in training steps).

    Rank 0 returns {arch: (metrics, grads of the last mini-batch, updated weights)} in HF names.
    """

    from dapo_megatron.config import OptimizerConfig
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.data import assign_data_parallel
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.batch import RolloutBatch
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.optim import build_optimizer, wrap_ddp
    from dapo_megatron.policy.train_step import PolicyTrainer

    layout = ParallelLayout(tp=tp, pp=pp, sp=sp, ep=ep)
    initialize_parallel(layout)
    out = {}
    for arch_name, hf_dir in hf_dirs.items():
        loaded = build_model_from_hf(hf_dir, layout, dtype=dtype, recompute=recompute)
        _, use_dist = wrap_ddp(loaded, use_distributed_optimizer=use_distributed_optimizer)
        optimizer, scheduler = build_optimizer(
            loaded,
            OptimizerConfig(**opt),
            total_steps=10,
            use_distributed_optimizer=use_dist,
            updates_per_step=updates_per_step,
        )
        trainer = PolicyTrainer(
            loaded, optimizer, scheduler, LossSettings(), micro_batch_size=micro_batch_size
        )
        # This rank's share of the global batch (the trainer's one data-parallel split).
        full = RolloutBatch.from_tensors(dict(batch[arch_name]))
        dp, dp_rank = trainer.groups.dp_size, trainer.groups.dp_rank
        mine = assign_data_parallel(full.seq_lengths.tolist(), mini_batch_size=mini_batch_size, dp=dp)[dp_rank]
        metrics = trainer.update(full.select(mine), mini_batch_size=mini_batch_size // dp)
        grads = loaded.hf_state_dict(getter=clipped_grad_getter(optimizer))
        metrics["distributed_optimizer"] = type(optimizer.chained_optimizers[0]).__name__ == (
            "DistributedOptimizer"
        )
        weights = loaded.hf_state_dict(dtype=torch.float32)
        if dtype != "fp32":  # what the optimizer steps: fp32 master copies of the bf16 parameters
            metrics["master_dtypes"] = sorted(
                {str(p.dtype) for g in optimizer.param_groups for p in g["params"]}
            )
        out[arch_name] = (metrics, grads, weights)
    return out if rank == 0 else None


def old_log_probs(rank, world_size, hf_dir, tp, pp, batch):
    """compute_log_probs at a layout; returns {sequence index: log-probs} from reporting ranks."""
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.data import assign_data_parallel
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.train_step import PolicyTrainer

    layout = ParallelLayout(tp=tp, pp=pp)
    initialize_parallel(layout)
    loaded = build_model_from_hf(hf_dir, layout)
    trainer = PolicyTrainer(loaded, None, None, LossSettings(), micro_batch_size=2)
    n = batch["input_ids"].shape[0]
    mine = assign_data_parallel(batch["seq_lengths"].tolist(), mini_batch_size=n, dp=trainer.dp)[trainer.dp_rank]
    local = {k: batch[k][mine] for k in ("input_ids", "seq_lengths")}
    logp = trainer.compute_log_probs(local)
    if not trainer.reports_metrics:
        return None
    return {i: logp[j] for j, i in enumerate(mine)}
