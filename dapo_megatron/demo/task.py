"""A tiny arithmetic task in the DAPO-Math-17k schema, for the CPU demo and tests.

Each row asks e.g. "What is 3 + 4?" and expects the response to end with "Answer: 7"::

    {"data_source": "demo/arithmetic",
     "prompt": [{"role": "user", "content": "What is 3 + 4? ... Answer: N ..."}],
     "ability": "math",
     "reward_model": {"ground_truth": "7", "style": "rule"},
     "extra_info": {"index": 0, "split": "train", "a": 3, "b": 4, "op": "+"}}
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATA_SOURCE", "INSTRUCTION", "make_demo_rows", "write_demo_dataset", "write_rows"]

DATA_SOURCE = "demo/arithmetic"
INSTRUCTION = 'Finish your response with a final line of the form "Answer: N", where N is the number.'

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_demo_rows(
    num: int,
    seed: int = 0,
    split: str = "train",
    max_operand: int = 9,
    ops: Sequence[str] = ("+",),
) -> list[dict[str, Any]]:
    """``num`` random questions ``a op b`` with ``0 <= a, b <= max_operand``.

    Deterministic in ``(seed, split)``; train and val draw from different streams but the same
    small space of questions, so they may overlap (it is a learning demo, not a benchmark).
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    bad = [op for op in ops if op not in _OPS]
    if bad or not ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(_OPS)}, got {list(ops)}")
    rng = random.Random(f"{seed}/{split}")
    rows = []
    for index in range(num):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(list(ops))
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"What is {a} {op} {b}? {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"ground_truth": str(_OPS[op](a, b)), "style": "rule"},
                "extra_info": {"index": index, "split": split, "a": a, "b": b, "op": op},
            }
        )
    return rows


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as ``.parquet`` (pyarrow) or ``.jsonl`` by the file suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl suffix")
    return path


def write_demo_dataset(
    out_dir: str | Path,
    num_train: int = 512,
    num_val: int = 64,
    seed: int = 0,
    formats: Sequence[str] = ("parquet", "jsonl"),
    **task_kwargs: Any,
) -> dict[str, list[Path]]:
    """Write ``train.<fmt>`` and ``val.<fmt>`` under ``out_dir``; return ``{"train": [...], "val": [...]}``."""
    out = {"train": [], "val": []}
    for split, num in (("train", num_train), ("val", num_val)):
        rows = make_demo_rows(num, seed=seed, split=split, **task_kwargs)
        for fmt in formats:
            out[split].append(write_rows(rows, Path(out_dir) / f"{split}.{fmt}"))
    return out
