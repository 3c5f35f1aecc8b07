"""Checkpoint mechanics shared by the conversion tools and the trainer.

* :mod:`~dapo_megatron.checkpointing.protocol`: the one atomic-save protocol
  (:func:`atomic_directory`), keep-last-K pruning, newest-complete discovery, single-file
  save/load with errors naming the file. Imports nothing of the package.
* :mod:`~dapo_megatron.checkpointing.sharded`: Megatron-Core dist checkpoints (save, integrity
  check, load with errors naming the file) and the model + optimizer sharded state the trainer
  saves in one of them.

What a converted model checkpoint or a trainer checkpoint contains is defined by its owner
(:mod:`dapo_megatron.conversion.checkpoint`, :mod:`dapo_megatron.trainer.checkpoint`).
"""

from dapo_megatron.checkpointing.protocol import (
    CheckpointError,
    CheckpointWriteError,
    atomic_directory,
    complete_checkpoints,
    first_line,
    is_temporary,
    load_file,
    newest_complete,
    prune,
    save_file,
)
from dapo_megatron.checkpointing.sharded import (
    OPTIMIZER_KEY,
    check_files,
    load_optimizer_state,
    load_sharded,
    model_and_optimizer_state,
    save_sharded,
)

__all__ = [
    "OPTIMIZER_KEY",
    "CheckpointError",
    "CheckpointWriteError",
    "atomic_directory",
    "check_files",
    "complete_checkpoints",
    "first_line",
    "is_temporary",
    "load_file",
    "load_optimizer_state",
    "load_sharded",
    "model_and_optimizer_state",
    "newest_complete",
    "prune",
    "save_file",
    "save_sharded",
]
