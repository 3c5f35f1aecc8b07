"""Per-step metrics to ``<run_dir>/metrics.jsonl`` and TensorBoard (rank 0 only).

The logger knows nothing about ``torch.distributed``: the trainer passes ``enabled=(rank == 0)``.
On resume, pass the step of the checkpoint as ``resume_step``: JSONL lines with a larger step
(written after that checkpoint by the run that died) are dropped and TensorBoard events from
``resume_step + 1`` on are purged, so the resumed run does not duplicate steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger(__name__)


def _to_python(key: str, value: Any) -> float | int | bool | str | None:
    """A JSON-ready scalar: tensors/numpy scalars -> Python numbers, NaN/inf -> None."""
    if hasattr(value, "item") and callable(value.item):  # torch tensor, numpy scalar/array
        if getattr(value, "numel", None) is not None and value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got a tensor with {value.numel()} elements")
        value = value.item()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r} must be a number or string, got {type(value).__name__}")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file (or of ``<run_dir>/metrics.jsonl``); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d: not valid JSON (torn write?), skipped", path, lineno)
    return records


def truncate_metrics(path: str | Path, after_step: int) -> int:
    """Drop records with ``step > after_step`` (and unparsable lines), atomically; return how many."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step")
        except json.JSONDecodeError:
            continue
        if step is None or step <= after_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    removed = sum(1 for line in lines if line.strip()) - len(kept)
    if removed:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return removed


class MetricsLogger:
    """Write one JSON object per step to ``<run_dir>/metrics.jsonl`` and TensorBoard scalars.

    Args:
        run_dir: run directory (created if needed).
        jsonl: write ``metrics.jsonl`` (appending; flushed every step).
        tensorboard: write TensorBoard events under ``<run_dir>/tensorboard``.
        enabled: ``False`` on every rank but 0: then nothing is written at all.
        resume_step: the step the run resumes from (``0`` for a fresh start in an existing
            run_dir); records after it are dropped. ``None`` keeps everything.
    """

    def __init__(
        self,
        run_dir: str | Path,
        jsonl: bool = True,
        tensorboard: bool = True,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            if resume_step is not None:
                removed = truncate_metrics(self.path, resume_step)
                if removed:
                    logger.info(
                        "dropped %d metrics records after step %d from %s", removed, resume_step, self.path
                    )
            self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record ``metrics`` for ``step``; returns the JSON record (also on disabled ranks)."""
        if "step" in metrics and metrics["step"] != step:
            raise ValueError(f"metrics['step']={metrics['step']!r} disagrees with step={step}")
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in metrics.items():
            if key != "step":
                record[str(key)] = _to_python(key, value)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if (
                    key not in ("step", "time")
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    self._writer.add_scalar(key, value, global_step=step)
                elif isinstance(value, bool):
                    self._writer.add_scalar(key, float(value), global_step=step)
            self._writer.flush()
        return record

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
