"""Weight-sync benchmark: export-iterator time vs an in-memory copy, and each engine's update time.

For a random model of a few hundred MB built from a transformers config, prints:

- ``copy``: one in-memory copy of the same bytes into preallocated tensors (the floor);
- ``export``: the export iterator's time (fully consumed) and its ratio to ``copy`` (target <= 2x);
- per engine: ``update_weights`` time fed from precomputed tensors, and fed from the export iterator.

The export iterator is pluggable: ``--export module:function`` names an *export provider*, a
callable ``provider(hf_model) -> export`` that does its one-off set-up (e.g. build a sharded
Megatron model holding ``hf_model``'s weights) and returns ``export``, a zero-argument callable
giving an iterable of ``(hf_name, full_tensor)``. The default provider, :func:`megatron_export`,
loads the model into Megatron-Core in this process (a gloo world of one, TP1 PP1) and returns
``dapo_megatron.conversion.megatron_to_hf.iter_hf_tensors`` over it: the real conversion work
(QKV and gated-MLP split, vocab un-padding). ``--export benchmarks.weight_sync:hf_state_dict_export``
walks the HF ``state_dict`` instead (no conversion work).

``--export-tp N`` (N > 1) additionally spawns N gloo ranks holding a TP-N Megatron model and times,
on rank 0, the iterator (all-gather of the shards + conversion) against a copy of the same bytes in
that process.

    python benchmarks/weight_sync.py --engines hf,vllm
    python benchmarks/weight_sync.py --engines '' --export-tp 2
    python benchmarks/weight_sync.py --export my_pkg.export:provider --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]
ExportProvider = Callable[[torch.nn.Module], Callable[[], NamedTensors]]

# ~99M parameters, ~400 MB in fp32; head_dim 64 (the vLLM CPU attention kernels need >= 32).
DEFAULT_CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def hf_state_dict_export(hf_model: torch.nn.Module) -> Callable[[], NamedTensors]:
    """Default export provider: the HF model's own ``state_dict`` (no conversion work)."""
    return lambda: iter(hf_model.state_dict().items())


def _init_single_process_megatron() -> None:
    """A world of one (gloo on CPU, with the CPU redirection) and Megatron's TP1 PP1 state."""
    from dapo_megatron.parallel.groups import init_single_process, initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout

    init_single_process()
    initialize_parallel(ParallelLayout(tp=1, pp=1))


def _build_megatron(hf_dir: str, tp: int):
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.layout import ParallelLayout

    return build_model_from_hf(hf_dir, ParallelLayout(tp=tp, pp=1))


def megatron_export(hf_model: torch.nn.Module) -> Callable[[], NamedTensors]:
    """Default export provider: ``iter_hf_tensors`` over a TP1 Megatron-Core model of ``hf_model``."""

    _init_single_process_megatron()
    with tempfile.TemporaryDirectory(prefix="weight_sync_megatron_") as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        loaded = _build_megatron(tmp, tp=1)
    return loaded.hf_tensors


def tp_export_rank(rank: int, world_size: int, hf_dir: str, repeats: int) -> dict | None:
    """On each of ``world_size`` ranks (TP = world size): time ``iter_hf_tensors`` and a copy of the
    same bytes; rank 0 returns ``{"copy_s", "export_s", "bytes"}``."""
    import torch.distributed as dist

    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(tp=world_size, pp=1))
    loaded = _build_megatron(hf_dir, tp=world_size)

    export = loaded.hf_tensors

    full = [t.clone() for _, t in export()]  # the same bytes, already full-size, for the copy floor
    dst = [torch.empty_like(t) for t in full]
    for d, t in zip(dst, full):  # touch the pages once, as time_copy's best-of does
        d.copy_(t)
    export_s, copy_s, nbytes = [], [], 0
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        dist.barrier()
        start = time.perf_counter()
        for d, t in zip(dst, full):
            d.copy_(t)
        copy_s.append(time.perf_counter() - start)
        dist.barrier()
        times, nbytes = time_export(export, 1)
        export_s += times
    return {"copy_s": copy_s, "export_s": export_s, "bytes": nbytes} if rank == 0 else None


def load_provider(spec: str | None) -> ExportProvider:
    """``"module:function"`` -> the export provider it names; ``None`` -> :func:`megatron_export`."""
    if spec is None:
        return megatron_export
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--export must look like 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def _best_of(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_copy(tensors: list[torch.Tensor], repeats: int) -> list[float]:
    """Seconds to copy every tensor into a preallocated tensor of the same shape."""
    dst = [torch.empty_like(t) for t in tensors]

    def copy() -> None:
        for d, t in zip(dst, tensors):
            d.copy_(t)

    return _best_of(copy, repeats)


def time_clone(tensors: list[torch.Tensor], repeats: int) -> list[float]:
    """Seconds to clone every tensor (fresh allocation + copy): the floor for any iterator that
    yields new tensors, since fresh pages of this size are faulted in on first write."""
    return _best_of(lambda: [t.clone() for t in tensors], repeats)


def time_export(export: Callable[[], NamedTensors], repeats: int) -> tuple[list[float], int]:
    """Seconds to consume the export iterator fully, and the bytes it yielded."""
    total = 0

    def consume() -> None:
        nonlocal total
        total = sum(t.numel() * t.element_size() for _, t in export())

    return _best_of(consume, repeats), total


def run_benchmark(
    config_overrides: dict | None = None,
    engines: tuple[str, ...] = ("hf", "vllm"),
    provider: ExportProvider = megatron_export,
    repeats: int = 5,
    export_tp: int = 1,
) -> dict:
    """Build the model, time copy / export / each engine's ``update_weights``; return the numbers.

    ``export_tp > 1`` also times the export on that many TP ranks (see :func:`tp_export_rank`).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dapo_megatron.rollout import create_engine

    config = LlamaConfig(**{**DEFAULT_CONFIG, **(config_overrides or {})})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    named = list(model.state_dict().items())
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    report: dict = {
        "params": sum(t.numel() for _, t in named),
        "bytes": nbytes,
    }
    export = provider(model)
    # One copy, clone and export per round, so the (shared, noisy) machine's load hits all alike;
    # ratios are medians of per-round ratios.
    tensors = [t for _, t in named]
    dst = [torch.empty_like(t) for t in tensors]
    for d, t in zip(dst, tensors):  # fault the destination pages in once
        d.copy_(t)
    report.update(copy_s=[], clone_s=[], export_s=[])
    for _ in range(repeats):
        report["copy_s"] += _best_of(lambda: [d.copy_(t) for d, t in zip(dst, tensors)], 1)
        report["clone_s"] += time_clone(tensors, 1)
        times, report["export_bytes"] = time_export(export, 1)
        report["export_s"] += times
    rounds = list(zip(report["export_s"], report["copy_s"], report["clone_s"]))
    report["export_ratio"] = statistics.median(e / c for e, c, _ in rounds)
    report["export_over_clone"] = statistics.median(e / k for e, _, k in rounds)
    report["engines"] = {}
    with tempfile.TemporaryDirectory(prefix="weight_sync_") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if export_tp > 1:
            from tests.helpers.distributed import run_on_ranks

            tp_report = run_on_ranks(tp_export_rank, export_tp, tmp, repeats, timeout=1800)[0]
            tp_report["tp"] = export_tp
            tp_report["export_ratio"] = statistics.median(
                e / c for e, c in zip(tp_report["export_s"], tp_report["copy_s"])
            )
            report["export_tp"] = tp_report
        for kind in engines:
            engine = create_engine(kind, tmp, dtype="float32", seed=0)
            try:
                direct = _best_of(lambda e=engine: e.update_weights(named), repeats)
                exported = _best_of(lambda e=engine: e.update_weights(export()), repeats)
            finally:
                engine.close()
            report["engines"][kind] = {"update_s": direct, "update_from_export_s": exported}
    return report


def print_report(report: dict) -> None:
    gb = report["bytes"] / 2**30
    copy = statistics.median(report["copy_s"])
    print(f"model: {report['params'] / 1e6:.1f}M params, {report['bytes'] / 2**20:.0f} MiB fp32")
    print(
        f"in-memory copy       : {copy:8.3f} s  ({gb / copy:5.2f} GiB/s)   median of {len(report['copy_s'])}"
    )
    clone = statistics.median(report["clone_s"])
    print(f"clone (alloc + copy) : {clone:8.3f} s  = {clone / copy:.2f}x copy")
    export = statistics.median(report["export_s"])
    print(
        f"export iterator      : {export:8.3f} s  = {report['export_ratio']:.2f}x copy (target <= 2x), "
        f"{report['export_over_clone']:.2f}x clone"
    )
    if "export_tp" in report:
        tp = report["export_tp"]
        print(
            f"export at TP{tp['tp']} (rank 0): {statistics.median(tp['export_s']):8.3f} s vs copy "
            f"{statistics.median(tp['copy_s']):.3f} s of {tp['bytes'] / 2**20:.0f} MiB in that process "
            f"= {tp['export_ratio']:.2f}x (median of {len(tp['export_s'])}, target <= 2x)"
        )
    for kind, numbers in report["engines"].items():
        direct, via_export = min(numbers["update_s"]), min(numbers["update_from_export_s"])
        print(
            f"{kind:>5} update_weights  : {direct:8.3f} s  = {direct / copy:6.2f}x copy; "
            f"from export {via_export:.3f} s  (median {statistics.median(numbers['update_s']):.3f} s)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated engine kinds ('' for none)")
    parser.add_argument("--export", default=None, help="export provider as module:function")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=DEFAULT_CONFIG["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=DEFAULT_CONFIG["hidden_size"])
    parser.add_argument(
        "--export-tp", type=int, default=1, help="also time the export on this many TP gloo ranks (> 1)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 default: on a shared 2-core machine, 2 OpenMP threads give 10x outliers)",
    )
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.export_tp < 1:
        parser.error("--export-tp must be >= 1")
    torch.set_num_threads(args.threads)
    engines = tuple(e for e in args.engines.split(",") if e)
    overrides = {"num_hidden_layers": args.layers, "hidden_size": args.hidden}
    report = run_benchmark(overrides, engines, load_provider(args.export), args.repeats, args.export_tp)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
