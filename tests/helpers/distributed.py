"""Run a test function on N gloo ranks in fresh processes, with a bounded wait.

``run_on_ranks(fn, world_size, *args)`` is :func:`dapo_megatron.parallel.launch.launch` with
test defaults: one torch thread per rank (several ranks share 2 cores) and a timeout, so a hang
or deadlock fails the test instead of the CI job. ``fn(rank, world_size, *args)`` must be a
module-level function; its per-rank results come back pickled; an exception on any rank
re-raises here (``RankError``, a ``RuntimeError``) with that rank's traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dapo_megatron.parallel.launch import launch

__all__ = ["run_on_ranks"]


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, threads: int = 1
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results."""
    return launch(fn, world_size, *args, timeout=timeout, threads=threads)
