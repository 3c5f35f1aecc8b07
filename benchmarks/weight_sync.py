"""Weight-sync benchmark: export-iterator time vs an in-memory copy, and each engine's update time.

For a random model of a few hundred MB built from a transformers config, prints:

- ``copy``: one in-memory copy of the same bytes into preallocated tensors (the floor);
- ``export``: the export iterator's time (fully consumed) and its ratio to ``copy`` (target <= 2x);
- per engine: ``update_weights`` time fed from precomputed tensors, and fed from the export iterator.

The export iterator is pluggable: ``--export module:function`` names an *export provider*, a
callable ``provider(hf_model) -> export`` that does its one-off set-up (e.g. build a sharded
Megatron model holding ``hf_model``'s weights) and returns ``export``, a zero-argument callable
giving an iterable of ``(hf_name, full_tensor)``. The default provider only walks the HF
``state_dict`` (a stand-in with no conversion work, so its ratio is near 0).

    python benchmarks/weight_sync.py --engines hf,vllm
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


def load_provider(spec: str | None) -> ExportProvider:
    """``"module:function"`` -> the export provider it names; ``None`` -> :func:`hf_state_dict_export`."""
    if spec is None:
        return hf_state_dict_export
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
    provider: ExportProvider = hf_state_dict_export,
    repeats: int = 3,
) -> dict:
    """Build the model, time copy / export / each engine's ``update_weights``; return the numbers."""
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
        "copy_s": time_copy([t for _, t in named], repeats),
    }
    export = provider(model)
    report["export_s"], report["export_bytes"] = time_export(export, repeats)
    report["export_ratio"] = min(report["export_s"]) / min(report["copy_s"])
    report["engines"] = {}
    with tempfile.TemporaryDirectory(prefix="weight_sync_") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
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
    copy = min(report["copy_s"])
    print(f"model: {report['params'] / 1e6:.1f}M params, {report['bytes'] / 2**20:.0f} MiB fp32")
    print(f"in-memory copy       : {copy:8.3f} s  ({gb / copy:5.2f} GiB/s)   best of {len(report['copy_s'])}")
    export = min(report["export_s"])
    print(f"export iterator      : {export:8.3f} s  = {report['export_ratio']:.2f}x copy (target <= 2x)")
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=DEFAULT_CONFIG["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=DEFAULT_CONFIG["hidden_size"])
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    engines = tuple(e for e in args.engines.split(",") if e)
    overrides = {"num_hidden_layers": args.layers, "hidden_size": args.hidden}
    report = run_benchmark(overrides, engines, load_provider(args.export), args.repeats)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
