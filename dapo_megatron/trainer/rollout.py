"""Rollout collection on the driver rank: generate, score, shape, filter (dynamic sampling).

Runs where the rollout engine lives (global rank 0). Produces *samples*: one dict per response
with its tokens, the engine's log-probs, the task score and the shaped reward. Pure orchestration:
the math lives in :mod:`dapo_megatron.algo`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dapo_megatron.algo import DynamicSampler, overlong_penalty
from dapo_megatron.rollout import SamplingConfig
from dapo_megatron.trainer.prompt_skip import PromptSkipper

# Seeds of successive generation rounds are spaced so per-sample seeds (base + i*n + j) never collide.
_SEED_STRIDE = 1_000_003


class RolloutCollector:
    """Generates rollout groups until the dynamic sampler holds a full training batch."""

    def __init__(self, engine, tokenizer, dataset, data_sampler, reward_pool, cfg):
        self.engine = engine
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.data_sampler = data_sampler
        self.reward_pool = reward_pool
        self.cfg = cfg
        algo = cfg.algorithm
        self.dynamic_sampler = DynamicSampler(
            cfg.trainer.train_batch_size,
            max_num_gen_batches=algo.max_num_gen_batches,
            metric=algo.filter_metric,
            enabled=algo.dynamic_sampling,
        )
        self.prompt_skipper = PromptSkipper(
            enabled=algo.prompt_skipping,
            explore_prob=algo.prompt_skipping_explore_prob,
            metric=algo.filter_metric,
        )
        self.generation_round = 0  # persisted: makes every round's sampling seed reproducible

    def sampling(self, *, validation: bool = False, seed: int | None = None) -> SamplingConfig:
        r = self.cfg.rollout
        return SamplingConfig(
            temperature=r.val_temperature if validation else r.temperature,
            top_p=r.val_top_p if validation else r.top_p,
            top_k=r.val_top_k if validation else r.top_k,
            max_new_tokens=r.max_response_length,
            seed=seed,
        )

    def generate_and_score(
        self, prompts, n: int, sampling: SamplingConfig, uid_prefix: str
    ) -> tuple[list, dict]:
        """Sample ``n`` responses per prompt and score them; returns (samples, metrics)."""
        t0 = time.monotonic()
        groups = self.engine.generate([p.input_ids for p in prompts], n, sampling)
        gen_time = time.monotonic() - t0
        flat = [(i, r) for i, group in enumerate(groups) for r in group]
        texts = self.tokenizer.batch_decode([r.token_ids for _, r in flat], skip_special_tokens=True)
        results, reward_stats = self.reward_pool.compute(texts, [prompts[i].ground_truth for i, _ in flat])
        algo = self.cfg.algorithm
        lengths = torch.tensor([len(r.token_ids) for _, r in flat], dtype=torch.float32)
        penalty = torch.zeros_like(lengths)
        if algo.overlong_buffer_enable:
            penalty = overlong_penalty(
                lengths,
                max_len=self.cfg.rollout.max_response_length,
                buffer_len=algo.overlong_buffer_len,
                penalty_factor=algo.overlong_buffer_penalty_factor,
            )
        samples = []
        for k, ((i, resp), res) in enumerate(zip(flat, results)):
            samples.append(
                {
                    "uid": f"{uid_prefix}:{prompts[i].index}:{i}",
                    "prompt_ids": list(prompts[i].input_ids),
                    "response_ids": list(resp.token_ids),
                    "rollout_logprobs": list(resp.logprobs),
                    "routed_experts": resp.routed_experts,
                    "truncated": resp.finish_reason == "length",
                    "score": float(res["score"]),
                    "acc": float(bool(res["acc"])),
                    "overlong_penalty": float(penalty[k]),
                    "reward": float(res["score"]) + float(penalty[k]),
                }
            )
        metrics = reward_stats.as_metrics()
        metrics["timing/generate"] = gen_time
        metrics["rollout/generated_tokens"] = float(lengths.sum())
        return samples, metrics

    def collect(self) -> tuple[list[dict], dict[str, float]]:
        """One training batch of ``train_batch_size`` groups (after dynamic sampling)."""
        cfg = self.cfg
        generated: list[dict] = []
        gen_metrics: dict[str, float] = {}
        scanned = 0
        while True:
            indices, drawn = self.prompt_skipper.choose(
                self.data_sampler,
                cfg.trainer.gen_batch_size,
                seed=cfg.trainer.seed * _SEED_STRIDE + self.generation_round,
            )
            scanned += drawn
            prompts = self.dataset.batch(indices)
            seed = cfg.trainer.seed * _SEED_STRIDE + self.generation_round * (
                cfg.rollout.n * cfg.trainer.gen_batch_size + 1
            )
            self.generation_round += 1
            samples, metrics = self.generate_and_score(
                prompts, cfg.rollout.n, self.sampling(seed=seed), uid_prefix=f"r{self.generation_round}"
            )
            self.prompt_skipper.observe(indices, samples, cfg.rollout.n)
            generated += samples
            for k, v in metrics.items():
                gen_metrics[k] = gen_metrics.get(k, 0.0) + v
            if self.dynamic_sampler.add(samples):
                break
        batch, ds_metrics = self.dynamic_sampler.take()
        n = len(generated)
        out = {f"dynamic_sampling/{k}": float(v) for k, v in ds_metrics.items()}
        out.update(gen_metrics)
        out.update(
            {
                # over every response generated this step (what the policy does) ...
                "acc/mean": sum(s["acc"] for s in generated) / n,
                "score/mean": sum(s["score"] for s in generated) / n,
                "reward/mean": sum(s["reward"] for s in generated) / n,
                "response_length/mean": sum(len(s["response_ids"]) for s in generated) / n,
                "response_length/max": float(max(len(s["response_ids"]) for s in generated)),
                "response_length/clip_ratio": sum(s["truncated"] for s in generated) / n,
                "rollout/generated_responses": float(n),
                # ... and over the groups kept for training
                "acc/kept_mean": sum(s["acc"] for s in batch) / len(batch),
                "reward/kept_mean": sum(s["reward"] for s in batch) / len(batch),
                # what dynamic sampling costs: responses generated per group that is trained on
                "rollout/responses_per_kept_group": n / cfg.trainer.train_batch_size,
            }
        )
        if self.prompt_skipper.enabled:
            generated_prompts = n // cfg.rollout.n
            out["prompt_skipping/skipped_prompts"] = float(scanned - generated_prompts)
            out["prompt_skipping/skip_ratio"] = (scanned - generated_prompts) / scanned
            out["prompt_skipping/zero_streak_prompts"] = float(self.prompt_skipper.num_zero_streak())
        return batch, out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generation_round": self.generation_round,
            "data_sampler": self.data_sampler.state_dict(),
            "dynamic_sampler": self.dynamic_sampler.state_dict(),
            "prompt_skipper": self.prompt_skipper.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generation_round = state["generation_round"]
        self.data_sampler.load_state_dict(state["data_sampler"])
        self.dynamic_sampler.load_state_dict(state["dynamic_sampler"])
        # (checkpoints from before prompt skipping existed hold no history: a disabled skipper)
        self.prompt_skipper.load_state_dict(state.get("prompt_skipper", {"enabled": False, "history": {}}))
