"""Rank functions for the Qwen3-MoE tests (module level so spawned ranks can import them)."""

from tests._parity_ranks import logits_by_layout


def logits_and_export(rank, world_size, hf_dirs, tp, pp, ep, input_ids, seqs_per_microbatch):
    """Per layout, in one launch: logits (see ``logits_by_layout``) and, from every rank, the HF
    tensors exported back out of the sharded model (``hf_state_dict``, small buckets)."""
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.models import ParallelLayout

    logits = logits_by_layout(rank, world_size, hf_dirs, tp, pp, False, input_ids, seqs_per_microbatch, ep)
    exported = {}
    for arch, hf_dir in hf_dirs.items():
        loaded = build_model_from_hf(hf_dir, ParallelLayout(tp=tp, pp=pp, ep=ep))
        exported[arch] = loaded.hf_state_dict(bucket_bytes=16 * 1024)
    return {"logits": logits, "exported": exported}


