"""Rollout data plane and weight sync at 2 and 4 ranks: the old path against the new, side by side.

Data plane, for the *same* batch of ``--sequences`` rows (random lengths, seeded):

- ``old``: one engine on rank 0 holds every row; rank 0 pads the global batch and sends it to every
  rank with ``broadcast_object_list`` (pickled), as the trainer did before issue 14;
- ``new``: one engine per data-parallel replica (TP1: every rank), each holding its share of the
  rows; :func:`dapo_megatron.trainer.rollout.deliver_rows` sends each row, as tensors, to the
  replica that trains it.

Reported per world size: the most bytes any rank received, the median seconds per step, and the
ratios new / old.

Weight sync, for a tiny Llama (``--hidden``, ``--layers``) at TP1: one replica (1 rank, one HF
engine) vs two replicas (2 ranks, one engine each, exporting at the same time); the median seconds
of export + ``update_weights`` (slowest rank). A ratio near 1 means the replicas do not wait for
each other (no cross-replica traffic); exporting them one after the other would be 2x.

    python benchmarks/rollout_scaling.py
    python benchmarks/rollout_scaling.py --sequences 1024 --max-len 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rows(num: int, max_len: int, seed: int):
    from dapo_megatron.trainer.rollout import Row

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        p = int(torch.randint(8, 64, (1,), generator=g))
        r = int(torch.randint(1, max_len, (1,), generator=g))
        out.append(
            Row(
                prompt_ids=torch.randint(0, 32000, (p,), generator=g).tolist(),
                response_ids=torch.randint(0, 32000, (r,), generator=g).tolist(),
                rollout_log_probs=(-torch.rand(r, generator=g)).tolist(),
                advantage=float(torch.randn(1, generator=g)),
                in_loss=True,
            )
        )
    return out


def _old_batch(rows):
    """The pre-issue-14 global batch: right-padded dict of tensors over every row."""
    n, width = len(rows), max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask, adv, lp = torch.zeros(n, width), torch.zeros(n, width), torch.zeros(n, width)
    for i, r in enumerate(rows):
        p, q = len(r.prompt_ids), len(r.response_ids)
        ids[i, : p + q] = torch.tensor(r.prompt_ids + r.response_ids)
        mask[i, p : p + q] = 1.0
        adv[i, p : p + q] = r.advantage
        lp[i, p : p + q] = torch.tensor(r.rollout_log_probs)
    return {
        "input_ids": ids,
        "seq_lengths": torch.tensor([len(r.prompt_ids) + len(r.response_ids) for r in rows]),
        "response_mask": mask,
        "advantages": adv,
        "rollout_log_probs": lp,
    }


def data_plane_rank(rank, world_size, sequences, max_len, n, repeats):
    import torch.distributed as dist

    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import EnginePlacement, ParallelLayout
    from dapo_megatron.trainer.rollout import deliver_rows

    groups = initialize_parallel(ParallelLayout(tp=1))
    placement = EnginePlacement(world_size, 1)
    rows = _rows(sequences, max_len, seed=0)
    groups_total = sequences // n
    times = {"old": [], "new": []}
    received = {"old": 0, "new": 0}
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        box = [_old_batch(rows) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        times["old"].append(time.perf_counter() - t0)
        received["old"] = len(pickle.dumps(box[0])) if rank != 0 else 0

        # New: engine e holds the contiguous share e of the groups (one round).
        share = [groups_total // world_size + (e < groups_total % world_size) for e in range(world_size)]
        start = sum(share[:rank]) * n
        mine = rows[start : start + share[rank] * n]
        dist.barrier()
        t0 = time.perf_counter()
        _, stats = deliver_rows(
            mine, [share], n=n, mini_batch_size=sequences, placement=placement, groups=groups
        )
        times["new"].append(time.perf_counter() - t0)
        received["new"] = stats["rollout/batch_bytes_per_rank"]
    most = torch.tensor([float(received["old"])], dtype=torch.float64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return {
        "old_bytes": float(most),
        "new_bytes": received["new"],
        "old_s": statistics.median(times["old"]),
        "new_s": statistics.median(times["new"]),
    }


def weight_sync_rank(rank, world_size, hf_dir, tp, repeats):
    import torch.distributed as dist

    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import EnginePlacement, ParallelLayout
    from dapo_megatron.rollout import create_engine

    layout = ParallelLayout(tp=tp)
    initialize_parallel(layout)
    loaded = build_model_from_hf(hf_dir, layout)
    placement = EnginePlacement(world_size, tp)
    engine = create_engine("hf", hf_dir) if placement.is_leader(rank) else None
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        tensors = loaded.hf_tensors()
        if engine is not None:
            engine.update_weights(tensors)
        else:
            for _ in tensors:
                pass
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        times.append(float(seconds))
    return statistics.median(times)


def main(argv=None) -> None:
    from dapo_megatron.parallel.launch import launch
    from tests.helpers.tiny_models import make_tiny_hf_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=512, help="rows in the step's batch")
    ap.add_argument("--max-len", type=int, default=512, help="longest response")
    ap.add_argument("--n", type=int, default=8, help="responses per prompt")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report = {"data_plane": {}, "weight_sync": {}}
    for w in [int(x) for x in args.worlds.split(",") if x]:
        res = launch(data_plane_rank, w, args.sequences, args.max_len, args.n, args.repeats, threads=1)[0]
        res["bytes_ratio"] = res["new_bytes"] / res["old_bytes"]
        res["time_ratio"] = res["new_s"] / res["old_s"]
        report["data_plane"][w] = res
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_hf_model("llama", tmp, hidden_size=args.hidden, num_layers=args.layers, vocab_size=8000)
        one = launch(weight_sync_rank, 1, tmp, 1, args.repeats, threads=1)[0]
        two = launch(weight_sync_rank, 2, tmp, 1, args.repeats, threads=1)[0]
    report["weight_sync"] = {"one_replica_s": one, "two_replicas_s": two, "ratio": two / one}

    if report["data_plane"]:
        print(f"data plane: {args.sequences} sequences, responses up to {args.max_len} tokens")
        print(f"{'ranks':>5} {'old MB/rank':>12} {'new MB/rank':>12} {'bytes new/old':>14} "
              f"{'old s':>8} {'new s':>8} {'time new/old':>13}")
    for w, r in report["data_plane"].items():
        print(f"{w:>5} {r['old_bytes'] / 1e6:>12.2f} {r['new_bytes'] / 1e6:>12.2f} {r['bytes_ratio']:>14.3f} "
              f"{r['old_s']:>8.3f} {r['new_s']:>8.3f} {r['time_ratio']:>13.3f}")
    ws = report["weight_sync"]
    print(f"weight sync (hidden {args.hidden}, {args.layers} layers, HF engines): 1 replica "
          f"{ws['one_replica_s']:.3f} s, 2 replicas in parallel {ws['two_replicas_s']:.3f} s "
          f"(ratio {ws['ratio']:.2f}; serial would be 2 x)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
