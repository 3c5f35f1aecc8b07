"""Trainer checkpoints: model + optimizer (one Megatron dist checkpoint), scheduler, RNG, loop state.

Layout of ``<save_dir>/step_000012/``::

    metadata.json .metadata common.pt __*_*.distcp
                            one Megatron-Core dist checkpoint (the format Megatron-LM uses): the
                            model's sharded state dict and, under ``optimizer``, the optimizer's
                            (Adam moments, fp32 master weights, step): both reshard on load
    dapo_metadata.json hf_files/
                            as a converted model checkpoint: the directory loads and exports
                            as one (``tools/convert_megatron_to_hf.py``, ``model.megatron_checkpoint``)
    trainer_state.pt        step, data cursor, dynamic-sampler state, generation round, scheduler,
                            the layout and optimizer kind it was written with (written by rank 0,
                            read by every rank)
    rng/rank_00003.pt       RNG states of global rank 3

The directory is written with the package's one atomic-save protocol
(:func:`dapo_megatron.checkpointing.atomic_directory`), so a directory named ``step_N`` is complete;
a failed write on any rank (e.g. ``ENOSPC`` in a dist-checkpoint writer) raises on every rank,
naming the checkpoint, the rank and the file, and leaves the previous checkpoint the newest one.

Resume at the layout it was written at is exact. At another layout (fewer or more ranks, another
TP/PP/DP split) the model and the optimizer state reshard, for the distributed and for the plain
optimizer, so training continues with the same weights and Adam moments; only the per-rank RNG
streams are not restored then (they are tied to ranks; the freshly seeded ones are used, as
Megatron-LM does). The optimizer kind must match the one the checkpoint was written with (the two
keep different non-tensor state in Megatron's format); a mismatch is an error naming the setting.

Files are read with ``torch.load(weights_only=True)``; a truncated, corrupt or foreign file or data
shard is one error line naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dapo_megatron.checkpointing import (
    OPTIMIZER_KEY,
    CheckpointError,
    atomic_directory,
    load_file,
    load_optimizer_state,
    load_sharded,
    model_and_optimizer_state,
    newest_complete,
    prune,
    save_file,
    save_sharded,
)
from dapo_megatron.conversion.checkpoint import (
    CheckpointMetadata,
    check_model_fits,
    validate_checkpoint,
    write_metadata,
)
from dapo_megatron.conversion.names import unwrap_model

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE_FILE = "trainer_state.pt"
RNG_DIR = "rng"


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:06d}"


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``save_dir`` (``None`` if there is none)."""
    return newest_complete(save_dir, STEP_DIR)


def current_layout() -> dict[str, int]:
    """World size and Megatron's TP / PP / DP sizes of this job."""
    from megatron.core import parallel_state as ps

    return {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def optimizer_kind(optimizer) -> str:
    """``"distributed"`` or ``"plain"``: which Megatron optimizer ``optimizer`` is (or chains)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner) else "plain"


def _rng_file(path: Path, rank: int) -> Path:
    return path / RNG_DIR / f"rank_{rank:05d}.pt"


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    metadata: CheckpointMetadata,
    hf_dir: str | Path | None,
    trainer_state: dict[str, Any] | None,
    keep_last: int = 0,
) -> Path:
    """Save a complete, atomic checkpoint of ``step`` (collective: call on every rank).

    ``trainer_state``: the loop's state (rank 0; ignored elsewhere). ``keep_last``: keep the K
    newest checkpoints (0 = all); leftovers of interrupted saves are removed too."""
    rank = dist.get_rank()
    final = step_dir(save_dir, step)
    layout = current_layout()
    with atomic_directory(final) as tmp:
        save_sharded(model_and_optimizer_state(unwrap_model(model), optimizer, is_loading=False), tmp)
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        save_file({"rng": _rng_state(), "layout": layout}, _rng_file(tmp, rank))
        if rank == 0:
            metadata.source = f"trainer step {step}"
            write_metadata(tmp, metadata, hf_dir)
            state = {
                **(trainer_state or {}),
                "scheduler": scheduler.state_dict(),
                "layout": layout,
                "optimizer_kind": optimizer_kind(optimizer),
            }
            save_file(state, tmp / TRAINER_STATE_FILE)
    if rank == 0:
        prune(save_dir, STEP_DIR, keep_last)
    dist.barrier()
    return final


@torch.no_grad()
def load_checkpoint(path: str | Path, *, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer and scheduler (at any layout) and, at the layout the checkpoint
    was written at, this rank's RNG states; return the trainer state (collective)."""
    ckpt, metadata = validate_checkpoint(path)
    state_file = ckpt / TRAINER_STATE_FILE
    trainer_state = load_file(state_file, "trainer state", ("step", "scheduler", "layout", "optimizer_kind"))
    written_kind, kind = trainer_state.pop("optimizer_kind"), optimizer_kind(optimizer)
    if written_kind != kind:
        raise CheckpointError(
            f"{state_file}: the checkpoint holds the state of the {written_kind} optimizer but this run "
            f"uses the {kind} one; set optimizer.use_distributed_optimizer="
            f"{str(written_kind == 'distributed').lower()} to resume from it"
        )
    gpt = unwrap_model(model)
    check_model_fits(gpt, ckpt, metadata)
    request = model_and_optimizer_state(gpt, optimizer, is_loading=True)
    state = load_sharded(request, ckpt)
    optimizer_state = state.pop(OPTIMIZER_KEY)
    gpt.load_state_dict(state, strict=True)
    load_optimizer_state(optimizer, optimizer_state)
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    written, now = trainer_state.pop("layout"), current_layout()
    if written == now:
        rng = load_file(_rng_file(ckpt, dist.get_rank()), "RNG state", ("rng",))
        _set_rng_state(rng["rng"])
    elif dist.get_rank() == 0:
        print(
            f"[dapo] {ckpt} was written at {written}, resuming at {now}: model and optimizer state "
            "resharded; per-rank RNG streams freshly seeded",
            flush=True,
        )
    return trainer_state
