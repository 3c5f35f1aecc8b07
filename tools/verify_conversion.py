#!/usr/bin/env python
"""Check Megatron against transformers for one HF model at one layout.

    python tools/verify_conversion.py --hf-dir DIR [--tp N] [--pp M] [--ep E] [--sp] [--dp K] [--tol 1e-4]
    python tools/verify_conversion.py --hf-dir DIR --megatron-dir CKPT [--tp N] ...

Launches ``tp * pp * dp`` ranks itself, runs the same right-padded batch through transformers and
through Megatron-Core at that layout and prints the max |logit difference| over valid positions.
With ``--megatron-dir`` the model is loaded from that checkpoint (any layout it was written at)
and every HF tensor is also compared with the HF directory bit for bit. Exit status: 0 when
within tolerance (and all tensors equal), 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--megatron-dir", default=None, help="compare this Megatron checkpoint with --hf-dir")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE; carved out of TP x DP)")
    p.add_argument("--sp", action="store_true", help="sequence parallel (needs --tp > 1)")
    p.add_argument("--tol", type=float, default=1e-4, help="max |logit diff| allowed (fp32)")
    args = p.parse_args(argv)

    from dapo_megatron.conversion.cli import call_or_exit
    from dapo_megatron.verify import verify

    res = call_or_exit(
        verify,
        args.hf_dir,
        megatron_dir=args.megatron_dir,
        tp=args.tp,
        pp=args.pp,
        sp=args.sp,
        dp=args.dp,
        ep=args.ep,
        tolerance=args.tol,
    )
    print(f"{res.layout}: max |logit diff| = {res.max_abs_logit_diff:.3e} (tolerance {res.tolerance:.1e})")
    if res.tensors is not None:
        t = res.tensors
        print(
            f"tensors: {t['compared']} compared, {len(t['mismatched'])} differ, {len(t['missing'])} missing"
        )
    for problem in res.problems:
        print(f"FAIL: {problem}")
    print("OK" if res.ok else "FAILED")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
