"""``python -m dapo_megatron.train --config FILE [--preset dapo] [section.key=value ...]``

Launch with ``torchrun`` on any number of nodes (GPU: nccl) or CPU processes (gloo); without
torchrun it runs as a world of one.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import torch

    from dapo_megatron.config import config_from_argv
    from dapo_megatron.trainer.loop import DapoTrainer, init_distributed

    cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(__import__("os").environ.get("DAPO_NUM_THREADS", "1"))))
    init_distributed(cfg.parallel.backend)
    import torch.distributed as dist

    try:
        DapoTrainer(cfg).run()
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
