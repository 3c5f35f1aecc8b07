"""The one place where process groups are set up.

* :func:`init_distributed`: ``torch.distributed`` from torchrun's environment, or a world of one
  on a free port when there is no torchrun (no fixed port: two single-process tools can run side
  by side). Used by the trainer, the command-line tools and :mod:`dapo_megatron.parallel.launch`.
* :func:`initialize_parallel`: Megatron's TP / PP / DP groups for a :class:`ParallelLayout` and
  its RNGs, returning the :class:`ProcessGroups` that are then passed explicitly (Megatron-Core
  style) into the policy trainer, the metric reduction and the rollout data plane.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dapo_megatron.parallel.layout import ParallelLayout


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", *, timeout: timedelta = timedelta(hours=3)) -> None:
    """``torch.distributed`` from torchrun's environment (a world of one without torchrun).

    On CPU the Megatron CUDA shims are enabled first (:func:`~dapo_megatron.parallel.cpu.enable_cpu_megatron`).
    The generous default timeout covers ranks that wait in a collective while their engine
    generates long responses. Idempotent.
    """
    from dapo_megatron.parallel.cpu import enable_cpu_megatron

    if "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if backend == "auto":
        backend = default_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    else:
        enable_cpu_megatron()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)


def init_single_process() -> None:
    """A one-rank process group in *this* process (for single-process tools); idempotent."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        from dapo_megatron.parallel.cpu import enable_cpu_megatron

        enable_cpu_megatron()
    dist.init_process_group(default_backend(), rank=0, world_size=1)


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's process groups and where the other ranks sit (every rank holds the same maps).

    Attributes:
        tp, pp, dp: Megatron's tensor-, pipeline- and data-parallel groups of this rank (``None``
            for a group of one: collectives are skipped).
        dp_rank, dp_size: this rank's data-parallel index and the number of replicas.
        replica_ranks: ``replica_ranks[d]`` = the global ranks of data-parallel replica ``d`` (its
            TP x CP x PP ranks), ascending.
        reports_metrics: this rank computes the loss reports that count (last pipeline stage,
            TP rank 0): the others contribute zeros to metric reductions.
    """

    tp: object
    pp: object
    dp: object
    dp_rank: int
    dp_size: int
    replica_ranks: tuple[tuple[int, ...], ...]
    reports_metrics: bool

    @property
    def world(self):
        """The group over every rank: metric reductions sum the reports of every replica's
        reporting rank (the others contribute zeros)."""
        return dist.group.WORLD


def initialize_parallel(layout: ParallelLayout, *, seed: int = 1234) -> ProcessGroups:
    """``initialize_model_parallel`` (TP, PP, CP; DP is what remains of the world) and Megatron's RNGs.

    ``torch.distributed`` must already be initialised (:func:`init_distributed`). Idempotent for
    the same layout.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    layout.check_world(dist.get_world_size())
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.tp,
        )
    model_parallel_cuda_manual_seed(seed)
    return current_groups()


def current_groups() -> ProcessGroups:
    """The :class:`ProcessGroups` of Megatron's initialised parallel state (collective: one small
    all-gather over the world, to learn which ranks form each replica)."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    world = dist.get_world_size()
    if world > 1:
        from dapo_megatron.parallel.exchange import all_gather_cpu

        dp_of = [int(t) for t in all_gather_cpu(torch.tensor([dp_rank], dtype=torch.long))]
    else:
        dp_of = [0]
    replicas = tuple(tuple(r for r in range(world) if dp_of[r] == d) for d in range(dp_size))
    return ProcessGroups(
        tp=ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None,
        pp=ps.get_pipeline_model_parallel_group()
        if ps.get_pipeline_model_parallel_world_size() > 1
        else None,
        dp=ps.get_data_parallel_group() if dp_size > 1 else None,
        dp_rank=dp_rank,
        dp_size=dp_size,
        replica_ranks=replicas,
        reports_metrics=ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0,
    )
