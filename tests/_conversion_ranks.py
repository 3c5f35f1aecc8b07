"""Rank functions for tests/test_conversion_tools.py (module level so spawned ranks import them)."""

import torch


def _logits(loaded, input_ids):
    from megatron.core import parallel_state as ps

    from dapo_megatron.policy.schedule import run_microbatches
    from dapo_megatron.verify import gather_vocab_parallel_logits

    seq, vocab = input_ids.shape[1], loaded.arch.vocab_size
    mbs = [{"input_ids": input_ids[i : i + 1], "index": torch.tensor([i])} for i in range(input_ids.shape[0])]

    def collect(mb, logits):
        return {int(mb["index"][0]): gather_vocab_parallel_logits(logits)[0, :seq, :vocab]}

    loaded.model.eval()
    with torch.no_grad():
        results = run_microbatches(loaded.model, mbs, collect, forward_only=True)
    if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        return None
    merged = {}
    for r in results:
        merged.update(r)
    return torch.stack([merged[i] for i in range(input_ids.shape[0])])


def logits_from_checkpoints(rank, world_size, ckpts, tp, pp, input_ids, save_dirs=None):
    """Build every checkpoint in ``ckpts`` ({name: dir}) at (tp, pp) and return its logits (from the
    rank holding them). ``save_dirs`` ({name: dir}): also re-save the loaded model there with
    ``save_model_checkpoint`` (the trainer's API)."""
    from dapo_megatron.conversion.checkpoint import save_model_checkpoint
    from dapo_megatron.loading import build_model_from_checkpoint
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout

    layout = ParallelLayout(tp=tp, pp=pp)
    initialize_parallel(layout)
    out = {}
    for name, ckpt in ckpts.items():
        loaded = build_model_from_checkpoint(ckpt, layout)
        logits = _logits(loaded, input_ids)
        if logits is not None:
            out[name] = logits
        if save_dirs and name in save_dirs:
            from dapo_megatron.conversion.checkpoint import validate_checkpoint

            _, meta = validate_checkpoint(ckpt)
            meta.source = "trainer test"
            meta.hf_files = []
            save_model_checkpoint(loaded.model, save_dirs[name], meta)
    return out


def export_and_logits(rank, world_size, jobs, max_shard_bytes, input_ids):
    """One process: export each (ckpt, out) to HF in-process; then TP1 logits of each checkpoint."""
    from dapo_megatron.conversion.convert import convert_megatron_to_hf

    for ckpt, out in jobs:
        convert_megatron_to_hf(ckpt, out, max_shard_bytes=max_shard_bytes, progress=False, in_process=True)
    return logits_from_checkpoints(rank, world_size, {c: c for c, _ in jobs}, 1, 1, input_ids)
