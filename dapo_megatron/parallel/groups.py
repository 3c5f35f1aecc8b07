"""Megatron-Core parallel state for this process: model-parallel groups and RNG seeds."""

from __future__ import annotations

from dapo_megatron.models import ParallelLayout

__all__ = ["initialize_parallel"]


def initialize_parallel(layout: ParallelLayout, *, seed: int = 1234) -> None:
    """``initialize_model_parallel`` (TP, PP, CP; DP is what remains of the world) and Megatron's RNGs.

    ``torch.distributed`` must already be initialised (``torchrun`` + ``init_process_group``).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    layout.check_world(dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.tp,
        )
    model_parallel_cuda_manual_seed(seed)
