"""Shared error reporting of the conversion command-line tools."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def call_or_exit(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn``; report bad input (a missing or corrupt file, a shape mismatch, an existing
    output, a failing rank) as one ``error:`` line on stderr and exit with status 2."""
    from dapo_megatron.conversion.checkpoint import CheckpointError
    from dapo_megatron.parallel.launch import RankError

    try:
        return fn(*args, **kwargs)
    except RankError as e:
        message = e.summary
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, CheckpointError) as e:
        message = e.args[0] if e.args else str(e)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
