#!/usr/bin/env python
"""Conversion throughput and memory on a generated >= 1 GiB model.

    python benchmarks/convert_throughput.py [--hidden 2048] [--layers 10] [--dtype bf16] [--tp 1 --pp 1]

Builds a random Llama (config from transformers, weights written straight to sharded safetensors
without instantiating the model), then times HF -> Megatron (``convert_hf_to_megatron``) and
Megatron -> HF (``convert_megatron_to_hf``) against ``shutil.copy`` of the same safetensors files,
and reports the peak RSS of the conversion processes (conversions run in spawned children; their
summed RSS is sampled) next to the largest tensor. Targets (issue 5): >= 0.5x copy throughput,
peak RSS <= largest tensor + 1 GiB.

Each direction is reported end to end (including the spawned process's start: Python, torch and
Megatron imports, process group - a fixed few seconds that dominates at 1 GiB) and for its data
phase alone (reading, transforming and writing the tensors, as timed inside the process), which is
what scales with model size. ``--materialize``: HF -> Megatron by building the model on TP x PP
ranks and ``dist_checkpointing.save`` (the reference path) instead of the streaming writer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

GiB = 2**30


def make_model(out: Path, hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """Random Llama weights, one safetensors file per layer group; returns (total, largest) bytes."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    cfg.save_pretrained(out)
    h, f, kv = hidden, cfg.intermediate_size, cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    files: list[dict] = [{"model.embed_tokens.weight": rnd(vocab, h)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        files.append(
            {
                p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "self_attn.q_proj.weight": rnd(h, h),
                p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h),
                p + "self_attn.o_proj.weight": rnd(h, h),
                p + "mlp.gate_proj.weight": rnd(f, h),
                p + "mlp.up_proj.weight": rnd(f, h),
                p + "mlp.down_proj.weight": rnd(h, f),
            }
        )
    files.append({"model.norm.weight": torch.ones(h, dtype=dtype), "lm_head.weight": rnd(vocab, h)})
    n = len(files)
    weight_map, total, largest = {}, 0, 0
    for i, tensors in enumerate(files):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.nbytes
            largest = max(largest, t.nbytes)
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total, largest


class PeakRSS:
    """Samples the summed RSS of this process's descendants (every 20 ms) while active."""

    def __enter__(self):
        import threading

        import psutil

        self.peak, self._stop = 0, threading.Event()
        me = psutil.Process()

        def sample():
            while not self._stop.is_set():
                total = 0
                for c in me.children(recursive=True):
                    try:
                        total += c.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                self._stop.wait(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--materialize", action="store_true", help="HF->Megatron via the build-and-save path")
    p.add_argument("--workdir", default=None, help="default: a temporary directory (removed)")
    args = p.parse_args()

    from dapo_megatron.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    try:
        hf = work / "hf"
        hf.mkdir(parents=True)
        total, largest = make_model(hf, args.hidden, args.layers, args.vocab, dtype)
        print(f"model: {total / GiB:.2f} GiB {args.dtype}, largest tensor {largest / 2**20:.0f} MiB")

        t0 = time.perf_counter()
        (work / "copy").mkdir()
        for f in sorted(hf.glob("*.safetensors")):
            shutil.copy(f, work / "copy" / f.name)
        copy_s = time.perf_counter() - t0

        with PeakRSS() as rss_to_mcore:
            t0 = time.perf_counter()
            st_mcore = convert_hf_to_megatron(
                hf,
                work / "mcore",
                tp=args.tp,
                pp=args.pp,
                dtype=args.dtype,
                hash_sources=False,
                materialize=args.materialize,
            )
            to_mcore_s = time.perf_counter() - t0
        with PeakRSS() as rss_to_hf:
            t0 = time.perf_counter()
            st_hf = convert_megatron_to_hf(work / "mcore", work / "hf_out", progress=False)
            to_hf_s = time.perf_counter() - t0

        def line(name, secs, rss):
            ratio = copy_s / secs
            print(
                f"{name:16s} {secs:7.1f} s  {total / secs / 2**20:7.1f} MiB/s  {ratio:5.2f}x copy  "
                f"peak RSS {rss / GiB:5.2f} GiB (target <= {(largest + GiB) / GiB:.2f} GiB, ratio target >= 0.5x)"
            )

        print(f"{'plain copy':16s} {copy_s:7.1f} s  {total / copy_s / 2**20:7.1f} MiB/s")
        line("HF->Megatron", to_mcore_s, rss_to_mcore.peak)
        line("Megatron->HF", to_hf_s, rss_to_hf.peak)
        for name, secs in [
            ("HF->Megatron", st_mcore.get("load_s", 0.0) + st_mcore["save_s"]),
            ("Megatron->HF", st_hf["seconds"]),
        ]:
            print(
                f"{name + ' data':16s} {secs:7.1f} s  {total / secs / 2**20:7.1f} MiB/s  {copy_s / secs:5.2f}x copy"
                "  (data phase only, without the process start)"
            )
        print("(peak RSS: sum over all child processes of the conversion, sampled every 20 ms)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
