"""A multi-step task for the ablation, and its warm-started starting policy.

**Task** (DAPO-Math-17k schema, ``data_source = "demo/multistep"``): add 2 to 4 one-digit numbers,
showing the work. The reference solution is one step per addition, then the answer line::

    prompt:   What is 3 + 4 + 5? Add step by step. Finish your response with a final line ... "Answer: N" ...
    solution: 3 + 4 = 7. 7 + 5 = 12. Answer: 12

so a correct response is 12 (2 operands) to 26 (4 operands) tokens long: the length varies with
the question, unlike the demo's one-token answers, and token-level vs sequence-level loss
aggregation weigh the questions differently.

**Starting policy** (:func:`make_multistep_model`): the demo's tiny word-level Llama, warm-started
the same way (a few minutes, one thread, deterministic) on *noisy worked solutions*: each step's result
is right with probability ``p_step`` and otherwise off by -2..+2 (later steps carry the error on,
so longer questions are harder), and with probability ``p_check`` (repeatedly) the solution
appends a ``Check:`` pass that repeats every step before the answer. Checks add nothing, but make
responses long: a 4-operand solution with one check (~47 tokens) does not fit in the ablation's
``max_response_length = 40`` and is truncated (no answer, reward -1); 3-operand ones with a check
fall in the overlong buffer. So the policy starts at ~48% sampled accuracy (2/3/4 operands: 72/52/23%,
near the labels' own 75/56/42% before truncation) with ~13% truncated
responses: room for every DAPO component (dynamic sampling, Clip-Higher, token-level loss,
overlong shaping / filtering) to act.

CLI::

    python -m dapo_megatron.demo.multistep --out runs/ablation/model --data runs/ablation/data [--eval]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dapo_megatron.demo.model import (
    _encode_rows,
    _llama_config,
    _one_thread,
    build_tokenizer,
    save_model_dir,
    sft_update,
)
from dapo_megatron.demo.task import INSTRUCTION, write_rows

__all__ = [
    "DATA_SOURCE",
    "MultistepModelConfig",
    "make_multistep_model",
    "make_multistep_rows",
    "worked_solution",
    "write_multistep_dataset",
]

DATA_SOURCE = "demo/multistep"
STEP_HINT = "Add step by step."
MAX_CHECKS = 2
TEMPLATE_TEXTS = (f"What is 0 + 0? {STEP_HINT} {INSTRUCTION}", "0 + 0 = 0. Check: 0 + 0 = 0. Answer: 0")


def make_multistep_rows(
    num: int, seed: int = 0, split: str = "train", min_terms: int = 2, max_terms: int = 4
) -> list[dict[str, Any]]:
    """``num`` questions ``a1 + ... + ak`` (``min_terms <= k <= max_terms``, ``1 <= ai <= 9``),
    deterministic in ``(seed, split)``; ``extra_info.terms`` holds the operands."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    rng = random.Random(f"multistep/{seed}/{split}")
    rows = []
    for index in range(num):
        terms = [rng.randint(1, 9) for _ in range(rng.randint(min_terms, max_terms))]
        question = " + ".join(map(str, terms))
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"What is {question}? {STEP_HINT} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"ground_truth": str(sum(terms)), "style": "rule"},
                "extra_info": {"index": index, "split": split, "terms": terms},
            }
        )
    return rows


def worked_solution(
    terms: list[int], rng: random.Random | None = None, p_step: float = 1.0, p_check: float = 0.0
) -> tuple[str, int]:
    """``(text, final value)``: one ``"x + y = z."`` step per addition, each result right with
    probability ``p_step`` (else off by a uniform -2, -1, +1, +2, carried on), then with
    probability ``p_check`` (again after each one, at most :data:`MAX_CHECKS`) a ``Check:`` pass repeating the steps, then
    ``Answer: <value>``. ``rng=None`` gives the exact solution without checks."""
    rng = rng or random.Random(0)
    steps, value = [], terms[0]
    for t in terms[1:]:
        result = value + t
        if rng.random() >= p_step:
            result += rng.choice((-2, -1, 1, 2))
        steps.append(f"{value} + {t} = {result}.")
        value = result
    parts = list(steps)
    for _ in range(MAX_CHECKS):
        if rng.random() >= p_check:
            break
        parts += ["Check:", *steps]
    return " ".join([*parts, f"Answer: {value}"]), value


def write_multistep_dataset(
    out_dir: str | Path, num_train: int = 1024, num_val: int = 64, seed: int = 0
) -> dict[str, Path]:
    """``train.parquet`` and ``val.parquet`` under ``out_dir``."""
    out = {}
    for split, num in (("train", num_train), ("val", num_val)):
        out[split] = write_rows(make_multistep_rows(num, seed=seed, split=split), Path(out_dir) / f"{split}.parquet")
    return out


@dataclass(frozen=True)
class MultistepModelConfig:
    """Everything that determines the built model (saved as ``demo_model.json``)."""

    seed: int = 0
    num_train: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False
    p_step: float = 0.75
    p_check: float = 0.3
    # 300 steps left the arithmetic unlearnt (19%; 2 operands 27%): RL then had nothing to sharpen
    steps: int = 1200
    batch_size: int = 48
    lr: float = 3e-3
    warmup_steps: int = 20

    def validate(self) -> None:
        if not 0.0 <= self.p_step <= 1.0:
            raise ValueError(f"p_step must be in [0, 1], got {self.p_step}")
        if not 0.0 <= self.p_check < 1.0:
            raise ValueError(f"p_check must be in [0, 1) (checks repeat geometrically), got {self.p_check}")
        for name in ("num_train", "hidden_size", "num_layers", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _warm_start(model: Any, tokenizer: Any, cfg: MultistepModelConfig) -> dict[str, float]:
    rows = make_multistep_rows(cfg.num_train, seed=cfg.seed, split="train")
    prompts = [p for p, _ in _encode_rows(rows, tokenizer)]
    terms = [row["extra_info"]["terms"] for row in rows]
    rng = random.Random(f"multistep-model/{cfg.seed}/labels")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 1.0 - 0.9 * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.train()
    losses = []
    for _ in range(cfg.steps):
        seqs = []
        for _ in range(cfg.batch_size):
            i = rng.randrange(len(rows))
            text, _ = worked_solution(terms[i], rng, cfg.p_step, cfg.p_check)
            seqs.append((prompts[i], tokenizer.encode(text, add_special_tokens=False) + [eos]))
        losses.append(sft_update(model, optimizer, scheduler, seqs, pad))
    model.eval()
    tail = losses[-20:]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail)}


def make_multistep_model(out_dir: str | Path, *, overwrite: bool = False, **options: Any) -> Path:
    """Build the ablation's starting policy as a Hugging Face directory at ``out_dir`` (written
    atomically; ``options``: any :class:`MultistepModelConfig` field). Returns ``out_dir``."""
    from transformers import LlamaForCausalLM

    unknown = sorted(set(options) - set(MultistepModelConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"make_multistep_model() got unknown options {unknown}")
    cfg = MultistepModelConfig(**options)
    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = build_tokenizer(model_max_length=cfg.max_position_embeddings, extra_texts=TEMPLATE_TEXTS)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(_llama_config(cfg, tokenizer)).to(torch.float32)
        stats = _warm_start(model, tokenizer, cfg)
    info = {**asdict(cfg), **stats, "task": DATA_SOURCE, "vocab_size": len(tokenizer)}
    save_model_dir(model, tokenizer, out_dir, info, start=start, max_new_tokens=48)
    return out_dir


def evaluate(model_dir: str | Path, *, num_prompts: int = 64, n: int = 8, max_new_tokens: int = 40, seed: int = 0):
    """Sampled accuracy (T=1) on the val split, per number of operands, and the truncation rate."""
    from transformers import AutoTokenizer

    from dapo_megatron.rewards.math import compute_score
    from dapo_megatron.rollout import SamplingConfig, create_engine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = make_multistep_rows(num_prompts, seed=seed, split="val")
    encoded = _encode_rows(rows, tokenizer)
    engine = create_engine("hf", str(model_dir), seed=seed, max_batch_rows=256)
    try:
        with _one_thread():
            out = engine.generate(
                [p for p, _ in encoded], n, SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
            )
    finally:
        engine.close()
    by_terms: dict[int, list[float]] = {}
    truncated, lengths, informative = 0, [], 0
    for row, responses in zip(rows, out):
        right = 0
        for resp in responses:
            text = tokenizer.decode(resp.token_ids, skip_special_tokens=True)
            ok = bool(compute_score(text, row["reward_model"]["ground_truth"])["acc"])
            right += ok
            by_terms.setdefault(len(row["extra_info"]["terms"]), []).append(float(ok))
            truncated += resp.finish_reason == "length"
            lengths.append(len(resp.token_ids))
        informative += 0 < right < n
    total = len(rows) * n
    metrics = {"acc": sum(sum(v) for v in by_terms.values()) / total}
    metrics.update({f"acc_{k}_terms": sum(v) / len(v) for k, v in sorted(by_terms.items())})
    metrics.update(
        {
            "truncated": truncated / total,
            "length_mean": sum(lengths) / total,
            "informative": informative / len(rows),
        }
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the multi-step task and its starting policy.")
    parser.add_argument("--out", type=Path, required=True, help="model directory to create")
    parser.add_argument("--data", type=Path, help="also write train/val parquet files here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--eval", action="store_true", help="print sampled accuracy / truncation (T=1, n=8)")
    args = parser.parse_args(argv)
    if args.data:
        write_multistep_dataset(args.data, seed=args.seed)
    if not args.out.exists() or args.overwrite:
        make_multistep_model(args.out, seed=args.seed, overwrite=args.overwrite)
    info = json.loads((args.out / "demo_model.json").read_text())
    print(f"{args.out}: vocab {info['vocab_size']}, final SFT loss {info['final_loss']:.3f}, {info['build_seconds']} s")
    if args.eval:
        print(" ".join(f"{k}={v:.3f}" for k, v in evaluate(args.out, seed=args.seed).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
