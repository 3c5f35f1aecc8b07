"""Run a function on N gloo ranks in fresh processes, with a bounded wait.

``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initialises
``torch.distributed`` (gloo, free port), enables the CPU execution layer, calls
``fn(rank, world_size, *args)`` on each and returns the list of per-rank results (they must be
picklable). An exception on any rank re-raises here with that rank's traceback; a rank that does
not finish within ``timeout`` seconds fails the call instead of hanging the test session.
``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, results, threads):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
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
        from dapo_megatron.parallel.cpu import enable_cpu_megatron

        enable_cpu_megatron()
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle (bytes), not torch's shared-memory tensor passing: this process exits
        # right after, before the parent would have mapped the shared storage.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, threads: int = 1
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, results, threads), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_on_ranks: {world_size - len(outputs) - len(errors)} of {world_size} ranks did "
                    f"not finish within {timeout:.0f} s (a hang or deadlock in {fn.__name__})"
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(
                        f"run_on_ranks: rank process died with exit code {dead[0].exitcode} "
                        f"before reporting (killed or crashed in {fn.__name__})"
                    ) from None
                continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # one failure is enough; the others may be stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors and len(outputs) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError(f"run_on_ranks({fn.__name__}) failed:\n" + "\n".join(errors))
    return [outputs[r] for r in range(world_size)]
