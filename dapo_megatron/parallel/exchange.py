"""Point-to-point tensor exchange: the transport of the rollout data plane.

Both sides know every size in advance (from small, globally gathered metadata), so receivers
pre-allocate and nothing is pickled. A transfer from a rank to itself is a copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cpu(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """``all_gather`` of a small CPU tensor (through the GPU under NCCL); CPU results."""
    dev = comm_device()
    src = t.to(dev)
    out = [torch.empty_like(src) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, src, group=group)
    return [o.cpu() for o in out]


def all_reduce_cpu(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """``all_reduce`` of a small CPU tensor (through the GPU under NCCL); returns a CPU tensor."""
    buf = t.to(comm_device())
    dist.all_reduce(buf, op=op, group=group)
    return buf.cpu()


def exchange(
    sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]], *, group=None
) -> int:
    """Send ``sends[peer]`` to each peer and receive ``recvs[peer]`` (pre-allocated) from each.

    The tensor lists of a (sender, receiver) pair must match in order, dtype and size on both
    sides. Empty tensors are skipped. Ranks are global. Returns the bytes received by this rank,
    copies from itself included.
    """
    me = dist.get_rank() if dist.is_initialized() else 0
    dev = comm_device()
    received = 0
    pending, staged = [], []
    for peer, tensors in sends.items():
        if peer == me:
            continue
        for tag, t in enumerate(tensors):
            if t.numel():
                pending.append(dist.isend(t.to(dev).contiguous(), dst=peer, group=group, tag=tag))
    for peer, tensors in recvs.items():
        for tag, t in enumerate(tensors):
            if not t.numel():
                continue
            received += t.numel() * t.element_size()
            if peer == me:
                t.copy_(sends[me][tag])
            else:
                buf = t if t.device == dev else torch.empty_like(t, device=dev)
                pending.append(dist.irecv(buf, src=peer, group=group, tag=tag))
                staged.append((t, buf))
    for work in pending:
        work.wait()
    for t, buf in staged:
        if buf is not t:
            t.copy_(buf)
    return received
