"""Rank functions for tests/test_checkpoint_resume.py (module level so spawned ranks import them).

Every case builds a policy at a layout, trains it with real DAPO updates (``PolicyTrainer``),
saves a trainer checkpoint, and reloads it (in the same or another launch, at the same or another
layout). What is compared is gathered independently of the checkpoint code: the Adam moments are
read from the optimizer's own state (for the distributed optimizer: each DP rank's flat shard put
back into place and summed over the DP group), then gathered over TP x PP into HF names by the
exporter's tables.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch

from tests._train_ranks import distributed_optimizer_tensors

MOMENTS = ("exp_avg", "exp_avg_sq")


def _layout(spec: str):
    """``"TP2xPP2"``, ``"TP1xDP2"``, ``"DP2"``... -> ParallelLayout (DP is what the world leaves)."""
    from dapo_megatron.parallel.layout import ParallelLayout

    sizes = {"TP": 1, "PP": 1, "DP": 1}
    for part in spec.split("x"):
        sizes[part[:2]] = int(part[2:])
    return ParallelLayout(tp=sizes["TP"], pp=sizes["PP"])


def _build(hf_dir, spec, distopt, opt, micro_batch_size=2):
    from megatron.core import parallel_state as ps

    from dapo_megatron.config import OptimizerConfig
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.optim import build_optimizer, wrap_ddp
    from dapo_megatron.policy.train_step import PolicyTrainer

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    layout = _layout(spec)
    initialize_parallel(layout)
    loaded = build_model_from_hf(hf_dir, layout)
    _, use_dist = wrap_ddp(loaded, use_distributed_optimizer=distopt)
    assert use_dist == distopt
    optimizer, scheduler = build_optimizer(
        loaded, OptimizerConfig(**opt), total_steps=10, use_distributed_optimizer=use_dist
    )
    trainer = PolicyTrainer(loaded, optimizer, scheduler, LossSettings(), micro_batch_size=micro_batch_size)
    return loaded, optimizer, scheduler, trainer


def _update(trainer, batch, mini_batch_size):
    """One ``PolicyTrainer.update`` over the global ``batch``, on this rank's data-parallel share
    (the trainer's one split), ``mini_batch_size`` sequences per optimizer step globally."""
    from dapo_megatron.parallel.data import assign_data_parallel
    from dapo_megatron.policy.batch import RolloutBatch

    full = RolloutBatch.from_tensors(dict(batch))
    dp, dp_rank = trainer.groups.dp_size, trainer.groups.dp_rank
    mine = assign_data_parallel(full.seq_lengths.tolist(), mini_batch_size=mini_batch_size, dp=dp)[dp_rank]
    return trainer.update(full.select(mine), mini_batch_size=mini_batch_size // dp)


def full_adam_state(optimizer) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
    """{model parameter: {"exp_avg", "exp_avg_sq": tensor of the parameter's shape}} on every rank
    (collective over the data-parallel group for the distributed optimizer)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    out: dict = {}
    for k in MOMENTS:
        for p, t in distributed_optimizer_tensors(optimizer, lambda states, k=k: states[k]).items():
            out.setdefault(p, {})[k] = t
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):  # the plain optimizer: state per parameter
            for group in inner.optimizer.param_groups:
                for p in group["params"]:
                    out[p] = {k: inner.optimizer.state[p][k].detach().float().clone() for k in MOMENTS}
    return out


def snapshot(loaded, optimizer, scheduler) -> dict:
    """Weights and Adam moments in HF names (full tensors, every rank), lr and scheduler step."""
    state = full_adam_state(optimizer)
    snap = {"weights": loaded.hf_state_dict(dtype=torch.float32)}
    for k in MOMENTS:
        snap[k] = loaded.hf_state_dict(getter=lambda p, k=k: state[p][k])
    snap["lr"] = optimizer.param_groups[0]["lr"]
    snap["scheduler_steps"] = scheduler.num_steps
    return snap


def _save(ckpt_root, name, step, loaded, optimizer, scheduler, hf_dir):
    from dapo_megatron.conversion.checkpoint import metadata_from_hf
    from dapo_megatron.trainer.checkpoint import save_checkpoint

    meta = metadata_from_hf(
        hf_dir,
        dtype="fp32",
        vocab_pad_multiple=128,
        padded_vocab_size=loaded.padded_vocab_size,
        hash_sources=False,
    )
    meta.hf_files = []
    return save_checkpoint(
        Path(ckpt_root) / name,
        step,
        model=loaded.model,
        optimizer=optimizer,
        scheduler=scheduler,
        metadata=meta,
        hf_dir=None,
        trainer_state={"step": step, "collector": {"cursor": 7}},
        keep_last=2,
    )


def train_and_save(rank, world_size, hf_dir, batch, opt, ckpt_root, cases):
    """For each ``(name, layout, distopt)``: build, two optimizer steps, save (step 2), snapshot,
    then one more update (the uninterrupted run). Rank 0 returns
    {name: {"saved": snapshot at the save, "next": snapshot after the third step}}."""
    out = {}
    for name, spec, distopt in cases:
        loaded, optimizer, scheduler, trainer = _build(hf_dir, spec, distopt, opt)
        _update(trainer, batch, 4)  # 8 sequences: 2 optimizer steps
        _save(ckpt_root, name, 2, loaded, optimizer, scheduler, hf_dir)
        saved = snapshot(loaded, optimizer, scheduler)
        _update(trainer, batch, 8)
        out[name] = {"saved": saved, "next": snapshot(loaded, optimizer, scheduler)}
    return out if rank == 0 else None


def load_and_continue(rank, world_size, hf_dir, batch, opt, ckpt_root, cases):
    """For each ``(name, checkpoint name, layout, distopt)``: build fresh, load the checkpoint,
    snapshot, one update. Rank 0 returns {name: {"loaded": ..., "next": ..., "step": ...}}."""
    from dapo_megatron.trainer.checkpoint import latest_checkpoint, load_checkpoint

    out = {}
    for name, ckpt_name, spec, distopt in cases:
        loaded, optimizer, scheduler, trainer = _build(hf_dir, spec, distopt, opt)
        path = latest_checkpoint(Path(ckpt_root) / ckpt_name)
        state = load_checkpoint(path, model=loaded.model, optimizer=optimizer, scheduler=scheduler)
        got = snapshot(loaded, optimizer, scheduler)
        _update(trainer, batch, 8)
        out[name] = {"loaded": got, "next": snapshot(loaded, optimizer, scheduler), "state": state}
    return out if rank == 0 else None


def save_and_load(rank, world_size, hf_dir, batch, opt, ckpt_root, save_cases, load_cases, fail_rank=None):
    """:func:`train_and_save`, then :func:`load_and_continue`, then (with ``fail_rank``)
    :func:`enospc_midway`, in one launch. Rank 0 returns {"saved", "loaded", "fault"}; the fault
    result comes from every rank as a list."""
    saved = train_and_save(rank, world_size, hf_dir, batch, opt, ckpt_root, save_cases)
    loaded = load_and_continue(rank, world_size, hf_dir, batch, opt, ckpt_root, load_cases)
    fault = None
    if fail_rank is not None:
        fault = enospc_midway(rank, world_size, hf_dir, batch, opt, ckpt_root, fail_rank)
        gathered = [None] * world_size
        torch.distributed.all_gather_object(
            gathered, {k: v for k, v in fault.items() if k not in ("saved", "reloaded")}
        )
        fault = {"ranks": gathered, "saved": fault["saved"], "reloaded": fault["reloaded"]}
    return {"saved": saved, "loaded": loaded, "fault": fault} if rank == 0 else None


def enospc_midway(rank, world_size, hf_dir, batch, opt, ckpt_root, fail_rank):
    """At TP2 with the distributed optimizer: save step 2, then a step-3 save whose
    dist-checkpoint writer process on ``fail_rank`` runs out of space after writing part of its
    data file; then resume from what is on disk.

    Returns per rank: the error (type, errno, message), the checkpoint dirs left, what
    ``latest_checkpoint`` finds, and the moments saved at step 2 vs the ones reloaded."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from dapo_megatron.trainer.checkpoint import latest_checkpoint, load_checkpoint

    # TP2: both ranks write model and optimizer shards (at DP2, DP rank 0 writes every replica).
    loaded, optimizer, scheduler, trainer = _build(hf_dir, "TP2", True, opt)
    _update(trainer, batch, 4)
    _save(ckpt_root, "faults", 2, loaded, optimizer, scheduler, hf_dir)
    saved = snapshot(loaded, optimizer, scheduler)
    _update(trainer, batch, 8)

    real_write_item = filesystem_async._write_item

    def out_of_space(*args, **kwargs):  # runs in the forked writer process of this rank
        stream = next(a for a in args if hasattr(a, "write"))
        stream.write(b"\0" * 1000)
        stream.flush()
        raise OSError(errno.ENOSPC, "No space left on device", getattr(stream, "name", "?"))

    if rank == fail_rank:
        filesystem_async._write_item = out_of_space
    error = None
    try:
        _save(ckpt_root, "faults", 3, loaded, optimizer, scheduler, hf_dir)
    except OSError as e:
        error = (type(e).__name__, e.errno, str(e))
    finally:
        filesystem_async._write_item = real_write_item
    left = sorted(p.name for p in (Path(ckpt_root) / "faults").iterdir())
    latest = latest_checkpoint(Path(ckpt_root) / "faults")

    loaded, optimizer, scheduler, trainer = _build(hf_dir, "TP2", True, opt)
    state = load_checkpoint(latest, model=loaded.model, optimizer=optimizer, scheduler=scheduler)
    reloaded = snapshot(loaded, optimizer, scheduler)
    return {
        "error": error,
        "left": left,
        "latest": latest.name,
        "step": state["step"],
        "saved": saved if rank == 0 else None,
        "reloaded": reloaded if rank == 0 else None,
    }


def load_error(rank, world_size, hf_dir, opt, path, spec="TP1", distopt=False):
    """Load the trainer checkpoint at ``path``; return the error as ``"Type: message"`` or None."""
    from dapo_megatron.trainer.checkpoint import load_checkpoint

    loaded, optimizer, scheduler, _ = _build(hf_dir, spec, distopt, opt)
    try:
        load_checkpoint(path, model=loaded.model, optimizer=optimizer, scheduler=scheduler)
    except (ValueError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def load_cases_and_errors(rank, world_size, hf_dir, batch, opt, ckpt_root, load_cases, broken, model_only):
    """:func:`load_and_continue` for ``load_cases``, :func:`load_error` for each path in
    ``broken`` ({name: path}), and the weights of the trainer checkpoint at ``model_only`` loaded
    as a model checkpoint (``build_model_from_checkpoint``, as ``model.megatron_checkpoint`` and
    the conversion tools do) at TP1. Rank 0 returns (loaded, {name: error or None}, weights)."""
    from dapo_megatron.loading import build_model_from_checkpoint

    loaded = load_and_continue(rank, world_size, hf_dir, batch, opt, ckpt_root, load_cases)
    errors = {name: load_error(rank, world_size, hf_dir, opt, path) for name, path in broken.items()}
    weights = build_model_from_checkpoint(model_only, _layout("TP1")).hf_state_dict(dtype=torch.float32)
    return (loaded, errors, weights) if rank == 0 else None


def optimizer_item(ckpt_dir, state_key="exp_avg"):
    """(data file, offset, length) of one optimizer tensor chunk in a dist checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(ckpt_dir)).read_metadata().storage_data
    index, info = next(
        (i, s)
        for i, s in sorted(storage.items(), key=lambda kv: kv[0].fqn)
        if i.fqn.startswith(f"optimizer.state.{state_key}.decoder.layers")
    )
    return Path(ckpt_dir) / info.relative_path, info.offset, info.length, index.fqn
