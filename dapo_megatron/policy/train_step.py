"""One DAPO policy update on a Megatron-Core model: old log-probs, then mini-batch updates.

:class:`PolicyTrainer` owns the (DDP-wrapped) model, the optimizer and the scheduler. It never
computes the loss itself (:mod:`dapo_megatron.policy.loss` does) and never decides what to
train on (the trainer loop does).

Batch format: a :class:`~dapo_megatron.policy.batch.RolloutBatch` holding *this data-parallel
rank's* sequences only (the split is :func:`dapo_megatron.parallel.data.assign_data_parallel`; the
rollout data plane delivers each rank its share). Every rank of one replica (its TP x PP group)
holds the same local batch. Mini-batches are consecutive runs of ``mini_batch_size`` local rows,
each one optimizer update normalised by its *global* token count (Megatron's per-token loss).

Packing (``max_tokens_per_micro_batch``, and always under context parallelism): a rank's
sequences are binned into micro-batches under the token budget and packed in THD
(:mod:`dapo_megatron.parallel.packing`), with the same micro-batch count on every data-parallel
rank (only the lengths are all-gathered over the DP group); under CP each rank of a CP group
computes its zigzag share of every sequence.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch

from dapo_megatron.parallel.packing import pack_micro_batch, plan_micro_batches
from dapo_megatron.policy.batch import RolloutBatch
from dapo_megatron.policy.loss import LossSettings, dapo_loss, packed_token_log_probs, token_log_probs
from dapo_megatron.policy.metrics import reduce_reports, summarize_loss_metrics
from dapo_megatron.policy.optim import optimizer_step
from dapo_megatron.policy.routing_replay import ExpertAgreement
from dapo_megatron.policy.schedule import run_microbatches

LOSS_REPORT_KEYS = (
    "loss_sum",
    "loss_count",
    "tokens",
    "pg_loss_sum",
    "entropy_sum",
    "approx_kl_sum",
    "clipfrac_low_sum",
    "clipfrac_high_sum",
    "clipfrac_dual_sum",
    "ratio_sum",
    "ratio_max",
    "sequences",
    "response_length_sum",
    "response_length_max",
)


def make_microbatches(
    batch: RolloutBatch | dict[str, torch.Tensor], indices: list[int], micro_batch_size: int
) -> list[dict]:
    """Slice rows ``indices`` of ``batch`` into micro-batches (dicts of tensors plus ``index``),
    each trimmed to its longest sequence (less padding to compute on)."""
    tensors = batch.tensors() if isinstance(batch, RolloutBatch) else batch
    out = []
    for start in range(0, len(indices), micro_batch_size):
        idx = torch.tensor(indices[start : start + micro_batch_size], dtype=torch.long)
        width = int(tensors["seq_lengths"][idx].max())
        mb = {"index": idx}
        for key, t in tensors.items():
            if key == "seq_lengths":
                mb[key] = t[idx]
            elif t.dim() >= 2:
                mb[key] = t[idx, :width]
        out.append(mb)
    return out


class PolicyTrainer:
    """Megatron-side half of DAPO: log-probs and clipped-surrogate updates on a sharded model."""

    def __init__(
        self,
        loaded,
        optimizer,
        scheduler,
        loss_settings: LossSettings,
        *,
        micro_batch_size: int,
        log_prob_micro_batch_size: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        groups=None,
        max_consecutive_skipped_steps: int | None = None,
    ):
        """``groups``: the :class:`~dapo_megatron.parallel.groups.ProcessGroups` of this rank
        (default: read once from Megatron's initialised parallel state)."""
        from megatron.core import parallel_state as ps

        from dapo_megatron.parallel.groups import current_groups

        self.loaded = loaded
        self.model = loaded.model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_settings = loss_settings
        self.micro_batch_size = micro_batch_size
        self.log_prob_micro_batch_size = log_prob_micro_batch_size or micro_batch_size
        self.groups = groups if groups is not None else current_groups()
        self.tp_group = self.groups.tp
        self.dp = self.groups.dp_size
        self.dp_rank = self.groups.dp_rank
        # The rank whose loss reports count: last stage, TP rank 0 (TP ranks report the same values).
        self.reports_metrics = self.groups.reports_metrics
        self.sp_multiple = loaded.layout.tp if loaded.layout.sp else 1
        self.cp = loaded.layout.cp
        self.cp_rank = ps.get_context_parallel_rank() if self.cp > 1 else 0
        self.cp_group = ps.get_context_parallel_group() if self.cp > 1 else None
        loss_settings.check_context_parallel(self.cp)
        if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch < 1:
            raise ValueError(
                f"max_tokens_per_micro_batch must be null or >= 1, got {max_tokens_per_micro_batch}"
            )
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        # CP splits packed sequences only, so CP implies packing (with or without a token budget).
        self.packing = max_tokens_per_micro_batch is not None or self.cp > 1
        # Optimizer steps skipped in a row for a non-finite loss or gradient norm (across calls).
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.consecutive_skipped_steps = 0

    def _micro_batches(self, batch, indices: range, micro_batch_size: int) -> list[dict]:
        """This rank's micro-batches of its local rows ``indices``: padded, or packed (the same
        count on every data-parallel rank: the rows' lengths are all-gathered over the DP group)."""
        idx = list(indices)
        if not self.packing:
            return make_microbatches(batch, idx, micro_batch_size)
        tensors = batch.tensors() if isinstance(batch, RolloutBatch) else batch
        if tensors.get("routed_experts") is not None:
            raise ValueError(
                "model.routing_replay=rollout is not supported with sequence packing "
                "(parallel.max_tokens_per_micro_batch / context_parallel_size) yet"
            )
        multiple = self.loaded.layout.packed_sequence_multiple
        local = tensors["seq_lengths"][idx].long()
        if self.groups.dp is not None:
            from dapo_megatron.parallel.exchange import all_gather_cpu

            lengths = torch.cat(all_gather_cpu(local, group=self.groups.dp))
        else:
            lengths = local
        m = len(idx)
        plans = plan_micro_batches(
            lengths,
            [list(range(r * m, (r + 1) * m)) for r in range(self.dp)],
            max_tokens=self.max_tokens_per_micro_batch,
            micro_batch_size=micro_batch_size,
            pad_multiple=multiple,
            cp=self.cp,
        )
        offset = self.dp_rank * m
        return [
            pack_micro_batch(
                tensors, [idx[g - offset] for g in b], pad_multiple=multiple, cp_size=self.cp, cp_rank=self.cp_rank
            )
            for b in plans[self.dp_rank]
        ]

    def compute_log_probs(self, batch: RolloutBatch | dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probs ``[N, S]`` of every token of this rank's ``N`` sequences under the current
        weights (no grad). Filled on the last pipeline stage, zeros elsewhere: exactly where
        :meth:`update` needs them."""
        return self.log_probs_of(self.model, batch)

    def compute_log_probs_and_expert_agreement(
        self, batch: RolloutBatch | dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`compute_log_probs` of a batch with the engine's ``routed_experts``, and this
        rank's train/rollout expert agreement sums of that same pass
        (:class:`~dapo_megatron.policy.routing_replay.ExpertAgreement`, the layers of this stage).
        Replayed when the model was built with routing replay, else only measured."""
        if "routed_experts" not in batch:
            raise ValueError("expert agreement needs the batch's routed_experts (engine routing)")
        return self.log_probs_of(self.model, batch, expert_agreement=True)

    @torch.no_grad()
    def log_probs_of(
        self, model, batch: RolloutBatch | dict[str, torch.Tensor], *, expert_agreement: bool = False
    ):
        """No-grad log-probs ``[N, S]`` of ``batch`` under ``model`` (the policy, or its frozen
        reference on the same layout): this trainer's micro-batching (padded or packed),
        vocab-parallel chunking and temperature, the one pass structure of old and reference
        log-probs. ``expert_agreement``: also return the agreement sums (see
        :meth:`compute_log_probs_and_expert_agreement`)."""
        model.eval()
        n, s = batch["input_ids"].shape
        out = torch.zeros(n, s, dtype=torch.float32)
        keys = ("input_ids", "seq_lengths", "routed_experts")  # routed_experts: MoE routing replay
        mbs = self._micro_batches(
            {k: batch[k] for k in keys if k in batch},
            range(n),
            self.log_prob_micro_batch_size,
        )
        agreement = ExpertAgreement(model, mbs) if expert_agreement else None
        if not mbs:
            return (out, agreement.sums()) if agreement is not None else out
        vocab = self.loaded.arch.vocab_size

        def collect(mb, logits):
            settings = self.loss_settings
            kwargs = dict(
                tp_group=self.tp_group,
                vocab_size=vocab,
                chunk_size=settings.logprob_chunk_size,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
            )
            if "packed" in mb:
                logp = packed_token_log_probs(logits, mb, **kwargs)[0]
            else:
                logp = token_log_probs(logits[:, : mb["input_ids"].shape[1]], mb["input_ids"], **kwargs)[0]
            return mb["index"].cpu(), logp.float().cpu()

        with agreement if agreement is not None else nullcontext():
            results = run_microbatches(
                model, mbs, collect, forward_only=True, sequence_parallel_multiple=self.sp_multiple
            )
        for idx, logp in results:
            out[idx, : logp.shape[1]] = logp
        if self.cp_group is not None:  # each CP rank filled its zigzag share (zeros elsewhere)
            import torch.distributed as dist

            from dapo_megatron.parallel.cpu import device

            shared = out.to(device())
            dist.all_reduce(shared, group=self.cp_group)
            out = shared.cpu()
        return (out, agreement.sums()) if agreement is not None else out

    def update(self, batch: RolloutBatch, *, mini_batch_size: int, epochs: int = 1) -> dict[str, float]:
        """``epochs`` passes of mini-batch updates over this rank's ``batch``; one optimizer step per
        ``mini_batch_size`` local rows (the same count on every data-parallel rank), each normalised
        by its own global token count. The LR schedule advances once per optimizer step
        (:func:`~dapo_megatron.policy.optim.optimizer_step`); ``metrics["lr"]`` is the learning rate
        of this call's first update.

        An update whose loss or gradient norm is NaN/inf is skipped (no optimizer step, no LR
        step; counted in ``metrics["train/skipped_steps"]``, left out of the loss metrics); after
        ``max_consecutive_skipped_steps`` skipped in a row (across calls) ``RuntimeError``."""
        if isinstance(batch, dict):
            batch = RolloutBatch.from_tensors(batch)
        n = batch.num_sequences
        if mini_batch_size < 1 or n % mini_batch_size:
            raise ValueError(
                f"local batch of {n} sequences is not divisible by mini_batch_size={mini_batch_size}"
            )
        if "old_log_probs" not in batch:
            raise ValueError("batch needs old_log_probs (call compute_log_probs first)")
        self.model.train()
        loss_fn = partial(
            dapo_loss,
            settings=self.loss_settings,
            tp_group=self.tp_group,
            vocab_size=self.loaded.arch.vocab_size,
        )
        reports, grad_norms, lrs, skipped = [], [], [], 0
        for _ in range(epochs):
            for start in range(0, n, mini_batch_size):
                mbs = self._micro_batches(batch, range(start, start + mini_batch_size), self.micro_batch_size)
                self.model.zero_grad_buffer()
                self.optimizer.zero_grad()
                mb_reports = run_microbatches(
                    self.model, mbs, loss_fn, forward_only=False, sequence_parallel_multiple=self.sp_multiple
                )
                loss_ok = self._loss_is_finite(mb_reports)
                updated, grad_norm = optimizer_step(self.optimizer, self.scheduler, loss_is_finite=loss_ok)
                lrs.append(self.optimizer.param_groups[0]["lr"])  # the rate the update ran at
                if updated:
                    reports += mb_reports  # a skipped update's NaN must not poison the step's metrics
                    grad_norms.append(grad_norm)
                    self.consecutive_skipped_steps = 0
                    continue
                skipped += 1
                self.consecutive_skipped_steps += 1
                limit = self.max_consecutive_skipped_steps
                if limit is not None and self.consecutive_skipped_steps >= limit:
                    raise RuntimeError(
                        f"{self.consecutive_skipped_steps} consecutive optimizer steps skipped for a "
                        f"non-finite {'gradient norm' if loss_ok else 'loss'} (last: grad_norm={grad_norm}) "
                        f"reached trainer.max_consecutive_skipped_steps={limit}: the run is diverging "
                        f"or its data holds NaN/inf"
                    )
        totals = reduce_reports(
            reports, keys=LOSS_REPORT_KEYS, contributes=self.reports_metrics, group=self.groups.world
        )
        metrics = summarize_loss_metrics(totals)
        # Over the updates applied (NaN if every update of this call was skipped).
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        metrics["grad_norm_max"] = max(grad_norms) if grad_norms else float("nan")
        metrics["num_updates"] = len(grad_norms)
        metrics["train/skipped_steps"] = skipped
        metrics["lr"] = lrs[0]
        return metrics

    def _loss_is_finite(self, reports: list[dict]) -> bool:
        """Whether every micro-batch loss of this update is finite, on every rank (one all-reduce)."""
        bad = any(not torch.isfinite(r["loss_sum"]).all() for r in reports) if self.reports_metrics else False
        flag = torch.tensor([float(bad)], dtype=torch.float64)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from dapo_megatron.parallel.exchange import all_reduce_cpu

            flag = all_reduce_cpu(flag, op=torch.distributed.ReduceOp.MAX)
        return not bool(flag.item())
