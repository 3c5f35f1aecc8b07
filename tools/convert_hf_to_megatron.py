#!/usr/bin/env python
"""Convert a Hugging Face model directory to a Megatron-Core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --output OUT [--tp N] [--pp M] [--ep E] [--dtype bf16]

Streams the checkpoint in one spawned process, chunk by chunk, without building the model (memory
stays at about one parameter; a progress bar shows bytes/s). The checkpoint reshards on load, so
``--tp/--pp`` only choose the layout used to write it. ``--materialize`` instead launches
``tp * pp`` ranks that build the model and save it with ``dist_checkpointing.save`` (reference). Exit status 0 on success, 2 on bad input
(the message names the file or tensor); nothing is left at OUT on failure.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="checkpoint directory to create (must not exist)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size used to write")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used to write")
    p.add_argument(
        "--ep", type=int, default=1, help="expert-parallel size (MoE): checked, and used by --materialize"
    )
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="stored parameter dtype")
    p.add_argument(
        "--vocab-pad-multiple", type=int, default=128, help="pad the vocabulary to a multiple of this x TP"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--materialize",
        action="store_true",
        help="build the model on tp*pp ranks and save it (reference path)",
    )
    p.add_argument("--no-hash", action="store_true", help="skip sha256 of the source files in the metadata")
    args = p.parse_args(argv)

    from dapo_megatron.conversion.cli import call_or_exit
    from dapo_megatron.conversion.convert import convert_hf_to_megatron

    t0 = time.perf_counter()
    stats = call_or_exit(
        convert_hf_to_megatron,
        args.hf_dir,
        args.output,
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        dtype=args.dtype,
        vocab_pad_multiple=args.vocab_pad_multiple,
        hash_sources=not args.no_hash,
        materialize=args.materialize,
        progress=not args.no_progress,
    )
    print(
        f"wrote {args.output} (TP{args.tp}xPP{args.pp}xEP{args.ep}, {args.dtype}) in {time.perf_counter() - t0:.1f} s: {stats}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
