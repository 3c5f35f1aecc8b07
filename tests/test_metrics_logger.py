"""MetricsLogger: JSONL records, TensorBoard scalars, resume truncation, rank gating."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dapo_megatron.utils.metrics_logger import MetricsLogger, read_metrics, truncate_metrics

REPO = Path(__file__).resolve().parents[1]


def tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_jsonl_records_and_types(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        rec = log.log(
            1, {"reward/mean": torch.tensor(0.5), "acc/mean": np.float32(0.25), "n": 3, "flag": True}
        )
        log.log(2, {"reward/mean": 0.75, "entropy": float("nan"), "note": "x"})
        # the file is flushed each step: readable while the logger is still open
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert rec["reward/mean"] == 0.5 and rec["acc/mean"] == 0.25
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert set(first) == {"step", "time", "reward/mean", "acc/mean", "n", "flag"}
    assert first["n"] == 3 and first["flag"] is True
    assert second["entropy"] is None and second["note"] == "x"  # NaN -> null keeps the file valid JSON


def test_bad_metric_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="metric 'v' must be a scalar"):
            log.log(1, {"v": torch.ones(3)})
        with pytest.raises(TypeError, match="metric 'v' must be a number or string, got list"):
            log.log(1, {"v": [1]})
        with pytest.raises(ValueError, match="disagrees with step=1"):
            log.log(1, {"step": 2})


def test_resume_truncates_later_steps(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn write of a run that was killed
    # resumed from the checkpoint of step 3: steps 4, 5 and the torn line go; new steps append
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        log.log(4, {"loss": 40.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # without resume_step the file is appended to as is
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(5, {"loss": 50.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert truncate_metrics(tmp_path / "metrics.jsonl", 0) == 5
    assert read_metrics(tmp_path) == []
    assert truncate_metrics(tmp_path / "absent.jsonl", 0) == 0


def test_disabled_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, enabled=False) as log:
        rec = log.log(1, {"loss": 1.0})
    assert rec["loss"] == 1.0
    assert not run_dir.exists()


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    with MetricsLogger(tmp_path, jsonl=False) as log:
        for step in range(1, 5):
            log.log(step, {"reward/mean": step / 10, "note": "text is skipped"})
    assert not (tmp_path / "metrics.jsonl").exists()
    assert tb_scalars(tmp_path, "reward/mean") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    with MetricsLogger(tmp_path, resume_step=2) as log:
        log.log(3, {"reward/mean": 0.9})
    assert tb_scalars(tmp_path, "reward/mean") == [(1, 0.1), (2, 0.2), (3, 0.9)]


def test_plot_metrics_tool(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 4):
            log.log(step, {"acc/mean": 0.1 * step, "reward/mean": 0.2 * step - 1, "pg_clipfrac_high": 0.01})
    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_metrics.py"), str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acc/mean" in proc.stdout and "entropy" not in proc.stdout.split("plotted:")[-1]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_metrics.py"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "metrics.jsonl" in proc.stderr
