"""Megatron-Core dist checkpoints: save, integrity check, load, and the optimizer's sharded state.

A dist checkpoint (``dist_checkpointing``, torch_dist backend) is ``metadata.json``, ``.metadata``
(the index: every tensor chunk's file, offset and length), ``common.pt`` (rank 0's non-tensor
state) and ``__<rank>_<n>.distcp`` data files. Tensors are stored by global key and offset, so
they reshard on load.

The trainer stores its model and its optimizer in **one** dist checkpoint, as Megatron-LM does:
the model's ``sharded_state_dict()`` at the top level and, under :data:`OPTIMIZER_KEY`,
``optimizer.sharded_state_dict(model_sharded_state_dict)``, whose per-parameter tensors
(``optimizer.state.exp_avg.<model key>``, ``...exp_avg_sq...``, fp32 master weights) are
described by the model's own sharding, so they reshard over TP, PP and DP like the weights.
The distributed optimizer uses Megatron's ``fully_reshardable`` format
(:data:`OPTIMIZER_SHARDING`): its flat DP shards are gathered per parameter on save, and each
rank takes its slice on load, so a checkpoint written at TP2xDP2 resumes at TP1, DP1 or DP4.

Read errors name the file: :func:`check_files` (missing or truncated data files, from the index
alone) runs before every load, and a load that still fails is traced to the first data item
that does not deserialize. Bit flips inside tensor payloads are not detectable (the format has
no checksums).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from dapo_megatron.checkpointing.protocol import FAILURES, CheckpointError, _describe

OPTIMIZER_KEY = "optimizer"
# Megatron-LM's sharded_state_dict metadata; 'fully_reshardable' = per-parameter tensors in model
# space, so the distributed optimizer's state reshards over TP/PP/DP (Megatron-LM:
# --dist-ckpt-optim-fully-reshardable). The plain optimizer ignores the sharding type.
OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}
MCORE_FILES = ("metadata.json", ".metadata", "common.pt")


def save_sharded(sharded_state_dict: dict, directory: str | Path) -> None:
    """``dist_checkpointing.save`` into the existing, empty ``directory`` (collective). A write
    that fails on any rank raises on every rank (Megatron gathers the writers' results)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, str(directory))


def check_files(directory: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the file if a Megatron file is missing, or a data file
    listed in the index is missing or shorter than the chunks the index says it holds."""
    from torch.distributed.checkpoint import FileSystemReader

    directory = Path(directory)
    for name in MCORE_FILES:
        if not (directory / name).exists():
            raise CheckpointError(
                f"Megatron checkpoint file {directory / name} is missing (incomplete checkpoint)"
            )
    try:
        storage = FileSystemReader(str(directory)).read_metadata().storage_data
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint index {directory / '.metadata'}: {e}") from e
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        f = directory / rel
        if not f.exists():
            raise CheckpointError(
                f"checkpoint data file {f} is missing (listed in {directory / '.metadata'})"
            )
        if f.stat().st_size < end:
            raise CheckpointError(
                f"checkpoint data file {f} is truncated: {f.stat().st_size} bytes, index needs {end}"
            )


def find_unreadable_item(directory: str | Path, max_bytes: int = 16 << 30) -> str | None:
    """``"<file>: item <key> at byte <offset>: <error>"`` for the first tensor chunk of the dist
    checkpoint in ``directory`` that does not deserialize, or ``None`` if none does within the
    first ``max_bytes`` read (only for explaining a failed load: it reads the chunks)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    metadata = FileSystemReader(str(directory)).read_metadata()
    for index, info in sorted(
        metadata.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)
    ):
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata):
            continue
        max_bytes -= info.length
        if max_bytes < 0:
            return None
        path = directory / info.relative_path
        with open(path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:
            return f"{path}: item {index.fqn} at byte {info.offset}: {_describe(e)[1]}"
    return None


def load_sharded(sharded_state_dict: dict, directory: str | Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` (collective) after :func:`check_files`; any failure becomes
    one :class:`CheckpointError` line naming the checkpoint and, where it can be found, the file."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    check_files(directory)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(directory))
    except FAILURES as e:
        try:
            where = find_unreadable_item(directory)
        except Exception:  # noqa: BLE001 - the explanation must not hide the original error
            where = None
        detail = where or _describe(e)[1]
        raise CheckpointError(f"cannot load the dist checkpoint {directory}: {detail}") from e


def model_and_optimizer_state(gpt, optimizer, *, is_loading: bool) -> dict:
    """The sharded state dict the trainer saves and loads: the model's ``sharded_state_dict()`` at
    the top level plus ``optimizer.sharded_state_dict(<that>)`` under :data:`OPTIMIZER_KEY`
    (Megatron-LM's layout, with the model un-nested so that the same directory loads as a model
    checkpoint). ``gpt``: the unwrapped ``GPTModel``. With ``is_loading`` the optimizer allocates
    the state it is about to receive."""
    model_sd = gpt.sharded_state_dict()
    if OPTIMIZER_KEY in model_sd:
        raise ValueError(f"the model's sharded state dict already has a key {OPTIMIZER_KEY!r}")
    if is_loading:
        _allocate_distributed_optimizer_state(optimizer)
    optim_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)
    return {**model_sd, OPTIMIZER_KEY: optim_sd}


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet its Adam state, so that it can build
    the state dict it loads into.

    With torch's Adam (no TransformerEngine / Apex: the CPU path, and GPU images without them)
    ``DistributedOptimizer.state_dict()`` reads each parameter's ``step``, which exists only after
    a step. Megatron's own ``_init_optimizer_states_with_dummy_values`` takes a zero-gradient
    step; it runs here at learning rate 0, so the weights (and their decoupled weight decay) stay
    untouched; the state it creates is overwritten by the load.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer) or len(inner.optimizer.state) > 0:
            continue
        groups = inner.optimizer.param_groups
        lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        try:
            inner._init_optimizer_states_with_dummy_values()
        finally:
            for g, lr in zip(groups, lrs):
                g["lr"] = lr


def load_optimizer_state(optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` for the state :func:`load_sharded` returned under
    :data:`OPTIMIZER_KEY`.

    Works around two Megatron-Core 0.16 defects of the distributed optimizer with torch's Adam
    (no TransformerEngine / Apex: the CPU path, and GPU images without them):

    * ``load_state_dict`` restores Adam's ``step`` from the parameter groups, and the
      sharded-state loaders then pass every state tensor *except* ``step`` to
      ``_set_main_param_and_optimizer_states``, which copies every key the destination has
      (``step`` included): ``KeyError: 'step'``. For the duration of the call each such optimizer
      copies only the keys it is given.
    * it gives every parameter's state the *same* ``step`` tensor, which torch's Adam increments
      in place once per parameter: after one more step the bias correction would use
      ``step + number of parameters``. Each state gets its own copy afterwards.
    """
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(inner, distrib_optimizer.DistributedOptimizer) and not (
                inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            ):
                inner._set_main_param_and_optimizer_states = _copy_given_keys.__get__(inner)
                patched.append(inner)
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states
    for inner in patched:
        for state in inner.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _copy_given_keys(self, model_param, tensors: dict[str, torch.Tensor]) -> None:
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` (torch-Adam branch), copying
    the keys of ``tensors`` rather than those of the destination."""
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        dst[key].copy_(value)
