"""Rank function for the packing / context-parallel parity tests: several layouts per launch."""

import torch


def packed_updates(rank, world_size, hf_dir, runs, batch, opt):
    """For each run ``(name, tp, pp, sp, cp, micro_batch_size, max_tokens)``: build the model at
    that layout (DP = world / (tp * pp * cp)), compute old log-probs, then one DAPO update on
    ``batch`` (one mini-batch). Parallel state is torn down between runs.

    Returns {name: (metrics, grads, weights, old log-probs {seq index: [S]})}: the tensors in HF
    names from rank 0; the log-probs merged from every rank that computed them.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dapo_megatron.config import OptimizerConfig
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.data import assign_data_parallel
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.batch import RolloutBatch
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.optim import build_optimizer, wrap_ddp
    from dapo_megatron.policy.train_step import PolicyTrainer

    out = {}
    for name, tp, pp, sp, cp, micro, max_tokens in runs:
        layout = ParallelLayout(tp=tp, pp=pp, sp=sp, cp=cp)
        initialize_parallel(layout)
        loaded = build_model_from_hf(hf_dir, layout)
        _, use_dist = wrap_ddp(loaded)
        optimizer, scheduler = build_optimizer(
            loaded, OptimizerConfig(**opt), total_steps=10, use_distributed_optimizer=use_dist
        )
        trainer = PolicyTrainer(
            loaded,
            optimizer,
            scheduler,
            LossSettings(),
            micro_batch_size=micro,
            log_prob_micro_batch_size=micro,
            max_tokens_per_micro_batch=max_tokens,
        )
        # This rank's share of the batch (the trainer's one data-parallel split), full width.
        n = batch["input_ids"].shape[0]
        idx = assign_data_parallel(batch["seq_lengths"].tolist(), mini_batch_size=n, dp=trainer.dp)[trainer.dp_rank]
        local = RolloutBatch.from_tensors({k: t[idx] for k, t in dict(batch).items()})
        logp = trainer.compute_log_probs(local)
        mine = {}
        if trainer.reports_metrics:
            mine = {i: logp[j] for j, i in enumerate(idx)}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
        old = {}
        for g in gathered:
            old.update(g)
        metrics = trainer.update(local, mini_batch_size=n // trainer.dp)
        grads = loaded.hf_state_dict(getter=lambda p: p.main_grad)
        weights = loaded.hf_state_dict(dtype=torch.float32)
        out[name] = (metrics, grads, weights, old)
        ps.destroy_model_parallel()
    return out if rank == 0 else None
