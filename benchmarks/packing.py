"""Padded vs packed (THD) micro-batches: one DAPO update on a DAPO-like length distribution.

Usage::

    python benchmarks/packing.py [--hidden 256] [--layers 4] [--vocab 8192] [--batch 32]
                                 [--max-response 896] [--micro-batch 4] [--max-tokens N]
                                 [--repeats 3] [--json FILE]

Same model (a random Llama), layout (TP1 PP1, a gloo/NCCL world of one), batch and optimizer for
both modes; each measured step is ``PolicyTrainer.update`` (one mini-batch: forward, backward,
optimizer step) and, separately, ``compute_log_probs``:

- **padded**: micro-batches of ``--micro-batch`` sequences in batch order, each right-padded to its
  longest sequence (the default without ``parallel.max_tokens_per_micro_batch``);
- **packed**: ``max_tokens_per_micro_batch = --max-tokens`` (default ``micro-batch x longest``, the
  padded mode's worst case, so both have the same memory ceiling).

Lengths: prompts uniform in [32, 128]; responses log-normal (median ``max_response / 8``,
sigma 1), capped at ``--max-response`` (a few sequences hit the cap, as DAPO's overlong ones do).
Reported: tokens/s of real (unpadded) tokens, the computed-token fraction, and the peak memory
of the update (GPU: ``max_memory_allocated``; CPU: peak RSS growth of a fresh process running one
update, so the two modes do not share a high-water mark). Rounds alternate padded and packed so
noise on a shared machine hits both alike; times are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_batch(n: int, max_response: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(32, 129, (n,), generator=g)
    responses = torch.exp(torch.randn(n, generator=g) + torch.log(torch.tensor(max_response / 8)))
    responses = responses.round().clamp(4, max_response).long()
    lengths = prompts + responses
    s = int(lengths.max())
    ids = torch.randint(3, vocab, (n, s), generator=g)
    pos = torch.arange(s)[None]
    resp = ((pos >= prompts[:, None]) & (pos < lengths[:, None])).float()
    ids = ids * (pos < lengths[:, None])
    adv = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0) * resp
    return {"input_ids": ids, "seq_lengths": lengths, "response_mask": resp, "advantages": adv.contiguous()}


def _build(hidden, layers, vocab, micro_batch, max_tokens):
    from dapo_megatron.config import OptimizerConfig
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.launch import init_single_process
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.optim import build_optimizer, wrap_ddp
    from dapo_megatron.policy.train_step import PolicyTrainer
    from tests.helpers.tiny_models import make_tiny_hf_model

    init_single_process()
    initialize_parallel(ParallelLayout())
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    with tempfile.TemporaryDirectory(prefix="packing_bench_") as tmp:
        make_tiny_hf_model("llama", tmp, num_layers=layers, vocab_size=vocab, hidden_size=hidden)
        loaded = build_model_from_hf(tmp, ParallelLayout(), dtype=dtype)
    _, use_dist = wrap_ddp(loaded)
    optimizer, scheduler = build_optimizer(
        loaded, OptimizerConfig(lr=1e-6, lr_warmup_steps=0, clip_grad=1.0), total_steps=10_000,
        use_distributed_optimizer=use_dist,
    )
    trainers = {
        mode: PolicyTrainer(loaded, optimizer, scheduler, LossSettings(), micro_batch_size=micro_batch,
                            max_tokens_per_micro_batch=tokens)
        for mode, tokens in (("padded", None), ("packed", max_tokens))
    }
    return loaded, trainers


def computed_tokens(trainer, batch) -> int:
    """Tokens the model runs on (padding included) in one pass over ``batch``."""
    mbs = trainer._micro_batches(batch, range(batch["input_ids"].shape[0]), trainer.micro_batch_size)
    return sum(int(mb["input_ids"].numel()) for mb in mbs), len(mbs)


def peak_memory_child(args, mode: str) -> float:
    """Peak memory growth (MiB) of one update in a fresh process."""
    opts = ("hidden", "layers", "vocab", "batch", "max_response", "micro_batch", "max_tokens", "threads")
    cmd = [sys.executable, __file__, "--memory-child", mode]
    for k in opts:
        if getattr(args, k) is not None:
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    # a fresh rendezvous: the parent's MASTER_PORT is taken by its own process group
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def run(args) -> dict:
    batch = make_batch(args.batch, args.max_response, args.vocab)
    max_tokens = args.max_tokens or args.micro_batch * int(batch["seq_lengths"].max())
    loaded, trainers = _build(args.hidden, args.layers, args.vocab, args.micro_batch, max_tokens)
    batch["old_log_probs"] = trainers["padded"].compute_log_probs(batch)
    real = int(batch["seq_lengths"].sum())
    times = {f"{m}/{k}": [] for m in trainers for k in ("update", "log_probs")}
    for rnd in range(args.warmup + args.repeats):
        for mode, trainer in trainers.items():
            for kind, fn in (("update", lambda t=trainer: t.update(dict(batch), mini_batch_size=args.batch)),
                             ("log_probs", lambda t=trainer: t.compute_log_probs(batch))):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if rnd >= args.warmup:
                    times[f"{mode}/{kind}"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "config": {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "batch", "max_response", "micro_batch")},
        "max_tokens_per_micro_batch": max_tokens,
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "real_tokens": real,
        "lengths": {"min": int(batch["seq_lengths"].min()), "median": int(batch["seq_lengths"].median()),
                    "max": int(batch["seq_lengths"].max())},
        "median_s": med,
    }
    for mode, trainer in trainers.items():
        tokens, count = computed_tokens(trainer, batch)
        report[mode] = {
            "micro_batches": count,
            "computed_tokens": tokens,
            "update_tokens_per_s": real / med[f"{mode}/update"],
            "log_probs_tokens_per_s": real / med[f"{mode}/log_probs"],
        }
    if torch.cuda.is_available():
        for mode, trainer in trainers.items():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            trainer.update(dict(batch), mini_batch_size=args.batch)
            report[mode]["peak_memory_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for mode in trainers:
            report[mode]["peak_memory_mib"] = peak_memory_child(args, mode)
    report["update_speedup"] = med["padded/update"] / med["packed/update"]
    report["log_probs_speedup"] = med["padded/log_probs"] / med["packed/log_probs"]
    report["peak_memory_ratio"] = report["packed"]["peak_memory_mib"] / report["padded"]["peak_memory_mib"]
    return report


def memory_child(args, mode: str) -> None:
    batch = make_batch(args.batch, args.max_response, args.vocab)
    max_tokens = args.max_tokens or args.micro_batch * int(batch["seq_lengths"].max())
    _, trainers = _build(args.hidden, args.layers, args.vocab, args.micro_batch, max_tokens)
    trainer = trainers[mode]
    batch["old_log_probs"] = torch.zeros(batch["input_ids"].shape)
    before = _rss_mib()
    trainer.update(dict(batch), mini_batch_size=args.batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(peak - before)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def print_report(r: dict) -> None:
    c = r["config"]
    print(
        f"llama hidden {c['hidden']}, {c['layers']} layers, vocab {c['vocab']}; {c['batch']} sequences, "
        f"lengths {r['lengths']['min']}..{r['lengths']['max']} (median {r['lengths']['median']}), "
        f"{r['real_tokens']} real tokens; {r['device']}"
    )
    print(f"{'mode':<8}{'micro-batches':>14}{'computed tok':>14}{'update tok/s':>14}{'logp tok/s':>12}{'peak MiB':>10}")
    for mode in ("padded", "packed"):
        m = r[mode]
        print(f"{mode:<8}{m['micro_batches']:>14}{m['computed_tokens']:>14}{m['update_tokens_per_s']:>14.0f}"
              f"{m['log_probs_tokens_per_s']:>12.0f}{m['peak_memory_mib']:>10.0f}")
    print(f"packed / padded: update {r['update_speedup']:.2f}x tokens/s, old log-probs "
          f"{r['log_probs_speedup']:.2f}x, peak memory {r['peak_memory_ratio']:.2f}x "
          f"(budget {r['max_tokens_per_micro_batch']} tokens)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-response", type=int, default=896)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args, args.memory_child)
        return
    report = run(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
