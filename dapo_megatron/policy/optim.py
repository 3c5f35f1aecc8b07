"""Megatron DDP, optimizer and learning-rate schedule for the policy.

Everything here is stock Megatron-Core: ``DistributedDataParallel`` (gradient buffers,
``finalize_model_grads`` with the per-token loss scaling), ``get_megatron_optimizer`` (Adam with
decoupled weight decay, fp32 master weights for bf16/fp16, gradient clipping by the global norm)
and ``OptimizerParamScheduler``. The distributed optimizer (ZeRO-1) is the default on GPU and runs
on CPU/gloo too (:mod:`dapo_megatron.parallel.cpu`); ``optimizer.use_distributed_optimizer``
chooses.
"""

from __future__ import annotations

import math

import torch


def wrap_ddp(loaded, *, use_distributed_optimizer: bool | None = None):
    """Wrap ``loaded.model`` in Megatron DDP and hook it into the pipeline schedule.

    ``use_distributed_optimizer``: ``None`` = on with CUDA, off on CPU. Returns the DDP model and
    the choice made (pass it to :func:`build_optimizer`)."""
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

    ``total_steps`` and ``opt_cfg.lr_warmup_steps`` count training steps (rollout batches, as in
    the DAPO paper's "20 rollout steps" of warm-up); each is ``updates_per_step`` optimizer steps
    (mini-batch updates). Megatron's scheduler counts optimizer steps (as Megatron-LM's
    ``--lr-warmup-iters``), so it gets ``W = lr_warmup_steps * updates_per_step`` warm-up and
    ``total_steps * updates_per_step`` steps in all, and the ramp is per update. Use
    :func:`optimizer_step` for every update, so that update ``k`` (1-based) runs at
    ``lr * min(1, k / W)``: the first update uses ``lr / W``, not 0.
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
    warmup = opt_cfg.lr_warmup_steps * updates_per_step
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


def optimizer_step(optimizer, scheduler, *, loss_is_finite: bool = True) -> tuple[bool, float]:
    """One optimizer update at the scheduled learning rate, unless the loss or the gradient norm is
    not finite; returns ``(updated, grad_norm)``.

    The steps of Megatron's own ``MegatronOptimizer.step`` / ``ChainedOptimizer.step``
    (``prepare_grads`` -> global grad norm -> clip by it -> ``step_with_ready_grads``), with a check
    between the norm and the update: a NaN/inf ``grad_norm`` (reduced over the model-parallel ranks
    by Megatron, so the same on every rank), ``loss_is_finite=False`` (the caller reduces it over
    all ranks) or fp16's found-inf skips the update. A skipped update changes no parameter, no
    optimizer state and not the learning-rate schedule; the caller counts it.

    The scheduler advances *before* the update: Megatron's ``OptimizerParamScheduler`` sets
    ``lr = init_lr + (max_lr - init_lr) * num_steps / warmup`` and starts at ``num_steps = 0``
    (``init_lr = 0``), so stepping it after the update (Megatron-LM's order) would spend the first
    update at learning rate 0. Advancing first makes update ``k`` use ``num_steps = k``.
    """
    # Looked up at call time: the CPU path (parallel/cpu.py) replaces this function.
    from megatron.core.optimizer import optimizer as megatron_optimizer

    found_inf = optimizer.prepare_grads()  # fp16: unscale, and the loss scaler backs off
    grad_norm = float("nan") if found_inf else float(optimizer.get_grad_norm())
    if found_inf or not loss_is_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    scheduler.step(increment=1)
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0:
            continue
        params = sub.get_parameters()
        if params:
            megatron_optimizer.clip_grad_by_total_norm_fp32(
                params,
                max_norm=sub.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    optimizer.step_with_ready_grads()
    return True, grad_norm
