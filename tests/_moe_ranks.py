"""Rank functions for the Qwen3-MoE tests (module level so spawned ranks can import them)."""

from tests._parity_ranks import logits_by_layout


def logits_and_export(rank, world_size, hf_dirs, tp, pp, ep, input_ids, seqs_per_microbatch):
    """Per layout, in one launch: logits (see ``logits_by_layout``) and, from every rank, the HF
    tensors exported back out of the sharded model (``hf_state_dict``, small buckets)."""
    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.layout import ParallelLayout

    logits = logits_by_layout(rank, world_size, hf_dirs, tp, pp, False, input_ids, seqs_per_microbatch, ep)
    exported = {}
    for arch, hf_dir in hf_dirs.items():
        loaded = build_model_from_hf(hf_dir, ParallelLayout(tp=tp, pp=pp, ep=ep))
        exported[arch] = loaded.hf_state_dict(bucket_bytes=16 * 1024)
    return {"logits": logits, "exported": exported}




def export_moe(rank, world_size, hf_dir, ep, export_path):
    """Load ``hf_dir`` at EP``ep`` and stream its HF tensors out (small buckets); rank 0 saves them."""
    from safetensors.torch import save_file

    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout

    layout = ParallelLayout(ep=ep)
    initialize_parallel(layout)
    loaded = build_model_from_hf(hf_dir, layout)
    tensors = {name: t.clone().contiguous() for name, t in loaded.hf_tensors(bucket_bytes=16 * 1024)}
    if rank == 0:
        save_file(tensors, export_path)
    return list(tensors)


def replay_logprobs(rank, world_size, hf_dir, ep, batch, perturb_std):
    """Old log-probs at EP``ep`` of ``batch`` with the router routing afresh and with the batch's
    ``routed_experts`` replayed; first with the loaded weights, then with every router weight
    perturbed by N(0, perturb_std) (the same on all ranks). Also returns the experts each router
    actually chose (from its routing map), per sequence: ``[s, L, k]``.
    """
    import torch
    from megatron.core import parallel_state as ps

    from dapo_megatron.loading import build_model_from_hf
    from dapo_megatron.models import MoESettings
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.loss import LossSettings
    from dapo_megatron.policy.routing_replay import moe_routers
    from dapo_megatron.policy.train_step import PolicyTrainer

    layout = ParallelLayout(ep=ep)
    initialize_parallel(layout)
    loaded = build_model_from_hf(hf_dir, layout, moe=MoESettings(routing_replay=True))
    trainer = PolicyTrainer(loaded, None, None, LossSettings(), micro_batch_size=1)
    routers = moe_routers(loaded.model)
    k = loaded.arch.moe_router_topk
    chosen: list[list[torch.Tensor]] = []  # per forward (one sequence each): per layer [s, k]

    def hook(module, inputs, output):
        routing_map = output[1]  # [s * b, E] bool, b = 1
        ids = routing_map.nonzero()[:, 1].view(-1, k)
        if module is routers[0]:
            chosen.append([])
        chosen[-1].append(ids)

    for r in routers:
        r.register_forward_hook(hook)
    mine = list(range(batch["input_ids"].shape[0]))  # the trainer works on the rows it is given
    free = {key: batch[key] for key in ("input_ids", "seq_lengths")}
    out = {}
    for phase in ("exact", "perturbed"):
        if phase == "perturbed":
            g = torch.Generator().manual_seed(1234)
            with torch.no_grad():
                for r in routers:
                    r.weight.add_(torch.randn(r.weight.shape, generator=g) * perturb_std)
        for mode, data in (("none", free), ("rollout", batch)):
            chosen.clear()
            logp = trainer.compute_log_probs(data)
            out[(phase, mode)] = {
                "logp": {i: logp[i] for i in mine},
                "chosen": {i: torch.stack(layers, dim=1) for i, layers in zip(mine, chosen)},
            }
    return out if ps.get_tensor_model_parallel_rank() == 0 else None
