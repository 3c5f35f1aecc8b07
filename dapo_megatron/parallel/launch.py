"""Start N local ranks without torchrun: for command-line tools and for tests.

:func:`launch` spawns ``world_size`` processes on this host, initialises ``torch.distributed``
(NCCL with one GPU per rank when CUDA is available, otherwise gloo plus the CPU Megatron layer),
runs ``fn(rank, world_size, *args)`` and returns the per-rank results. A failure on any rank is
re-raised as :class:`RankError` with that rank's last error line first; a hang becomes a
``TimeoutError``. The calling script must use an ``if __name__ == "__main__":`` guard (spawn).
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from dapo_megatron.parallel.groups import free_port, init_single_process  # noqa: F401 - re-exported


class RankError(RuntimeError):
    """A spawned rank raised. ``summary`` is its final error line (e.g. ``ValueError: ...``)."""

    def __init__(self, rank: int, summary: str, tb: str):
        super().__init__(f"rank {rank} failed: {summary}\n{tb}")
        self.rank, self.summary, self.traceback = rank, summary, tb


def _rank_main(rank, world_size, port, fn, args, results, threads):
    import torch.distributed as dist

    # A launcher started under torchrun must not join torchrun's rendezvous store.
    for key in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:
        del os.environ[key]
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        from datetime import timedelta

        from dapo_megatron.parallel.groups import init_distributed

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        init_distributed(timeout=timedelta(minutes=30))
        # Plain pickle (bytes), not torch's shared-memory tensor passing: this process exits
        # right after, before the parent would have mapped the shared storage.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, (f"{type(e).__name__}: {e}", traceback.format_exc())))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float | None = None,
    threads: int | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks; return their results.

    ``fn`` must be importable (module level). ``threads``: torch threads per CPU rank (default:
    the cores divided among the ranks).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise ValueError(
            f"{world_size} ranks need {world_size} GPUs; this host has {torch.cuda.device_count()}"
        )
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Not daemonic: dist_checkpointing.save starts a multiprocessing Manager inside each rank.
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, results, threads), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    failure: RankError | None = None
    try:
        while len(outputs) < world_size:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"{world_size - len(outputs)} rank(s) of {fn.__name__} did not finish in {timeout} s"
                )
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(
                        f"a rank of {fn.__name__} died with exit code {dead[0].exitcode} (killed, e.g. out of memory?)"
                    ) from None
                continue
            if not ok:
                failure = RankError(rank, *payload)
                break  # the other ranks may be stuck in a collective
            outputs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10 if failure is None and len(outputs) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if failure is not None:
        raise failure
    return [outputs[r] for r in range(world_size)]
