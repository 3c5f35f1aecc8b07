"""Trainer checkpoints: model (Megatron dist checkpoint), optimizer, scheduler, RNG, loop state.

Layout of ``<save_dir>/step_000012/``::

    model/                  dist_checkpointing (reshardable) + dapo_metadata.json + hf_files/
    optimizer/rank_00003.pt optimizer + scheduler + RNG states of global rank 3
    trainer_state.pt        step, data cursor, dynamic-sampler state, generation round (rank 0)

Everything is written into ``step_000012.tmp-<id>`` and renamed by rank 0 after a barrier, so a
job killed mid-save leaves no directory that looks complete; ``latest_checkpoint`` ignores
``*.tmp-*``. Optimizer state is per rank: resume at the same layout (the model part alone can be
loaded at any layout, e.g. by ``tools/convert_megatron_to_hf.py``).

Files are read with ``torch.load(weights_only=True)`` (no pickled code runs); a truncated or
corrupt file, or one of another kind, raises a one-line ``ValueError`` naming the file. A write
that fails (e.g. ``ENOSPC``) raises ``OSError`` naming the file; the ``*.tmp-*`` directory it
leaves is never picked by ``latest_checkpoint``, so the previous checkpoint stays the newest.
"""

from __future__ import annotations

import pickle
import re
import shutil
import uuid
import zipfile
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
from dapo_megatron.parallel.comm import broadcast_object

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


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's are paragraphs), or its type name."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(e).__name__


def _save_file(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``; a failed write (``ENOSPC``, I/O error) raises ``OSError`` naming it."""
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as e:
        msg = f"writing checkpoint file {path} failed: {getattr(e, 'strerror', None) or _first_line(e)}"
        raise (OSError(e.errno, msg) if getattr(e, "errno", None) else OSError(msg)) from e


def _load_file(path: Path, what: str, required: tuple[str, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` with a one-line ``ValueError`` naming ``path`` when
    the file is truncated, corrupt, holds non-allow-listed types, or lacks one of ``required`` keys.

    The trainer's files hold only tensors, dicts, lists and Python scalars (optimizer, scheduler,
    RNG and loop states), so the default ``weights_only`` allow-list suffices; no pickled code runs.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        why = "truncated, corrupt or holding non-tensor types"
        raise ValueError(f"{path}: cannot read the {what} ({why}): {_first_line(e)}") from None
    if required:
        missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise ValueError(
                f"{path}: the {what} lacks field(s) {', '.join(missing)} (not a dapo checkpoint file?)"
            )
    return obj


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
    tmp = final.with_name(broadcast_object(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}" if rank == 0 else None))
    if rank == 0:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists")
        (tmp / MODEL_SUBDIR).mkdir(parents=True)
        (tmp / "optimizer").mkdir()
    dist.barrier()
    save_sharded_model(model, tmp / MODEL_SUBDIR)
    _save_file(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
        tmp / "optimizer" / f"rank_{rank:05d}.pt",
    )
    if rank == 0:
        metadata.source = f"trainer step {step}"
        write_metadata(tmp / MODEL_SUBDIR, metadata, hf_dir)
        _save_file(trainer_state, tmp / "trainer_state.pt")
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
    state = _load_file(opt_file, "optimizer state", ("optimizer", "scheduler", "rng"))
    trainer_state = _load_file(path / "trainer_state.pt", "trainer state")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return trainer_state
