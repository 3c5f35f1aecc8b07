"""Rank function for the weight-sync acceptance test: export a sharded Megatron model, score sequences."""

from __future__ import annotations


def export_and_score(
    rank: int,
    world_size: int,
    hf_dir: str,
    tp: int,
    pp: int,
    export_path: str | None,
    sequences: list[tuple[list[int], list[int]]] | None,
):
    """Load ``hf_dir`` into Megatron at (tp, pp); export it and/or score ``sequences``.

    * ``export_path``: stream the weights with ``iter_hf_tensors`` (every rank consumes the
      iterator, as a trainer would); rank 0 saves them to this safetensors file.
    * ``sequences``: ``(prompt, response)`` token lists; teacher-forced log-probs of each
      response token under the Megatron model (``PolicyTrainer.compute_log_probs``).

    Returns ``{"names": [...], "logprobs": {i: [float, ...]} or None}``: ``names`` are the HF names
    this rank's iterator yielded (all ranks must agree); ``logprobs`` comes from the rank that
    holds the last pipeline stage's TP rank 0, ``None`` elsewhere.
    """
    import torch
    from safetensors.torch import save_file

    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.train_step import PolicyTrainer

    layout = ParallelLayout(tp=tp, pp=pp)
    initialize_parallel(layout)
    loaded = build_model_from_hf(hf_dir, layout)
    out: dict = {"names": None, "logprobs": None}

    if export_path is not None:
        tensors = {}
        # Small bucket: several PP broadcasts, as with a real model.
        for name, t in loaded.hf_tensors(bucket_bytes=256 * 1024):
            tensors[name] = t.clone().contiguous() if rank == 0 else None
        out["names"] = list(tensors)
        if rank == 0:
            save_file(tensors, export_path)

    if sequences:
        n = len(sequences)
        lengths = torch.tensor([len(p) + len(r) for p, r in sequences])
        input_ids = torch.zeros(n, int(lengths.max()), dtype=torch.long)
        for i, (p, r) in enumerate(sequences):
            input_ids[i, : lengths[i]] = torch.tensor(list(p) + list(r))
        trainer = PolicyTrainer(loaded, None, None, LossSettings(), micro_batch_size=2)
        logp = trainer.compute_log_probs({"input_ids": input_ids, "seq_lengths": lengths})
        if trainer.reports_metrics:
            out["logprobs"] = {
                i: logp[i, len(p) : len(p) + len(r)].tolist() for i, (p, r) in enumerate(sequences)
            }
    return out
