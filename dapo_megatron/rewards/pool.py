"""Reward functions in a pool of worker processes with a per-call timeout.

A reward function is ``fn(response: str, ground_truth: str, **kwargs) -> dict | float``; a dict
must hold ``"score"`` (``"acc"`` defaults to ``score > 0`` and ``"pred"`` to ``""``). It is named
by import path ``"package.module:function"`` so the spawned workers can import it.

Each worker is a fresh ``python`` process (it imports only this module and the reward function,
not the trainer's ``__main__``) with its own socket, so a single hung call can be killed
(SIGKILL) and its worker replaced without touching the others: a call that hangs or raises gets
the failure score and is counted in :class:`RewardStats`, and :meth:`RewardPool.compute` always
returns within about ``timeout_s`` per wave of calls.

Errors are not swallowed: the first traceback of the pool's life is logged once (later ones are
only counted, ``reward/num_errors``), and a call in which *every* response failed with an error
raises :class:`RewardFunctionError` naming the exception: a broken reward function would otherwise
score everything ``failure_score`` and the run would die later with a misleading message.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = [
    "DEFAULT_REWARD_FN",
    "RewardFunctionError",
    "RewardPool",
    "RewardStats",
    "load_reward_fn",
    "normalize_reward_output",
]

logger = logging.getLogger(__name__)

DEFAULT_REWARD_FN = "dapo_megatron.rewards.math:compute_score"

RewardFn = Callable[..., Any]


def load_reward_fn(path: str) -> RewardFn:
    """Import ``"package.module:function"`` and return the callable, with clear errors."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"reward function path must look like 'package.module:function', got {path!r}")
    module_name, attr = path.split(":")
    if not module_name or not attr:
        raise ValueError(f"reward function path must look like 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {path!r} is not callable (got {type(obj).__name__})")
    return obj


def _path_of(fn: str | RewardFn) -> str:
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(
            f"reward function {fn!r} must be a module-level function (workers import it by name)"
        )
    return f"{module}:{qualname}"


def normalize_reward_output(out: Any) -> dict[str, Any]:
    """Turn a reward function's return value into ``{"score": float, "acc": bool, "pred": str, ...}``."""
    if isinstance(out, Mapping):
        if "score" not in out:
            raise ValueError(f"reward function returned a dict without 'score': {dict(out)!r}")
        result = dict(out)
        result["score"] = float(out["score"])
        result["acc"] = bool(out.get("acc", result["score"] > 0))
        result["pred"] = str(out.get("pred", ""))
        return result
    if isinstance(out, int | float) and not isinstance(out, bool):
        return {"score": float(out), "acc": float(out) > 0, "pred": ""}
    raise ValueError(f"reward function must return a dict with 'score' or a number, got {type(out).__name__}")


def _worker_main(conn: Connection, fn_path: str) -> None:
    """Worker loop: load the function, say ready, then answer ``(index, args, kwargs)`` requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    try:
        fn = load_reward_fn(fn_path)
    except Exception as exc:
        conn.send(("load_error", repr(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        index, args, kwargs = msg
        try:
            conn.send(("ok", (index, normalize_reward_output(fn(*args, **kwargs)))))
        except Exception as exc:
            conn.send(("error", (index, (f"{type(exc).__name__}: {exc}", traceback.format_exc()))))


class RewardFunctionError(RuntimeError):
    """Every call of one :meth:`RewardPool.compute` failed: the reward function is broken, not the data."""


@dataclass
class RewardStats:
    """Counts from one :meth:`RewardPool.compute` call."""

    num_calls: int = 0
    num_timeouts: int = 0
    num_errors: int = 0
    num_worker_restarts: int = 0
    elapsed_s: float = 0.0

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat metrics dict, e.g. ``{"reward/num_timeouts": 0, ...}``."""
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items()}


class _Worker:
    """One worker: a fresh interpreter (never a re-import of the trainer's ``__main__``) with a socket."""

    def __init__(self, fn_path: str) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        # the child must import what the parent can (e.g. tests/ on sys.path, a source checkout)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        code = f"from dapo_megatron.rewards.pool import _worker_entry; _worker_entry({child_sock.fileno()}, {fn_path!r})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        self.started_at = time.monotonic()
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()


def _worker_entry(fd: int, fn_path: str) -> None:
    """Entry point of a worker process (see :class:`_Worker`)."""
    _worker_main(Connection(fd), fn_path)


class RewardPool:
    """Score responses in ``num_workers`` processes, each call bounded by ``timeout_s``.

    Args:
        reward_fn: import path ``"package.module:function"`` or a module-level function;
            default :data:`DEFAULT_REWARD_FN`.
        num_workers: worker processes; ``0`` runs calls in this process (no timeout, for debugging).
        timeout_s: per-call limit; a call running longer is killed and scored ``failure_score``.
        failure_score: score of a call that timed out, raised or returned garbage.
        startup_timeout_s: how long a (re)started worker may take to import the function.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        reward_fn: str | RewardFn | None = None,
        num_workers: int = 4,
        timeout_s: float = 10.0,
        failure_score: float = -1.0,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fn_path = _path_of(reward_fn if reward_fn is not None else DEFAULT_REWARD_FN)
        self.fn = load_reward_fn(self.fn_path)  # fail fast, in the caller, on a bad path
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.failure_score = float(failure_score)
        self.startup_timeout_s = float(startup_timeout_s)
        self._workers: list[_Worker] = [_Worker(self.fn_path) for _ in range(num_workers)]
        self._restarts = 0
        self._closed = False
        self._traceback_shown = False
        if self._workers:
            self._wait_ready(self._workers)

    @classmethod
    def from_config(cls, reward_cfg: Any) -> RewardPool:
        """A pool from a ``RewardConfig`` (``reward_fn``, ``num_workers``, ``timeout_s``, ``failure_score``)."""
        return cls(
            reward_cfg.reward_fn,
            num_workers=reward_cfg.num_workers,
            timeout_s=reward_cfg.timeout_s,
            failure_score=reward_cfg.failure_score,
        )

    # -- worker management --------------------------------------------------------------------

    def _wait_ready(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = {w.conn: w for w in workers if not w.ready}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"reward workers did not start within {self.startup_timeout_s:.0f}s")
            for conn in wait(list(pending), timeout=left):
                w = pending.pop(conn)
                self._handle_startup(w)

    def _handle_startup(self, w: _Worker) -> None:
        try:
            kind, payload = w.conn.recv()
        except EOFError:
            raise RuntimeError(f"reward worker exited while loading {self.fn_path!r}") from None
        if kind == "load_error":
            raise RuntimeError(f"reward worker could not load {self.fn_path!r}: {payload}")
        w.ready = True

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        new = _Worker(self.fn_path)
        self._workers[self._workers.index(w)] = new
        self._restarts += 1
        return new

    # -- scoring ------------------------------------------------------------------------------

    def _failure(self) -> dict[str, Any]:
        return {"score": self.failure_score, "acc": False, "pred": ""}

    def _error(self, stats: RewardStats, errors: list[tuple[str, str]], summary: str, tb: str) -> None:
        """Count one failed call; log the pool's first traceback, once."""
        stats.num_errors += 1
        errors.append((summary, tb))
        if not self._traceback_shown:
            self._traceback_shown = True
            logger.error(
                "reward function %r failed (shown once; later failures are counted in reward/num_errors):\n%s",
                self.fn_path,
                tb.rstrip(),
            )

    def compute(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extra_kwargs: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[list[dict[str, Any]], RewardStats]:
        """Score ``responses[i]`` against ``ground_truths[i]``.

        Args:
            responses: decoded responses.
            ground_truths: one reference answer per response.
            extra_kwargs: optional per-response keyword arguments for the reward function.

        Returns:
            ``(results, stats)``: one ``{"score", "acc", "pred"}`` dict per response, in order, and
            the counts of timeouts/errors/restarts.
        """
        if len(responses) != len(ground_truths):
            raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
        if extra_kwargs is not None and len(extra_kwargs) != len(responses):
            raise ValueError(f"got {len(responses)} responses but {len(extra_kwargs)} extra_kwargs")
        if self._closed:
            raise RuntimeError("RewardPool.compute called after close()")
        start = time.monotonic()
        stats = RewardStats(num_calls=len(responses))
        restarts_before = self._restarts
        results: list[dict[str, Any] | None] = [None] * len(responses)
        kwargs = [dict(k) for k in extra_kwargs] if extra_kwargs is not None else [{}] * len(responses)
        errors: list[tuple[str, str]] = []
        if not self._workers:
            for i, (resp, gt) in enumerate(zip(responses, ground_truths)):
                try:
                    results[i] = normalize_reward_output(self.fn(resp, gt, **kwargs[i]))
                except Exception as exc:
                    self._error(stats, errors, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                    results[i] = self._failure()
        else:
            self._run_parallel(responses, ground_truths, kwargs, results, stats, errors)
        stats.num_worker_restarts = self._restarts - restarts_before
        stats.elapsed_s = time.monotonic() - start
        if responses and stats.num_errors == len(responses):
            summary, tb = errors[0]
            raise RewardFunctionError(
                f"reward function {self.fn_path!r} failed on all {len(responses)} responses of this call; "
                f"first error: {summary}\n{tb.rstrip()}"
            )
        return [r if r is not None else self._failure() for r in results], stats

    def _run_parallel(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        kwargs: list[dict[str, Any]],
        results: list[dict[str, Any] | None],
        stats: RewardStats,
        errors: list[tuple[str, str]],
    ) -> None:
        todo = deque(range(len(responses)))
        remaining = len(responses)
        while remaining:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and todo:
                    i = todo.popleft()
                    w.task, w.deadline = i, now + self.timeout_s
                    w.conn.send((i, (responses[i], ground_truths[i]), kwargs[i]))
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            deadlines += [w.started_at + self.startup_timeout_s for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready_conns = set(wait([w.conn for w in self._workers], timeout=wait_s))
            for w in list(self._workers):
                if w.conn in ready_conns:
                    if not w.ready:
                        self._handle_startup(w)
                        continue
                    try:
                        kind, payload = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (segfault, os._exit, OOM kill)
                        if w.task is not None:
                            results[w.task] = self._failure()
                            code = w.proc.poll()
                            summary = f"the reward worker process died (exit code {code})"
                            self._error(stats, errors, summary, summary)
                            remaining -= 1
                        self._replace(w)
                        continue
                    index, value = payload
                    if kind == "ok":
                        results[index] = value
                    else:
                        results[index] = self._failure()
                        self._error(stats, errors, *value)
                    w.task = None
                    remaining -= 1
                elif w.task is not None and time.monotonic() >= w.deadline:
                    results[w.task] = self._failure()
                    stats.num_timeouts += 1
                    remaining -= 1
                    self._replace(w)
                elif not w.ready and time.monotonic() >= w.started_at + self.startup_timeout_s:
                    raise RuntimeError(f"reward worker did not restart within {self.startup_timeout_s:.0f}s")

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            try:
                w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []
        self._closed = True

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
