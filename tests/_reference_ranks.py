"""Rank function for the reference-policy / KL-loss tests."""


def kl_update(rank, world_size, policy_dir, reference_dir, tp, pp, batch, micro_batch_size, opt, settings):
    """One update with the KL loss against a :class:`ReferencePolicy` built from ``reference_dir``.

    Rank 0 returns (metrics, clipped grads in HF names); every reporting rank returns its
    sequences' reference log-probs as {index: tensor}.
    """
    from megatron.core import parallel_state as ps

    from dapo_megatron.config import ModelConfig, OptimizerConfig
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.optim import build_optimizer, wrap_ddp
    from dapo_megatron.policy.reference import build_reference
    from dapo_megatron.policy.train_step import PolicyTrainer

    layout = ParallelLayout(tp=tp, pp=pp)
    initialize_parallel(layout)
    loaded = build_model_from_hf(policy_dir, layout, dtype="fp32")
    _, use_dist = wrap_ddp(loaded)
    optimizer, scheduler = build_optimizer(
        loaded, OptimizerConfig(**opt), total_steps=10, use_distributed_optimizer=use_dist
    )
    trainer = PolicyTrainer(loaded, optimizer, scheduler, settings, micro_batch_size=micro_batch_size)
    reference = build_reference(ModelConfig(hf_dir=reference_dir, dtype="fp32"), layout)
    batch = dict(batch)
    batch["ref_log_probs"] = reference.compute_log_probs(trainer, batch)
    assert not any(p.requires_grad for p in reference.model.parameters())
    metrics = trainer.update(batch, mini_batch_size=batch["input_ids"].shape[0])
    grads = loaded.hf_state_dict(getter=lambda p: p.main_grad)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ref = {}
    if trainer.reports_metrics:
        n = batch["input_ids"].shape[0]
        ref = {i: batch["ref_log_probs"][i] for i in range(n) if i % dp == dp_rank}
    return (metrics, grads) if rank == 0 else None, ref
