"""Small collectives shared by the trainer and the tools."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["broadcast_object"]


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` of global rank ``src`` on every rank of ``group`` (pickled; for small metadata only).

    Returns ``obj`` unchanged when ``torch.distributed`` is not initialised (one process).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
