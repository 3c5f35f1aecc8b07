"""Point-to-point tensor exchange: the transport of the rollout data plane.

Both sides know every size in advance (from small, globally gathered metadata), so receivers
pre-allocate and nothing is pickled. A transfer from a rank to itself is a copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def exchange(
    sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]], *, group=None
) -> int:
    """Send ``sends[peer]`` to each peer and receive ``recvs[peer]`` (pre-allocated) from each.

    The tensor lists of a (sender, receiver) pair must match in order, dtype and size on both
    sides. Empty tensors are skipped. Ranks are global. Returns the bytes received by this rank,
    copies from itself included.
    """
    me = dist.get_rank() if dist.is_initialized() else 0
    received = 0
    pending = []
    for peer, tensors in sends.items():
        if peer == me:
            continue
        for tag, t in enumerate(tensors):
            if t.numel():
                pending.append(dist.isend(t.contiguous(), dst=peer, group=group, tag=tag))
    for peer, tensors in recvs.items():
        for tag, t in enumerate(tensors):
            if not t.numel():
                continue
            received += t.numel() * t.element_size()
            if peer == me:
                t.copy_(sends[me][tag])
            else:
                pending.append(dist.irecv(t, src=peer, group=group, tag=tag))
    for work in pending:
        work.wait()
    return received
