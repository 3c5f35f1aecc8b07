#!/usr/bin/env python
"""Write the bundled arithmetic demo task in the DAPO-Math-17k schema.

    python tools/make_demo_data.py --out data/generated/arith [--num-train 512 --num-val 64 --seed 0]

writes ``train.parquet``/``train.jsonl`` and ``val.parquet``/``val.jsonl`` (see
``dapo_megatron.demo.task``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dapo_megatron.demo.task import write_demo_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the arithmetic demo dataset.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=9, help="operands are drawn from 0..max-operand")
    parser.add_argument("--ops", default="+", help="operators to use, e.g. '+-*'")
    parser.add_argument("--formats", default="parquet,jsonl", help="comma-separated: parquet, jsonl")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("parquet", "jsonl")]
    if bad or not formats:
        parser.error(f"--formats must be parquet and/or jsonl, got {args.formats!r}")
    paths = write_demo_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        formats=formats,
        max_operand=args.max_operand,
        ops=tuple(args.ops),
    )
    for split, files in paths.items():
        print(f"{split}: {', '.join(str(p) for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
