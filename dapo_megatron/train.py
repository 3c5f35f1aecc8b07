"""``python -m dapo_megatron.train --config FILE [--preset dapo] [section.key=value ...]``

Launch with ``torchrun`` on any number of nodes (GPU: nccl) or CPU processes (gloo); without
torchrun it runs as a world of one. Configuration errors and missing inputs are reported as one
line naming the field or file (exit code 2) before any process group or model is built.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def check_inputs(cfg) -> None:
    """Fail fast, naming the field, when an input path does not exist."""
    if not Path(cfg.model.hf_dir, "config.json").is_file():
        raise FileNotFoundError(f"model.hf_dir: no config.json in {cfg.model.hf_dir}")
    ckpt = cfg.model.megatron_checkpoint
    if ckpt and not Path(ckpt).is_dir():
        raise FileNotFoundError(f"model.megatron_checkpoint: {ckpt} does not exist")
    for field in ("train_files", "val_files"):
        for f in getattr(cfg.data, field):
            if not Path(f).is_file():
                raise FileNotFoundError(f"data.{field}: {f} does not exist")


def main(argv: list[str] | None = None) -> int:
    import torch

    from dapo_megatron.config import config_from_argv

    try:
        cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
        check_inputs(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"dapo_megatron.train: error: {e}", file=sys.stderr)
        return 2

    import torch.distributed as dist
    from megatron.core import parallel_state

    from dapo_megatron.parallel.groups import init_distributed
    from dapo_megatron.trainer.loop import DapoTrainer

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("DAPO_NUM_THREADS", "1"))))
    init_distributed(cfg.parallel.backend)
    try:
        DapoTrainer(cfg).run()
    finally:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():  # an in-process vLLM engine may have torn it down on close()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
