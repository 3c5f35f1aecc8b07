"""Rank function for tests/test_kl_in_reward.py: the trainer's KL-in-reward path at DP2."""

from __future__ import annotations

import copy


def kl_reward_step(rank, world_size, demo_root, reference_dir, kl_coef, overrides):
    """One rollout of the real :class:`~dapo_megatron.trainer.loop.DapoTrainer` (its collector,
    data plane, old log-probs) and its reference pass, with the reference swapped for the model at
    ``reference_dir`` (at step 1 the initial policy equals the policy: KL 0, nothing to test).

    Returns per rank: the batch tensors before (``delivered``, the engines' advantages) and after
    :meth:`DapoTrainer.apply_reference`, the advantages recomputed with ``kl_coef = 0`` from the
    same batch, and the metrics."""
    from dapo_megatron.config import ModelConfig
    from dapo_megatron.policy.reference import build_reference
    from dapo_megatron.trainer.loop import DapoTrainer
    from dapo_megatron.trainer.rollout import kl_in_reward_advantages
    from tests._rollout_scale_ranks import demo_config

    cfg = demo_config(
        demo_root,
        "parallel.tensor_model_parallel_size=1",
        f"algorithm.kl_coef={kl_coef}",
        "algorithm.use_kl_loss=false",
        f"trainer.run_dir={demo_root}/run",
        *overrides,
    )
    trainer = DapoTrainer(cfg)
    try:
        trainer.reference = build_reference(
            ModelConfig(hf_dir=reference_dir, dtype="fp32", vocab_pad_multiple=cfg.model.vocab_pad_multiple),
            trainer.loaded.layout,
        )
        batch, _ = trainer.collector.collect()
        batch["old_log_probs"] = trainer.policy.compute_log_probs(batch)
        delivered = {k: t.clone() for k, t in batch.tensors().items()}
        metrics = trainer.apply_reference(batch)
        at_zero = copy.deepcopy(batch)
        kl_in_reward_advantages(
            at_zero,
            kl_coef=0.0,
            kl_type=cfg.algorithm.kl_type,
            n=cfg.rollout.n,
            norm_by_std=cfg.algorithm.norm_adv_by_std,
            contributes=trainer.policy.reports_metrics,
        )
        return {
            "dp_rank": trainer.groups.dp_rank,
            "delivered": delivered,
            "batch": batch.tensors(),
            "advantages_at_kl_0": at_zero.advantages,
            "metrics": metrics,
        }
    finally:
        if trainer.engine is not None:
            trainer.reward_pool.close()
            trainer.engine.close()
