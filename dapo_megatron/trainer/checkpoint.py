"""Trainer checkpoints: model (Megatron dist checkpoint), optimizer, scheduler, RNG, loop state.

Layout of ``<save_dir>/step_000012/``::

    model/                  dist_checkpointing (reshardable) + dapo_metadata.json + hf_files/
    optimizer/rank_00003.pt optimizer + scheduler + RNG states of global rank 3
    trainer_state.pt        step, data cursor, dynamic-sampler state, generation round (rank 0)

Everything is written into ``step_000012.tmp-<id>`` and renamed by rank 0 after a barrier, so a
job killed mid-save leaves no directory that looks complete; ``latest_checkpoint`` ignores
``*.tmp-*``. Optimizer state is per rank: resume at the same layout (the model part alone can be
loaded at any layout, e.g. by ``tools/convert_megatron_to_hf.py``).
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dapo_megatron.conversion.checkpoint import (
    MODEL_SUBDIR,
    CheckpointMetadata,
    load_model_checkpoint,
    save_sharded_model,
    write_metadata,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:06d}"


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``save_dir`` (``None`` if there is none)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    steps = [
        (int(m.group(1)), p) for p in save_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return max(steps)[1] if steps else None


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
    hf_dir: str | Path,
    trainer_state: dict[str, Any] | None,
    keep_last: int = 0,
) -> Path:
    """Save a complete, atomic checkpoint of ``step`` (collective: call on every rank)."""
    rank = dist.get_rank()
    final = step_dir(save_dir, step)
    name = [f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"] if rank == 0 else [None]
    dist.broadcast_object_list(name, src=0)
    tmp = final.with_name(name[0])
    if rank == 0:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists")
        (tmp / MODEL_SUBDIR).mkdir(parents=True)
        (tmp / "optimizer").mkdir()
    dist.barrier()
    save_sharded_model(model, tmp / MODEL_SUBDIR)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
        tmp / "optimizer" / f"rank_{rank:05d}.pt",
    )
    if rank == 0:
        metadata.source = f"trainer step {step}"
        write_metadata(tmp / MODEL_SUBDIR, metadata, hf_dir)
        torch.save(trainer_state, tmp / "trainer_state.pt")
    dist.barrier()
    if rank == 0:
        tmp.rename(final)
        if keep_last > 0:
            done = sorted(p for p in Path(save_dir).iterdir() if _STEP_DIR.match(p.name))
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG of this rank; return the trainer state."""
    path = Path(path)
    rank = dist.get_rank()
    opt_file = path / "optimizer" / f"rank_{rank:05d}.pt"
    if not opt_file.exists():
        raise FileNotFoundError(
            f"{opt_file} is missing: the checkpoint was written with fewer ranks or is incomplete "
            "(optimizer state resumes only at the layout it was saved with)"
        )
    load_model_checkpoint(model, path / MODEL_SUBDIR)
    state = torch.load(opt_file, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return torch.load(path / "trainer_state.pt", weights_only=False)
