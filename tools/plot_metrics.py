#!/usr/bin/env python
"""Plot the main training curves of a run: ``python tools/plot_metrics.py RUN_DIR [--out PNG]``.

Reads ``RUN_DIR/metrics.jsonl`` and writes a PNG (default ``RUN_DIR/metrics.png``) with one panel
per available metric group; keys missing from the log are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (panel title, keys drawn in it)
PANELS: list[tuple[str, list[str]]] = [
    ("accuracy", ["acc/mean", "val/acc/mean", "val/acc_avg@8"]),
    ("reward", ["reward/mean"]),
    ("response length", ["response_length/mean"]),
    ("entropy", ["entropy"]),
    ("clip fraction", ["pg_clipfrac_high", "pg_clipfrac_low"]),
    ("dynamic sampling kept ratio", ["dynamic_sampling/kept_ratio"]),
]


def load(path: Path) -> list[dict]:
    """Records of a metrics.jsonl (torn lines skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot(records: list[dict], out: Path) -> list[str]:
    """Write the figure; return the keys that were plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, keys in PANELS:
        present = [k for k in keys if any(isinstance(r.get(k), int | float) for r in records)]
        if present:
            panels.append((title, present))
    if not panels:
        raise SystemExit(
            f"none of the plotted keys are in the metrics: {[k for _, ks in PANELS for k in ks]}"
        )
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    plotted = []
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [
                (r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and "step" in r
            ]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="." if len(points) < 50 else None,
                label=key,
            )
            plotted.append(key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return plotted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="output PNG (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    path = args.run_dir / "metrics.jsonl"
    if not path.is_file():
        print(f"error: {path} not found (is {args.run_dir} a run directory?)", file=sys.stderr)
        return 1
    out = args.out or args.run_dir / "metrics.png"
    plotted = plot(load(path), out)
    print(f"wrote {out}; plotted: {', '.join(plotted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
