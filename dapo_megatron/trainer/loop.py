"""The DAPO training loop: thin orchestration, readable top to bottom.

Per step::

    rollouts (every engine: its share of the prompts -> reward -> overlong shaping;
              dynamic sampling with globally all-reduced counts; group advantages)
      -> data plane: each sequence, as tensors, to the data-parallel replica that trains it
      -> old log-probs (Megatron, no grad) -> mismatch vs engine log-probs
      -> with kl_coef > 0: reference log-probs (KL loss, or KL in the reward: group advantages of
         the KL-shaped rewards, recomputed from a small all-gather)
      -> mini-batch DAPO updates (Megatron, token-level loss over the global batch)
      -> weight sync (each replica -> its own engine(s), in parallel) -> metrics -> checkpoint / validation

One rollout engine per block of ``rollout.tensor_parallel_size`` consecutive ranks (default: one
per data-parallel replica), on the block's first rank (:class:`~dapo_megatron.parallel.layout.EnginePlacement`).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dapo_megatron.algo import kl_penalty, logprob_mismatch_metrics
from dapo_megatron.config import DapoConfig, save_config
from dapo_megatron.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dapo_megatron.trainer.clip_control import ClipHighController

# Token positions per chunk of the vocab-parallel log-prob computation: bounds its fp32 work buffer
# to LOGPROB_CHUNK_TOKENS x (vocab / TP) (e.g. 78 MB for Qwen2.5's 152k vocabulary at TP=8).
LOGPROB_CHUNK_TOKENS = 1024


class DapoTrainer:
    """Builds everything from a :class:`~dapo_megatron.config.DapoConfig` and runs the loop."""

    def __init__(self, cfg: DapoConfig):
        from dapo_megatron.conversion.checkpoint import metadata_from_hf, validate_checkpoint
        from dapo_megatron.loading import build_model_from_checkpoint, build_model_from_hf
        from dapo_megatron.models import MoESettings
        from dapo_megatron.parallel.groups import initialize_parallel
        from dapo_megatron.parallel.layout import EnginePlacement, ParallelLayout
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
        self.groups = initialize_parallel(layout, seed=cfg.trainer.seed)
        self.placement = EnginePlacement(dist.get_world_size(), cfg.rollout_tensor_parallel_size)
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
        _, use_dist_opt = wrap_ddp(
            self.loaded, use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer
        )
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
            groups=self.groups,
            max_consecutive_skipped_steps=cfg.trainer.max_consecutive_skipped_steps,
        )
        self.reference = None  # the frozen initial policy of the KL penalty; only when kl_coef > 0
        if cfg.algorithm.kl_coef > 0:
            from dapo_megatron.policy.reference import build_reference

            self.reference = build_reference(cfg.model, layout, moe=moe)
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
        self.is_leader = self.placement.is_leader(self.rank)
        if layout.ep > 1:
            # Experts are split over the EP ranks of several data-parallel replicas, and the export
            # broadcasts each expert from its owner over the EP group: every rank takes part (each
            # collective stays inside its own TP / PP / EP group), so every engine leader receives
            # the full model.
            self.exports_weights = True
        else:
            # Each replica exports (collectively over its own TP x PP group) to the engines led by
            # its ranks; a replica without an engine leader skips the export.
            self.exports_weights = any(
                self.placement.is_leader(r) for r in self.groups.replica_ranks[self.groups.dp_rank]
            )
        self.save_dir = Path(cfg.checkpoint.save_dir or Path(cfg.trainer.run_dir) / "checkpoints")
        self.clip_high = ClipHighController(cfg.algorithm)  # same state on every rank
        self.step = 0
        self.engine = None
        self.reward_pool = None
        self.val_dataset = None
        self._build_rollout()

    def _build_rollout(self) -> None:
        from dapo_megatron.trainer.rollout import build_collector

        routing_shape = None
        if self.cfg.records_routing:
            arch = self.loaded.arch
            if not arch.moe_router_topk:
                raise ValueError(
                    f"model.routing_replay=rollout / rollout.record_routing need a mixture-of-experts "
                    f"model; {self.cfg.model.hf_dir} ({arch.model_type}) has none"
                )
            routing_shape = (arch.num_layers, arch.moe_router_topk)
        self.collector, self.val_dataset = build_collector(
            self.cfg, self.placement, self.groups, routing_shape=routing_shape
        )
        self.tokenizer = self.collector.tokenizer
        self.engine, self.reward_pool = self.collector.engine, self.collector.reward_pool

    # ----------------------------------------------------------------------------------- steps

    def sync_weights(self) -> tuple[float, float]:
        """Wake the engines and push the policy's weights to them, in memory: every replica streams
        its own full copy (collective over its TP x PP group) into the engines its ranks lead, all
        replicas at the same time; no cross-replica traffic. A failed engine stops every rank
        (:meth:`~dapo_megatron.trainer.rollout.RolloutCollector.update_engine_weights`). Returns the
        slowest rank's seconds and the largest peak resident memory of a training process so far
        (GiB, ``getrusage``; the engine processes are not counted), in one reduction."""
        t0 = time.monotonic()
        # a sleeping engine wakes its weights, loads, then wakes its KV cache
        self.collector.update_engine_weights(self.loaded.hf_tensors() if self.exports_weights else None)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
        maxima = torch.tensor([time.monotonic() - t0, peak_gib], dtype=torch.float64)
        if dist.get_world_size() > 1:
            from dapo_megatron.parallel.exchange import all_reduce_cpu

            maxima = all_reduce_cpu(maxima, op=dist.ReduceOp.MAX)
        return float(maxima[0]), float(maxima[1])

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.monotonic()
        batch, rollout_metrics = self.collector.collect()  # this replica's share of the batch
        self.collector.sleep_engine()  # colocated GPUs: free the engine's memory for training (no-op on CPU)
        t_rollout = time.monotonic() - t0

        agreement = None
        if "routed_experts" in batch:  # MoE: replayed (routing_replay=rollout) or only measured
            batch["old_log_probs"], agreement = self.policy.compute_log_probs_and_expert_agreement(batch)
        else:
            batch["old_log_probs"] = self.policy.compute_log_probs(batch)
        t_logprob = time.monotonic() - t0 - t_rollout
        mismatch = self._mismatch(batch, agreement)
        if self.reference is not None:
            mismatch.update(self.apply_reference(batch))

        n_seq = cfg.trainer.ppo_mini_batch_size * cfg.rollout.n // self.dp  # per data-parallel rank
        clip_high = self.clip_high.value
        settings = self.policy.loss_settings
        self.policy.loss_settings = dataclasses.replace(
            settings, algorithm=dataclasses.replace(settings.algorithm, clip_ratio_high=clip_high)
        )
        update_metrics = self.policy.update(batch, mini_batch_size=n_seq, epochs=cfg.trainer.ppo_epochs)
        update_metrics["algorithm/clip_ratio_high"] = clip_high
        self.clip_high.observe(update_metrics["entropy"])  # all-reduced: equal on every rank
        t_update = time.monotonic() - t0 - t_rollout - t_logprob
        t_sync, peak_rss_gib = self.sync_weights()
        step_time = time.monotonic() - t0
        tokens = rollout_metrics["rollout/batch_tokens"]
        metrics = {**rollout_metrics, **update_metrics, **mismatch}
        metrics.update(
            {
                "step_time": step_time,
                "tokens_per_second": tokens / step_time,
                "timing/rollout": t_rollout,
                "timing/old_log_prob": t_logprob,
                "timing/update": t_update,
                "timing/weight_sync": t_sync,
                "memory/host_peak_rss_gib": peak_rss_gib,
            }
        )
        return metrics

    @property
    def _counts_rows(self) -> bool:
        """Whether this rank's rows count in reductions over the batch: one rank per replica (old and
        reference log-probs are filled on the last pipeline stage, the same on its TP ranks and
        whole on every CP rank, so TP rank 0 and CP rank 0 of the last stage)."""
        return self.policy.reports_metrics and self.policy.cp_rank == 0

    def _reduce_over_batch(
        self, report: dict[str, torch.Tensor], per_rank: dict[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """``report`` (sums, and ``*_max`` maxima) of this rank's rows, reduced over every sequence of
        the step (the rows of :attr:`_counts_rows` ranks). ``per_rank``: sums that every rank
        holding a distinct share adds (already zero where they would be counted twice), in the
        same reduction."""
        from dapo_megatron.policy.metrics import reduce_reports

        if not per_rank:
            return reduce_reports(
                [report], keys=list(report), contributes=self._counts_rows, group=self.groups.world
            )
        if not self._counts_rows:
            report = {k: torch.tensor(float("-inf") if k.endswith("_max") else 0.0) for k in report}
        merged = {**report, **per_rank}
        return reduce_reports([merged], keys=list(merged), contributes=True, group=self.groups.world)

    def apply_reference(self, batch) -> dict[str, float]:
        """Reference log-probs of ``batch`` (after its old log-probs) and the mean KL to the
        reference over all tokens; with KL in the reward also the batch's advantages of the
        KL-shaped rewards (:func:`~dapo_megatron.trainer.rollout.kl_in_reward_advantages`)."""
        from dapo_megatron.trainer.rollout import kl_in_reward_advantages

        algo = self.cfg.algorithm
        batch["ref_log_probs"] = self.reference.compute_log_probs(self.policy, batch)
        mask = batch.response_mask
        kl = kl_penalty(batch.old_log_probs, batch.ref_log_probs, kind=algo.kl_type, response_mask=mask)
        tot = self._reduce_over_batch({"kl_sum": kl.double().sum(), "tokens": mask.double().sum()})
        out = {"ref_kl/mean": tot["kl_sum"] / max(tot["tokens"], 1.0)}
        if algo.kl_in_reward:
            out.update(
                kl_in_reward_advantages(
                    batch,
                    kl_coef=algo.kl_coef,
                    kl_type=algo.kl_type,
                    n=self.cfg.rollout.n,
                    norm_by_std=algo.norm_adv_by_std,
                    contributes=self._counts_rows,
                )
            )
        return out

    def _mismatch(self, batch, agreement: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Trainer vs engine log-probs of the same tokens, reduced over all sequences: both of the
        distribution sampled (temperature, top-k, top-p: engine processed log-probs, trainer
        truncation of policy/truncation.py), so only numerics separate them. With the engine's
        expert choices (``agreement``: this rank's sums from the old-log-prob pass), also
        ``rollout/expert_agreement``: the fraction of (token, layer, slot) engine choices the
        training forward used (1.0 with routing replay)."""
        mask = batch.response_mask.bool()
        m = logprob_mismatch_metrics(batch.old_log_probs, batch.rollout_log_probs, mask)
        tokens = mask.sum().double()
        report = {
            "diff_sum": m["abs_diff_mean"].double() * tokens,
            "frac_sum": m["frac_above_threshold"].double() * tokens,
            "tokens": tokens,
            "diff_max": m["abs_diff_max"].double(),
        }
        per_rank = None
        if agreement is not None:
            # Each pipeline stage counts its own layers; TP ranks see the same tokens unless
            # sequence parallelism splits them (then each counts its chunk).
            tp_rank = dist.get_rank(self.groups.tp) if self.groups.tp is not None else 0
            counts = self.loaded.layout.sp or tp_rank == 0
            per_rank = {k: v if counts else torch.zeros_like(v) for k, v in agreement.items()}
        tot = self._reduce_over_batch(report, per_rank)
        t = max(tot["tokens"], 1.0)
        out = {
            "rollout/logprob_diff_mean": tot["diff_sum"] / t,
            "rollout/logprob_diff_max": tot["diff_max"],
            "rollout/logprob_diff_frac_gt_0.1": tot["frac_sum"] / t,
        }
        if agreement is not None:
            out["rollout/expert_agreement"] = tot["expert_agree_sum"] / max(tot["expert_slots"], 1.0)
        return out

    def validate(self) -> dict[str, float]:
        """avg@k accuracy on the validation prompts, sharded over the engines like training prompts."""
        if self.val_dataset is None:
            return {}
        return self.collector.validate(self.val_dataset)

    # ------------------------------------------------------------------------------- checkpoint

    def save(self) -> Path:
        state = {  # the same on every rank
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
        self.collector.load_state_dict(state["collector"])
        if self.rank == 0:
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
        """Train to ``trainer.total_steps``; the engine and reward pool are closed also on failure
        (a failed run exits without leaving engine processes behind)."""
        try:
            return self._run()
        finally:
            self.close_rollout()

    def close_rollout(self) -> None:
        """Close this rank's engine and reward pool (idempotent; a failure here is printed, not
        raised, so it cannot hide the error that ended the run)."""
        engine, pool, self.engine, self.reward_pool = self.engine, self.reward_pool, None, None
        for what, obj in (("reward pool", pool), ("rollout engine", engine)):
            if obj is None:
                continue
            try:
                obj.close()
            except Exception as err:  # noqa: BLE001 - reported, the run's own outcome stands
                print(
                    f"[dapo] rank {self.rank}: closing the {what} failed: {type(err).__name__}: {err}",
                    flush=True,
                )

    def _run(self) -> dict[str, float]:
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
