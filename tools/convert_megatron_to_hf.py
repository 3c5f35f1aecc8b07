#!/usr/bin/env python
"""Export a Megatron-Core model checkpoint (converted, or a trainer checkpoint with ``model/``
and optimizer state, which is ignored) to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --megatron-dir DIR --output OUT [--dtype bf16] [--max-shard-size 5GB]

Writes config.json, model-0000i-of-0000n.safetensors + model.safetensors.index.json and the
tokenizer files saved at conversion time. Runs in one process, one transformer layer at a time.
Exit status 0 on success, 2 on bad input; nothing is left at OUT on failure.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--megatron-dir", required=True, help="model checkpoint, or trainer checkpoint with model/"
    )
    p.add_argument("--output", required=True, help="HF directory to create (must not exist)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: the checkpoint's"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from dapo_megatron.conversion.cli import call_or_exit
    from dapo_megatron.conversion.convert import convert_megatron_to_hf
    from dapo_megatron.conversion.hf_writer import parse_size

    t0 = time.perf_counter()
    stats = call_or_exit(
        convert_megatron_to_hf,
        args.megatron_dir,
        args.output,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        progress=not args.no_progress,
        in_process=True,
    )
    print(
        f"wrote {args.output} ({len(stats['files'])} file(s), {stats['bytes']} bytes) in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
