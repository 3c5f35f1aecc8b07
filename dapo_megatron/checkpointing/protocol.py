"""The one atomic-save protocol, keep-last-K pruning, newest-complete discovery and file errors.

Every checkpoint directory of the package (a converted model, a trainer step) is written the same
way (:func:`atomic_directory`): rank 0 creates ``<final>.tmp-<id>`` and broadcasts its name, every
rank writes into it, the ranks agree that every write succeeded, and only then rank 0 renames it
to ``<final>``. A directory named like a finished checkpoint is therefore always complete; a job
killed mid-save leaves a ``*.tmp-*`` directory that discovery ignores. A failure on any rank
(``ENOSPC`` from a writer process, an I/O error, a bug) makes *every* rank raise, so no rank hangs
in a barrier the failed one never reaches; the temporary directory is removed, and the error
names ``<final>``, the failing rank and the file the OS named.

Single files (:func:`save_file`, :func:`load_file`) are written with ``torch.save`` and read with
``torch.load(weights_only=True)``: no pickled code runs, and a truncated, corrupt or foreign
file is one ``ValueError`` line naming it.

Collective when ``torch.distributed`` is initialised (call on every rank), plain single-process
code otherwise. Imports nothing of the package.
"""

from __future__ import annotations

import errno as errno_mod
import os
import pickle
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

# What a failed save or load raises: torch.distributed.checkpoint's collective error derives from
# BaseException, not Exception.
FAILURES = (Exception, CheckpointException)
TMP_MARK = ".tmp-"
_DELETING_MARK = ".deleting-"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt (the message names the file)."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (on some rank); the message names the checkpoint and the file."""


# --------------------------------------------------------------------------------- collectives


class _Ranks:
    """The ranks taking part in a save: every rank of ``torch.distributed`` (``collective``), or
    this process alone."""

    def __init__(self, collective: bool | None):
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        if collective and not initialised:
            raise RuntimeError("a collective checkpoint save needs an initialised torch.distributed")
        self.dist = dist if (initialised if collective is None else collective) else None
        self.rank = self.dist.get_rank() if self.dist else 0

    def broadcast(self, obj: Any) -> Any:
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if self.dist is None:
            return [obj]
        out: list[Any] = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, obj)
        return out


# --------------------------------------------------------------------------------- messages


def first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's are paragraphs), or its type name."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(e).__name__


_ERRNO = re.compile(r"\[Errno (\d+)\]")


def _innermost(e: BaseException) -> tuple[BaseException, int | None]:
    """The root cause and, if known, the rank it happened on: through ``__cause__`` chains and
    torch.distributed.checkpoint's ``CheckpointException`` (its ``failures`` map each failed rank
    to its exception)."""
    seen, rank = set(), None
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict) and failures:
            rank = min(failures)
            inner = failures[rank]  # (exception, traceback summary)
            e = inner[0] if isinstance(inner, tuple) else inner
            continue
        if e.__cause__ is not None:
            e = e.__cause__
            continue
        break
    return e, rank


def _describe(e: BaseException) -> tuple[int | None, str, bool, int | None]:
    """``(errno, one-line text, detailed, rank)`` of a failure. ``detailed`` is False for a bare
    "some rank failed" notice (torch's ``CheckpointException`` off the coordinator); ``rank`` is
    the rank the root cause happened on, where the exception says so."""
    root, rank = _innermost(e)
    text = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    if not isinstance(root, OSError):  # torch's messages are paragraphs: the first sentence
        text = f"{type(root).__name__}: {text.split('. ')[0]}"
    code = getattr(root, "errno", None)
    if code is None and (m := _ERRNO.search(text)):
        code = int(m.group(1))
    detailed = not (isinstance(getattr(e, "failures", None), dict) and not e.failures)
    return code, text, detailed, rank


def save_file(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``; a failed write (``ENOSPC``, I/O error) raises ``OSError`` naming it."""
    path = Path(path)
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as e:
        msg = f"writing checkpoint file {path} failed: {getattr(e, 'strerror', None) or first_line(e)}"
        raise (OSError(e.errno, msg) if getattr(e, "errno", None) else OSError(msg)) from e


def load_file(path: str | Path, what: str, required: tuple[str, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` with a one-line ``ValueError`` naming ``path`` when
    the file is missing, truncated, corrupt, holds non-allow-listed types, or lacks one of
    ``required`` keys.

    Checkpoint files hold only tensors, dicts, lists and Python scalars (scheduler, RNG and loop
    states), so the default ``weights_only`` allow-list suffices; no pickled code runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: the {what} file is missing (incomplete checkpoint?)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        why = "truncated, corrupt or holding non-tensor types"
        raise ValueError(f"{path}: cannot read the {what} ({why}): {first_line(e)}") from None
    if required:
        missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise ValueError(
                f"{path}: the {what} lacks field(s) {', '.join(missing)} (not a dapo checkpoint file?)"
            )
    return obj


# --------------------------------------------------------------------------------- the protocol


def tmp_sibling(final: Path) -> Path:
    """A fresh temporary name next to ``final``: ``<final>.tmp-<8 hex>``."""
    return final.with_name(f"{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def is_temporary(path: str | Path) -> bool:
    return TMP_MARK in Path(path).name


@contextmanager
def atomic_directory(
    final: str | Path, *, tmp_dir: str | Path | None = None, collective: bool | None = None
) -> Iterator[Path]:
    """Write a checkpoint directory atomically (collective: enter it on every rank).

    Yields the (existing, empty) temporary directory, the same on every rank. On a clean exit on
    every rank it is renamed to ``final`` (which must not exist). If the body raises on any rank,
    every rank raises: :class:`CheckpointWriteError` naming ``final``, the failing rank and its
    error; the rank whose exception was not an ``OSError`` re-raises its own exception. The
    temporary directory is removed then, so ``final`` never appears and nothing is left behind.
    ``tmp_dir``: use this path instead of ``<final>.tmp-<id>`` (same file system as ``final``).
    ``collective``: ``None`` = over every rank iff ``torch.distributed`` is initialised; ``False``
    = this process alone (a driver whose workers write into the directory, or one rank of a job).
    """
    final = Path(final)
    ranks = _Ranks(collective)
    setup_error = None
    tmp = None
    if ranks.rank == 0:
        try:
            if final.exists():
                raise FileExistsError(
                    errno_mod.EEXIST, f"checkpoint directory {final} already exists; refusing to overwrite it"
                )
            tmp = Path(tmp_dir) if tmp_dir else tmp_sibling(final)
            tmp.mkdir(parents=True)
        except OSError as e:
            setup_error = e
    box = ranks.broadcast(
        (str(tmp) if tmp else None, None if setup_error is None else _describe(setup_error))
    )
    if setup_error is not None:
        raise setup_error
    if box[1] is not None:
        raise CheckpointWriteError(box[1][0], f"creating checkpoint {final} failed on rank 0: {box[1][1]}")
    tmp = Path(box[0])

    local: BaseException | None = None
    try:
        yield tmp
    except FAILURES as e:  # agreed on below, then re-raised on every rank
        local = e
    _finish(ranks, final, tmp, local)


def _finish(ranks: _Ranks, final: Path, tmp: Path, local: BaseException | None) -> None:
    """Agree on success across ranks; rank 0 renames (or removes) ``tmp``; raise on failure."""
    reports = ranks.all_gather(None if local is None else (ranks.rank, *_describe(local)))
    failed = [r for r in reports if r is not None]
    if not failed:
        rename_error = None
        if ranks.rank == 0:
            try:
                os.rename(tmp, final)
            except OSError as e:
                rename_error = (0, *_describe(e))
        rename_error = ranks.broadcast(rename_error)
        if rename_error is None:
            return
        failed = [rename_error]
    if ranks.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    ranks.broadcast(None)  # every rank raises only once the temporary directory is gone
    reporter, code, text, _, origin = next((f for f in failed if f[3]), failed[0])
    rank = reporter if origin is None else origin
    where = f" on rank {rank}" if ranks.dist is not None else ""
    msg = f"writing checkpoint {final} failed{where}: {text} ({final} was not created)"
    if isinstance(local, Exception) and not isinstance(local, OSError):
        raise local
    raise CheckpointWriteError(code or errno_mod.EIO, msg) from local


# --------------------------------------------------------------------------------- discovery


def complete_checkpoints(save_dir: str | Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    """``(number, path)`` of every complete checkpoint directory in ``save_dir`` whose name matches
    ``pattern`` (one group: the number), oldest first. Temporary directories never match."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in save_dir.iterdir() if (m := pattern.match(p.name)) and p.is_dir()]
    return sorted(found)


def newest_complete(save_dir: str | Path, pattern: re.Pattern[str]) -> Path | None:
    """The complete checkpoint with the highest number in ``save_dir`` (``None`` if none)."""
    found = complete_checkpoints(save_dir, pattern)
    return found[-1][1] if found else None


def prune(save_dir: str | Path, pattern: re.Pattern[str], keep_last: int) -> list[Path]:
    """Keep the ``keep_last`` newest complete checkpoints (0 = keep all) and remove leftovers of
    interrupted saves (``<name>.tmp-*`` whose name matches ``pattern`` and is not newer than the
    newest complete checkpoint). Single-process: call on one rank. Returns what was removed.

    A checkpoint is renamed to ``<name>.deleting-*`` before it is deleted, so a job killed while
    deleting never leaves a half-deleted directory under a complete checkpoint's name.
    """
    save_dir = Path(save_dir)
    found = complete_checkpoints(save_dir, pattern)
    doomed = [p for _, p in found[:-keep_last]] if keep_last > 0 else []
    newest = found[-1][0] if found else None
    for p in save_dir.iterdir() if save_dir.is_dir() else []:
        base, mark, _ = p.name.partition(TMP_MARK)
        m = pattern.match(base) if mark else None
        if m and newest is not None and int(m.group(1)) <= newest:
            doomed.append(p)
    removed = []
    for p in doomed:
        gone = p.with_name(f"{p.name}{_DELETING_MARK}{uuid.uuid4().hex[:8]}")
        try:
            os.rename(p, gone)
        except OSError:
            continue
        shutil.rmtree(gone, ignore_errors=True)
        removed.append(p)
    return removed
