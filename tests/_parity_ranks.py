"""Rank functions for the layout-parity tests (module level so spawned ranks can import them)."""

import torch

from dapo_megatron.verify import gather_vocab_parallel_logits


def logits_by_layout(rank, world_size, hf_dirs, tp, pp, sp, input_ids, seqs_per_microbatch, ep=1):
    """Forward ``input_ids`` on every model in ``hf_dirs`` at (tp, pp, sp, ep); DP = world / (tp*pp).

    Returns, from ranks on the last stage with TP rank 0, {arch: {sequence index: logits [s, V]}}.
    """
    from megatron.core import parallel_state as ps

    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.schedule import run_microbatches

    layout = ParallelLayout(tp=tp, pp=pp, sp=sp, ep=ep)
    initialize_parallel(layout)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(input_ids.shape[0]))[dp_rank::dp]
    out = {}
    for arch_name, hf_dir in hf_dirs.items():
        loaded = build_model_from_hf(hf_dir, layout)
        loaded.model.eval()
        vocab = loaded.arch.vocab_size
        mbs = [
            {
                "input_ids": input_ids[mine[i : i + seqs_per_microbatch]],
                "index": torch.tensor(mine[i : i + seqs_per_microbatch]),
            }
            for i in range(0, len(mine), seqs_per_microbatch)
        ]
        seq = input_ids.shape[1]

        def collect(mb, logits, seq=seq, vocab=vocab):
            full = gather_vocab_parallel_logits(logits)[:, :seq, :vocab]
            return {int(i): full[j] for j, i in enumerate(mb["index"])}

        with torch.no_grad():
            results = run_microbatches(
                loaded.model, mbs, collect, forward_only=True, sequence_parallel_multiple=tp if sp else 1
            )
        merged = {}
        for r in results:
            merged.update(r)
        out[arch_name] = merged
    keep = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    return out if keep else None


def load_error(rank, world_size, hf_dir):
    """Build and load ``hf_dir`` at TP1; return the error message (or None)."""
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    try:
        build_model_from_hf(hf_dir, ParallelLayout())
    except (ValueError, KeyError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def export_roundtrip(rank, world_size, hf_dirs, tp, pp):
    """Load each HF dir at (tp, pp) and export it back to HF tensors; rank 0 returns them."""

    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout

    layout = ParallelLayout(tp=tp, pp=pp)
    initialize_parallel(layout)
    out = {}
    for arch_name, hf_dir in hf_dirs.items():
        loaded = build_model_from_hf(hf_dir, layout)
        # small buckets: exercise bucket boundaries
        out[arch_name] = loaded.hf_state_dict(bucket_bytes=64 * 1024)
    return out if rank == 0 else sorted(out["llama"])
