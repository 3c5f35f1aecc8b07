"""The CPU demo: ``python -m dapo_megatron.demo`` (what ``make demo`` runs).

1. builds the bundled one-digit addition task (DAPO-Math-17k schema) and a tiny Llama
   warm-started to ~30% sampled accuracy on it (seconds; cached under ``runs/demo``);
2. launches ``torchrun --nproc-per-node 2 -m dapo_megatron.train --config examples/demo_cpu.yaml``
   (TP=2 on two gloo ranks: one replica, so one HF rollout engine, on rank 0);
3. prints the validation accuracy (avg@8, temperature 1) before and after training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "demo_cpu.yaml"


def prepare(demo_dir: Path) -> None:
    from dapo_megatron.demo.model import make_demo_model
    from dapo_megatron.demo.task import write_demo_dataset

    if not (demo_dir / "model" / "config.json").exists():
        print("[demo] building the warm-started tiny model ...", flush=True)
        make_demo_model(demo_dir / "model", seed=0)
    if not (demo_dir / "data" / "val.parquet").exists():
        write_demo_dataset(demo_dir / "data", num_train=512, num_val=64, seed=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-dir", default="runs/demo", help="where the model, data and run go")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (TP=2 needs 2)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. trainer.total_steps=50")
    args = parser.parse_args(argv)

    demo_dir = Path(args.demo_dir)
    prepare(demo_dir)
    run_dir = demo_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time (the trainer would otherwise resume)
    overrides = [
        f"model.hf_dir={demo_dir / 'model'}",
        f"data.train_files=[{demo_dir / 'data' / 'train.parquet'}]",
        f"data.val_files=[{demo_dir / 'data' / 'val.parquet'}]",
        f"trainer.run_dir={run_dir}",
        *args.overrides,
    ]
    return launch(CONFIG, overrides, run_dir, nproc=args.nproc)


def launch(config: Path, overrides: list[str], run_dir: Path, *, nproc: int, tag: str = "demo") -> int:
    """``torchrun --nproc-per-node nproc -m dapo_megatron.train --config config *overrides``, then
    print the first and last validation accuracy of ``run_dir/metrics.jsonl``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "dapo_megatron.train",
        "--config",
        str(config),
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    print(f"[{tag}] " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc:
        return rc
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [(r["step"], k, v) for r in rows for k, v in r.items() if k.startswith("val/acc_avg@")]
    if len(val) >= 2:
        (s0, key, a0), (s1, _, a1) = val[0], val[-1]
        print(
            f"[{tag}] validation accuracy ({key[4:]}): step {s0}: {a0:.3f} -> step {s1}: {a1:.3f} "
            f"({'+' if a1 >= a0 else ''}{a1 - a0:.3f})",
            flush=True,
        )
        print(
            f"[{tag}] metrics: {run_dir / 'metrics.jsonl'}  plot: python tools/plot_metrics.py {run_dir}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
