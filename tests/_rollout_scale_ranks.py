"""Rank functions and the single-engine reference for tests/test_rollout_scale.py."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "demo_cpu.yaml"
SEED_STRIDE = 1_000_003  # the documented per-round seed spacing of the trainer (one engine's seeds)


def demo_config(demo_root, *overrides):
    from dapo_megatron.config import load_config

    return load_config(
        CONFIG,
        [
            f"model.hf_dir={Path(demo_root) / 'model'}",
            f"data.train_files=[{Path(demo_root) / 'data' / 'train.jsonl'}]",
            f"data.val_files=[{Path(demo_root) / 'data' / 'val.jsonl'}]",
            "reward.num_workers=1",
            "trainer.train_batch_size=4",
            "trainer.gen_batch_size=8",
            "trainer.ppo_mini_batch_size=2",
            "rollout.val_n=2",
            *overrides,
        ],
    )


class RecordingEngine:
    """Wraps an engine; records the prompts of every generate call (and can fail, like a dead engine)."""

    def __init__(self, engine, fail: bool = False):
        self.engine, self.fail, self.prompts = engine, fail, []

    def generate(self, prompts, n, sampling):
        if self.fail:
            raise ConnectionResetError("engine core process died (simulated)")
        self.prompts.append([list(p) for p in prompts])
        return self.engine.generate(prompts, n, sampling)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def sharded_collect(rank, world_size, demo_root, tp, overrides, steps=1, failing_rank=None):
    """``steps`` collections with the trainer's RolloutCollector at TP ``tp`` (DP = world / tp).

    Returns per rank: dp rank, the local batch tensors and metrics of each step, and the prompts
    this rank's engine generated (``None`` off leaders)."""
    import torch.distributed as dist

    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import EnginePlacement, ParallelLayout
    from dapo_megatron.trainer.rollout import build_collector

    cfg = demo_config(demo_root, f"parallel.tensor_model_parallel_size={tp}", *overrides)
    groups = initialize_parallel(ParallelLayout(tp=tp), seed=cfg.trainer.seed)
    placement = EnginePlacement(dist.get_world_size(), cfg.rollout_tensor_parallel_size)
    collector, _ = build_collector(cfg, placement, groups)
    if collector.engine is not None:
        collector.engine = RecordingEngine(collector.engine, fail=rank == failing_rank)
    out = {"dp_rank": groups.dp_rank, "steps": [], "prompts": None}
    try:
        for _ in range(steps):
            batch, metrics = collector.collect()
            out["steps"].append({"batch": batch.tensors(), "metrics": metrics})
    finally:
        if collector.engine is not None:
            out["prompts"] = collector.engine.prompts
            collector.reward_pool.close()
            collector.engine.close()
    return out


def collect_with_failing_engine(rank, world_size, demo_root, failing_rank):
    """:func:`sharded_collect` (DP2) with the engine of ``failing_rank`` raising; returns this
    rank's ``EngineError`` message (every rank must raise one)."""
    from dapo_megatron.trainer.rollout import EngineError

    try:
        sharded_collect(rank, world_size, demo_root, 1, [], 1, failing_rank)
    except EngineError as err:
        return str(err)
    return None


def reference_batches(demo_root, steps, *overrides):
    """The single-engine path, written independently of the trainer: one HF engine generates
    every prompt of a round, :class:`~dapo_megatron.algo.DynamicSampler` keeps groups, and the
    global batch is padded. Returns per step (global batch dict, prompts generated per round)."""
    from transformers import AutoTokenizer

    from dapo_megatron.algo import DynamicSampler, group_advantages, overlong_mask, overlong_penalty
    from dapo_megatron.data.prompts import dataset_from_config
    from dapo_megatron.data.sampler import EpochSampler
    from dapo_megatron.rewards.pool import RewardPool
    from dapo_megatron.rollout import SamplingConfig, create_engine

    cfg = demo_config(demo_root, *overrides)
    r, algo, t = cfg.rollout, cfg.algorithm, cfg.trainer
    tok = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    data = dataset_from_config(cfg.data, tok, "train")
    sampler = EpochSampler(len(data), t.gen_batch_size, shuffle=cfg.data.shuffle, seed=cfg.data.seed)
    engine = create_engine("hf", cfg.model.hf_dir, dtype="float32", seed=t.seed)
    pool = RewardPool.from_config(cfg.reward)
    out, rnd = [], 0
    try:
        for _ in range(steps):
            ds = DynamicSampler(
                t.train_batch_size, max_num_gen_batches=algo.max_num_gen_batches, metric=algo.filter_metric
            )
            rounds = []
            while True:
                prompts = data.batch(sampler.next_batch(t.gen_batch_size))
                seed = t.seed * SEED_STRIDE + rnd * (r.n * len(prompts) + 1)
                rnd += 1
                rounds.append([list(p.input_ids) for p in prompts])
                sampling = SamplingConfig(
                    temperature=r.temperature,
                    top_p=r.top_p,
                    top_k=r.top_k,
                    max_new_tokens=r.max_response_length,
                    seed=seed,
                )
                groups = engine.generate([p.input_ids for p in prompts], r.n, sampling)
                flat = [(i, x) for i, g in enumerate(groups) for x in g]
                texts = tok.batch_decode([x.token_ids for _, x in flat], skip_special_tokens=True)
                res, _ = pool.compute(texts, [prompts[i].ground_truth for i, _ in flat])
                lengths = torch.tensor([len(x.token_ids) for _, x in flat], dtype=torch.float32)
                pen = overlong_penalty(
                    lengths,
                    max_len=r.max_response_length,
                    buffer_len=algo.overlong_buffer_len,
                    penalty_factor=algo.overlong_buffer_penalty_factor,
                )
                samples = [
                    {
                        "uid": f"{rnd}:{i}",
                        "p": list(prompts[i].input_ids),
                        "r": list(x.token_ids),
                        "lp": list(x.logprobs),
                        "trunc": x.finish_reason == "length",
                        "acc": float(bool(q["acc"])),
                        "reward": float(q["score"]) + float(pen[k]),
                    }
                    for k, ((i, x), q) in enumerate(zip(flat, res))
                ]
                if ds.add(samples):
                    break
            kept, _ = ds.take()
            n, width = len(kept), max(len(s["p"]) + len(s["r"]) for s in kept)
            ids = torch.full((n, width), tok.pad_token_id or 0, dtype=torch.long)
            mask, lp = torch.zeros(n, width), torch.zeros(n, width)
            for i, s in enumerate(kept):
                p, q = len(s["p"]), len(s["r"])
                ids[i, : p + q] = torch.tensor(s["p"] + s["r"])
                mask[i, p : p + q] = 1.0
                lp[i, p : p + q] = torch.tensor(s["lp"])
            if algo.overlong_filter:
                keep = overlong_mask(
                    torch.tensor([len(s["r"]) for s in kept]), torch.tensor([s["trunc"] for s in kept])
                )
                mask *= keep.float()[:, None]
            adv = group_advantages(
                [s["reward"] for s in kept], [s["uid"] for s in kept], norm_by_std=algo.norm_adv_by_std
            )
            batch = {
                "input_ids": ids,
                "seq_lengths": torch.tensor([len(s["p"]) + len(s["r"]) for s in kept]),
                "response_mask": mask,
                "advantages": adv.float()[:, None] * mask,
                "rollout_log_probs": lp,
            }
            out.append((batch, rounds))
    finally:
        pool.close()
        engine.close()
    return out
