"""The DAPO training loop: thin orchestration, readable top to bottom.

Per step::

    rollouts (rank 0: generate -> reward -> overlong shaping -> dynamic sampling)
      -> batch tensors (group advantages) -> broadcast to all ranks
      -> old log-probs (Megatron, no grad) -> mismatch vs engine log-probs
      -> mini-batch DAPO updates (Megatron, token-level loss over the global batch)
      -> weight sync (Megatron -> engine, in memory) -> metrics -> checkpoint / validation

The rollout engine lives on global rank 0 (the driver); every other rank only trains.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dapo_megatron.algo import logprob_mismatch_metrics
from dapo_megatron.config import DapoConfig, save_config
from dapo_megatron.parallel.comm import broadcast_object
from dapo_megatron.trainer.batch import samples_to_batch
from dapo_megatron.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dapo_megatron.trainer.clip_control import ClipHighController

# Token positions per chunk of the vocab-parallel log-prob computation: bounds its fp32 work buffer
# to LOGPROB_CHUNK_TOKENS x (vocab / TP) (e.g. 78 MB for Qwen2.5's 152k vocabulary at TP=8).
LOGPROB_CHUNK_TOKENS = 1024


class DapoTrainer:
    """Builds everything from a :class:`~dapo_megatron.config.DapoConfig` and runs the loop."""

    def __init__(self, cfg: DapoConfig):
        from megatron.core import parallel_state as ps

        from dapo_megatron.conversion.checkpoint import metadata_from_hf, validate_checkpoint
        from dapo_megatron.loading import build_model_from_checkpoint, build_model_from_hf
        from dapo_megatron.models import MoESettings, ParallelLayout
        from dapo_megatron.parallel.groups import initialize_parallel
        from dapo_megatron.policy.loss import LossSettings
        from dapo_megatron.policy.optim import build_optimizer, wrap_ddp
        from dapo_megatron.policy.train_step import PolicyTrainer

        self.cfg = cfg
        self.rank = dist.get_rank()
        self.dp = cfg.validate_world(dist.get_world_size())
        p = cfg.parallel
        layout = ParallelLayout(
            tp=p.tensor_model_parallel_size,
            pp=p.pipeline_model_parallel_size,
            sp=p.sequence_parallel,
            cp=p.context_parallel_size,
            ep=p.expert_model_parallel_size,
        )
        moe = MoESettings(
            aux_loss_coeff=cfg.model.moe_aux_loss_coeff, routing_replay=cfg.model.routing_replay == "rollout"
        )
        initialize_parallel(layout, seed=cfg.trainer.seed)
        if cfg.model.megatron_checkpoint:
            self.loaded = build_model_from_checkpoint(
                cfg.model.megatron_checkpoint, layout, recompute=cfg.model.recompute, moe=moe
            )
        else:
            self.loaded = build_model_from_hf(
                cfg.model.hf_dir,
                layout,
                dtype=cfg.model.dtype,
                vocab_pad_multiple=cfg.model.vocab_pad_multiple,
                recompute=cfg.model.recompute,
                moe=moe,
            )
        _, use_dist_opt = wrap_ddp(self.loaded)
        self.optimizer, self.scheduler = build_optimizer(
            self.loaded,
            cfg.optimizer,
            total_steps=cfg.trainer.total_steps,
            use_distributed_optimizer=use_dist_opt,
            updates_per_step=(cfg.trainer.train_batch_size // cfg.trainer.ppo_mini_batch_size)
            * cfg.trainer.ppo_epochs,
        )
        self.policy = PolicyTrainer(
            self.loaded,
            self.optimizer,
            self.scheduler,
            LossSettings(
                algorithm=cfg.algorithm,
                temperature=cfg.rollout.temperature,
                top_k=cfg.rollout.top_k,
                top_p=cfg.rollout.top_p,
                norm_length=cfg.rollout.max_response_length,
                logprob_chunk_size=LOGPROB_CHUNK_TOKENS,
            ),
            micro_batch_size=p.micro_batch_size,
            log_prob_micro_batch_size=p.log_prob_micro_batch_size,
            max_tokens_per_micro_batch=p.max_tokens_per_micro_batch,
            max_consecutive_skipped_steps=cfg.trainer.max_consecutive_skipped_steps,
        )
        if cfg.model.megatron_checkpoint:
            self.metadata = validate_checkpoint(cfg.model.megatron_checkpoint)[1]
        else:
            self.metadata = metadata_from_hf(
                cfg.model.hf_dir,
                dtype=cfg.model.dtype,
                vocab_pad_multiple=cfg.model.vocab_pad_multiple,
                padded_vocab_size=self.loaded.padded_vocab_size,
                hash_sources=False,
            )
        self.metadata.written_layout = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep}
        # The export to the engine is collective over the TP x PP group of data-parallel rank 0
        # (with experts split over EP ranks: over the TP x EP x PP ranks of one model replica).
        if layout.ep > 1:
            self.exports_weights = ps.get_expert_data_parallel_rank() == 0
        else:
            self.exports_weights = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
        self.save_dir = Path(cfg.checkpoint.save_dir or Path(cfg.trainer.run_dir) / "checkpoints")
        self.clip_high = ClipHighController(cfg.algorithm)  # same state on every rank
        self.step = 0
        self.collector = None
        self.val_dataset = None
        if self.rank == 0:
            self._build_driver()

    def _build_driver(self) -> None:
        """Rank 0 only: tokenizer, data, reward pool, rollout engine, metrics logger."""
        from transformers import AutoTokenizer

        from dapo_megatron.data.prompts import dataset_from_config
        from dapo_megatron.data.sampler import EpochSampler
        from dapo_megatron.rewards.pool import RewardPool
        from dapo_megatron.rollout import create_engine
        from dapo_megatron.trainer.rollout import RolloutCollector

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_dir or cfg.model.hf_dir)
        train = dataset_from_config(cfg.data, self.tokenizer, "train")
        if cfg.data.val_files:
            self.val_dataset = dataset_from_config(cfg.data, self.tokenizer, "val")
        sampler = EpochSampler(
            len(train), cfg.trainer.gen_batch_size, shuffle=cfg.data.shuffle, seed=cfg.data.seed
        )
        self.reward_pool = RewardPool.from_config(cfg.reward)
        dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.model.dtype]
        self.engine = create_engine(
            cfg.rollout.engine,
            cfg.model.hf_dir,
            dtype=dtype,
            seed=cfg.trainer.seed,
            **cfg.rollout.engine_options,
        )
        self.collector = RolloutCollector(self.engine, self.tokenizer, train, sampler, self.reward_pool, cfg)

    # ----------------------------------------------------------------------------------- steps

    def sync_weights(self) -> float:
        """Wake the engine and push the policy's weights to it, in memory (collective over data-parallel
        rank 0's TP x PP group; the engine lives on global rank 0)."""
        t0 = time.monotonic()
        if self.exports_weights:
            tensors = self.loaded.hf_tensors()
            if self.rank == 0:
                self.engine.wake_up()
                self.engine.update_weights(tensors)
            else:
                for _ in tensors:  # take part in the collectives, discard the tensors
                    pass
        return time.monotonic() - t0

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.monotonic()
        rollout_metrics, batch = {}, None
        if self.rank == 0:
            samples, rollout_metrics = self.collector.collect()
            self.engine.sleep()  # colocated GPUs: free the engine's memory for training (no-op on CPU)
            batch = samples_to_batch(
                samples,
                pad_id=self.tokenizer.pad_token_id or 0,
                norm_adv_by_std=cfg.algorithm.norm_adv_by_std,
                overlong_filter=cfg.algorithm.overlong_filter,
            )
        batch = broadcast_object(batch)
        t_rollout = time.monotonic() - t0
        if cfg.model.routing_replay == "none":
            batch.pop("routed_experts", None)
        elif "routed_experts" not in batch:
            raise ValueError(
                "model.routing_replay=rollout but the rollout engine reported no expert ids "
                "(HF engine: rollout.engine_options.record_routing: true)"
            )

        batch["old_log_probs"] = self.policy.compute_log_probs(batch)
        t_logprob = time.monotonic() - t0 - t_rollout
        mismatch = self._mismatch(batch)

        n_seq = cfg.trainer.ppo_mini_batch_size * cfg.rollout.n
        clip_high = self.clip_high.value
        settings = self.policy.loss_settings
        self.policy.loss_settings = dataclasses.replace(
            settings, algorithm=dataclasses.replace(settings.algorithm, clip_ratio_high=clip_high)
        )
        update_metrics = self.policy.update(batch, mini_batch_size=n_seq, epochs=cfg.trainer.ppo_epochs)
        update_metrics["algorithm/clip_ratio_high"] = clip_high
        self.clip_high.observe(update_metrics["entropy"])  # all-reduced: equal on every rank
        t_update = time.monotonic() - t0 - t_rollout - t_logprob
        t_sync = self.sync_weights()
        step_time = time.monotonic() - t0
        tokens = float(batch["seq_lengths"].sum())
        metrics = {**rollout_metrics, **update_metrics, **mismatch}
        metrics.update(
            {
                "step_time": step_time,
                "tokens_per_second": tokens / step_time,
                "timing/rollout": t_rollout,
                "timing/old_log_prob": t_logprob,
                "timing/update": t_update,
                "timing/weight_sync": t_sync,
            }
        )
        return metrics

    def _mismatch(self, batch) -> dict[str, float]:
        """Trainer vs engine log-probs of the same tokens, reduced over all sequences: both of the
        distribution sampled (temperature, top-k, top-p: engine processed log-probs, trainer
        truncation of policy/truncation.py), so only numerics separate them."""
        from dapo_megatron.policy.metrics import reduce_reports

        n = batch["input_ids"].shape[0]
        mine = [i for i in range(n) if i % self.dp == self.policy.dp_rank]
        mask = batch["response_mask"][mine].bool()
        m = logprob_mismatch_metrics(batch["old_log_probs"][mine], batch["rollout_log_probs"][mine], mask)
        tokens = mask.sum().double()
        report = {
            "diff_sum": m["abs_diff_mean"].double() * tokens,
            "frac_sum": m["frac_above_threshold"].double() * tokens,
            "tokens": tokens,
            "diff_max": m["abs_diff_max"].double(),
        }
        # old_log_probs are whole on every CP rank: one CP rank counts them
        contributes = self.policy.reports_metrics and self.policy.cp_rank == 0
        tot = reduce_reports([report], keys=list(report), contributes=contributes)
        t = max(tot["tokens"], 1.0)
        return {
            "rollout/logprob_diff_mean": tot["diff_sum"] / t,
            "rollout/logprob_diff_max": tot["diff_max"],
            "rollout/logprob_diff_frac_gt_0.1": tot["frac_sum"] / t,
        }

    def validate(self) -> dict[str, float]:
        """avg@k accuracy on the validation prompts (rank 0 generates; others wait)."""
        out = {}
        if self.rank == 0 and self.val_dataset is not None:
            r = self.cfg.rollout
            prompts = self.val_dataset.batch(list(range(len(self.val_dataset))))
            sampling = self.collector.sampling(validation=True, seed=self.cfg.trainer.seed)
            samples, _ = self.collector.generate_and_score(prompts, r.val_n, sampling, uid_prefix="val")
            out = {
                f"val/acc_avg@{r.val_n}": sum(s["acc"] for s in samples) / len(samples),
                "val/score_mean": sum(s["score"] for s in samples) / len(samples),
                "val/response_length_mean": sum(len(s["response_ids"]) for s in samples) / len(samples),
            }
        return broadcast_object(out)

    # ------------------------------------------------------------------------------- checkpoint

    def save(self) -> Path:
        state = None
        if self.rank == 0:
            state = {
                "step": self.step,
                "collector": self.collector.state_dict(),
                "clip_high": self.clip_high.state_dict(),
            }
        return save_checkpoint(
            self.save_dir,
            self.step,
            model=self.loaded.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            metadata=self.metadata,
            hf_dir=self.cfg.model.hf_dir,
            trainer_state=state,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def maybe_resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return
        path = latest_checkpoint(self.save_dir) if resume == "auto" else Path(resume)
        if path is None:
            return
        state = load_checkpoint(
            path, model=self.loaded.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.step = state["step"]
        self.clip_high.load_state_dict(state.get("clip_high", {"enabled": False, "clip_ratio_high": 0.0}))
        if self.rank == 0:
            self.collector.load_state_dict(state["collector"])
            print(f"[dapo] resumed from {path} at step {self.step}", flush=True)

    def export_hf(self, checkpoint: Path) -> Path:
        """Write the final policy as a Hugging Face directory (from the last checkpoint, streamed)."""
        from dapo_megatron.conversion.convert import convert_megatron_to_hf

        out = Path(self.cfg.checkpoint.export_hf_dir or Path(self.cfg.trainer.run_dir) / "hf")
        if self.rank == 0:
            if out.exists():
                print(f"[dapo] {out} exists; not overwriting the HF export", flush=True)
            else:
                convert_megatron_to_hf(checkpoint, out, progress=False)
                print(f"[dapo] exported the final policy to {out}", flush=True)
        dist.barrier()
        return out

    # -------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, float]:
        from tqdm import tqdm

        from dapo_megatron.utils.metrics_logger import MetricsLogger

        cfg = self.cfg
        self.maybe_resume()
        if self.step > 0 or cfg.model.megatron_checkpoint:
            self.sync_weights()  # the engine starts from hf_dir; bring it to the policy's weights
        logger = MetricsLogger(
            cfg.trainer.run_dir,
            jsonl=cfg.logging.jsonl,
            tensorboard=cfg.logging.tensorboard,
            enabled=self.rank == 0,
            resume_step=self.step,
        )
        if self.rank == 0:
            save_config(cfg, Path(cfg.trainer.run_dir) / "config.yaml")
        last: dict[str, float] = {}
        if self.step == 0 and cfg.trainer.val_before_train and cfg.trainer.val_every:
            last = self.validate()
            logger.log(0, last)
            self._print(0, last)
        bar = tqdm(
            total=cfg.trainer.total_steps,
            initial=self.step,
            disable=self.rank != 0 or not cfg.logging.progress_bar,
            desc="DAPO",
            unit="step",
        )
        while self.step < cfg.trainer.total_steps:
            self.step += 1
            metrics = self.train_step()
            if cfg.trainer.val_every and self.step % cfg.trainer.val_every == 0:
                metrics.update(self.validate())
            if cfg.trainer.save_every and self.step % cfg.trainer.save_every == 0:
                self.save()
            logger.log(self.step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(acc=f"{metrics.get('acc/mean', 0):.3f}", loss=f"{metrics['loss']:.4f}")
            self._print(self.step, metrics)
        bar.close()
        final = self.save_dir / f"step_{self.step:06d}"
        if latest_checkpoint(self.save_dir) != final:
            final = self.save()
        if cfg.checkpoint.export_hf_at_end:
            self.export_hf(final)
        logger.close()
        if self.rank == 0:
            self.reward_pool.close()
            self.engine.close()
        return last

    def _print(self, step: int, m: dict[str, float]) -> None:
        if self.rank != 0:
            return
        keys = (
            "acc/mean",
            "reward/mean",
            "loss",
            "entropy",
            "pg_clipfrac_high",
            "dynamic_sampling/kept_ratio",
            "rollout/logprob_diff_mean",
            "response_length/mean",
            "step_time",
        )
        val = {k: v for k, v in m.items() if k.startswith("val/")}
        parts = [f"{k}={m[k]:.4g}" for k in keys if k in m] + [f"{k}={v:.4g}" for k, v in val.items()]
        print(f"[dapo] step {step}: " + " ".join(parts), flush=True)


def init_distributed(backend: str = "auto") -> None:
    """``torch.distributed`` from torchrun's environment (a world of one without torchrun)."""
    from datetime import timedelta

    from dapo_megatron.parallel.cpu import enable_cpu_megatron

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        enable_cpu_megatron()
    if not dist.is_initialized():
        # Generous timeout: non-driver ranks wait in a broadcast while rank 0 generates rollouts.
        dist.init_process_group(backend, timeout=timedelta(hours=3))
