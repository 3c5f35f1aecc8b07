"""Megatron DDP, optimizer and learning-rate schedule for the policy.

Everything here is stock Megatron-Core: ``DistributedDataParallel`` (gradient buffers,
``finalize_model_grads`` with the per-token loss scaling), ``get_megatron_optimizer`` (Adam with
decoupled weight decay, fp32 master weights for bf16/fp16, gradient clipping by the global norm)
and ``OptimizerParamScheduler``. The distributed optimizer (ZeRO-1) is used on GPU; the CPU path
uses the plain one, because Megatron's distributed optimizer asserts CUDA tensors.
"""

from __future__ import annotations

import torch


def wrap_ddp(loaded, *, use_distributed_optimizer: bool | None = None):
    """Wrap ``loaded.model`` in Megatron DDP and hook it into the pipeline schedule."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    if use_distributed_optimizer is None:
        use_distributed_optimizer = torch.cuda.is_available()
    config = loaded.config
    # DDP reads calculate_per_token_loss once, here; the builder always sets it.
    assert config.calculate_per_token_loss, "calculate_per_token_loss must be set before DDP wrapping"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=loaded.model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    loaded.model = model
    return model, use_distributed_optimizer


def build_optimizer(
    loaded, opt_cfg, *, total_steps: int, use_distributed_optimizer: bool, updates_per_step: int = 1
):
    """Megatron optimizer + scheduler from ``dapo_megatron.config.OptimizerConfig``.

    The schedule counts optimizer steps (one per mini-batch update, as Megatron-LM's
    ``--lr-warmup-iters``): ``total_steps * updates_per_step`` of them in the run. Use
    :func:`optimizer_step` for every update, so that update ``k`` (1-based) runs at
    ``lr * min(1, k / lr_warmup_steps)``: the first update uses ``lr / lr_warmup_steps``, not 0.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = loaded.config
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=opt_cfg.lr,
            min_lr=opt_cfg.min_lr,
            weight_decay=opt_cfg.weight_decay,
            adam_beta1=opt_cfg.adam_beta1,
            adam_beta2=opt_cfg.adam_beta2,
            adam_eps=opt_cfg.adam_eps,
            clip_grad=opt_cfg.clip_grad,
            bf16=config.bf16,
            fp16=config.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        [loaded.model],
    )
    if config.fp16 or config.bf16:
        config.grad_scale_func = optimizer.scale_loss
    warmup = opt_cfg.lr_warmup_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else opt_cfg.lr,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr if opt_cfg.lr_schedule == "cosine" else opt_cfg.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps * updates_per_step, warmup + 1),
        lr_decay_style=opt_cfg.lr_schedule,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=max(total_steps * updates_per_step, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def optimizer_step(optimizer, scheduler):
    """One optimizer update at the scheduled learning rate; returns ``optimizer.step()``'s result.

    The scheduler advances *before* the update: Megatron's ``OptimizerParamScheduler`` sets
    ``lr = init_lr + (max_lr - init_lr) * num_steps / warmup`` and starts at ``num_steps = 0``
    (``init_lr = 0``), so stepping it after the update (Megatron-LM's order) would spend the first
    update at learning rate 0. Advancing first makes update ``k`` use ``num_steps = k``.
    """
    scheduler.step(increment=1)
    return optimizer.step()
