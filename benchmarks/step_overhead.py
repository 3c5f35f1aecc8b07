"""DAPO training-step time over a plain next-token cross-entropy step (issue 6; target <= 1.15x).

Usage::

    python benchmarks/step_overhead.py [--hidden 384] [--layers 4] [--vocab 32000]
                                       [--batch 8] [--seq 256] [--micro-batch 2] [--repeats 5]

Same process, model, layout (TP1 PP1, a gloo world of one), Megatron DDP + optimizer, micro-batches
and tokens for both steps; each step is ``zero_grad`` + Megatron's ``forward_backward`` schedule +
``optimizer.step()``:

- **plain**: Megatron's standard path: ``GPTModel(input_ids, position_ids, labels=...)`` returns the
  per-token vocab-parallel cross entropy; the loss function sums it over response tokens (same
  ``(sum, count, report)`` contract, ``calculate_per_token_loss``).
- **DAPO update**: ``PolicyTrainer.update`` (one mini-batch): vocab-parallel log-probs + entropy,
  clipped surrogate, metric reports and their reduction.
- **old log-probs**: ``PolicyTrainer.compute_log_probs`` (forward only), reported separately and as
  ``update + old log-probs``, which is what one DAPO step costs per mini-batch of fresh data.

Rounds are interleaved (plain, update, old log-probs) after warm-up so the shared machine's noise
hits all alike; each number is a median over rounds. One torch thread by default: on a shared 2-core
machine two OpenMP threads give 10x outliers. About 1.5-2.5 minutes at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _init_world_of_one() -> None:
    """A world of one (gloo on CPU, with the CPU redirection) and Megatron's TP1 PP1 state."""
    from dapo_megatron.parallel.groups import init_single_process, initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout

    init_single_process()
    initialize_parallel(ParallelLayout(tp=1, pp=1))


def make_batch(n: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-length sequences, first quarter prompt, the rest response; random advantages."""
    g = torch.Generator().manual_seed(seed)
    prompt = seq // 4
    response_mask = torch.zeros(n, seq)
    response_mask[:, prompt:] = 1
    adv = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0).expand(n, seq) * response_mask
    return {
        "input_ids": torch.randint(3, vocab, (n, seq), generator=g),
        "seq_lengths": torch.full((n,), seq),
        "response_mask": response_mask,
        "advantages": adv.contiguous(),
    }


def plain_step_fn(loaded, optimizer, batch: dict[str, torch.Tensor], micro_batch_size: int) -> Callable:
    """One next-token cross-entropy step through Megatron's own labels path (masked to responses)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n, s = batch["input_ids"].shape
    # Megatron convention: labels[t] is the token after position t; the loss at t counts when the
    # token it predicts is a response token (the same tokens the DAPO loss uses).
    labels = torch.roll(batch["input_ids"], -1, dims=1)
    loss_mask = torch.roll(batch["response_mask"], -1, dims=1)
    loss_mask[:, -1] = 0
    mbs = [
        {
            "input_ids": batch["input_ids"][i : i + micro_batch_size],
            "labels": labels[i : i + micro_batch_size],
            "loss_mask": loss_mask[i : i + micro_batch_size],
        }
        for i in range(0, n, micro_batch_size)
    ]
    position_ids = torch.arange(s).expand(micro_batch_size, s)

    def loss_func(mb, per_token_loss):
        mask = mb["loss_mask"]
        total = (per_token_loss.float() * mask).sum()
        count = mask.sum().to(torch.int)
        return total, count, {"loss": torch.stack([total.detach(), count.float()])}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["input_ids"], position_ids, attention_mask=None, labels=mb["labels"])
        return out, lambda output: loss_func(mb, output)

    forward_backward = get_forward_backward_func()

    def step() -> None:
        loaded.model.train()
        loaded.model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(mbs),
            model=[loaded.model],
            num_microbatches=len(mbs),
            seq_length=s,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        optimizer.step()

    return step


def run_benchmark(
    *,
    hidden: int,
    layers: int,
    vocab: int,
    batch: int,
    seq: int,
    micro_batch: int,
    warmup: int,
    repeats: int,
    logprob_chunk: int | None,
) -> dict:
    from dapo_megatron.config import OptimizerConfig
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.optim import build_optimizer, wrap_ddp
    from dapo_megatron.policy.train_step import PolicyTrainer
    from tests.helpers.tiny_models import make_tiny_hf_model

    _init_world_of_one()
    with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
        make_tiny_hf_model("llama", tmp, num_layers=layers, vocab_size=vocab, hidden_size=hidden)
        loaded = build_model_from_hf(tmp, ParallelLayout(tp=1, pp=1))
    _, use_dist = wrap_ddp(loaded)
    opt = OptimizerConfig(lr=1e-6, lr_warmup_steps=0, clip_grad=1.0)
    optimizer, scheduler = build_optimizer(
        loaded, opt, total_steps=10_000, use_distributed_optimizer=use_dist
    )
    trainer = PolicyTrainer(
        loaded,
        optimizer,
        scheduler,
        LossSettings(logprob_chunk_size=logprob_chunk),
        micro_batch_size=micro_batch,
    )
    data = make_batch(batch, seq, vocab)
    plain = plain_step_fn(loaded, optimizer, data, micro_batch)

    def old_logprobs() -> None:
        data["old_log_probs"] = trainer.compute_log_probs(data)

    def update() -> None:
        trainer.update(data, mini_batch_size=batch)

    old_logprobs()
    steps = {"plain": plain, "dapo_update": update, "old_log_probs": old_logprobs}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rnd in range(warmup + repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            if rnd >= warmup:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "config": dict(
            hidden=hidden, layers=layers, vocab=vocab, batch=batch, seq=seq, micro_batch=micro_batch
        ),
        "params": params,
        "threads": torch.get_num_threads(),
        "times_s": times,
        "median_s": med,
        "update_ratio": med["dapo_update"] / med["plain"],
        "update_plus_old_ratio": (med["dapo_update"] + med["old_log_probs"]) / med["plain"],
    }


def print_report(r: dict) -> None:
    c = r["config"]
    print(
        f"model: llama hidden {c['hidden']}, {c['layers']} layers, vocab {c['vocab']} "
        f"({r['params'] / 1e6:.1f}M params); batch {c['batch']} x {c['seq']} tokens, micro-batch "
        f"{c['micro_batch']}; TP1 PP1, {r['threads']} thread(s); median of {len(r['times_s']['plain'])}"
    )
    med = r["median_s"]
    plain = med["plain"]
    rows = [
        ("plain next-token CE step", plain),
        ("DAPO update (fwd+bwd+step)", med["dapo_update"]),
        ("old log-probs (fwd only)", med["old_log_probs"]),
        ("DAPO update + old log-probs", med["dapo_update"] + med["old_log_probs"]),
    ]
    print(f"{'step':<30}{'median s':>10}{'x plain':>9}   (min .. max)")
    for name, t in rows:
        key = {
            "plain next-token CE step": "plain",
            "DAPO update (fwd+bwd+step)": "dapo_update",
            "old log-probs (fwd only)": "old_log_probs",
        }.get(name)
        spread = f"({min(r['times_s'][key]):.3f} .. {max(r['times_s'][key]):.3f})" if key else ""
        print(f"{name:<30}{t:>10.3f}{t / plain:>8.2f}x   {spread}")
    print(f"DAPO update / plain = {r['update_ratio']:.3f}x (target <= 1.15x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--logprob-chunk", type=int, default=None, help="LossSettings.logprob_chunk_size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.batch % args.micro_batch:
        parser.error("--batch must be divisible by --micro-batch")
    torch.set_num_threads(args.threads)
    report = run_benchmark(
        hidden=args.hidden,
        layers=args.layers,
        vocab=args.vocab,
        batch=args.batch,
        seq=args.seq,
        micro_batch=args.micro_batch,
        warmup=args.warmup,
        repeats=args.repeats,
        logprob_chunk=args.logprob_chunk,
    )
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
