"""Rollout collection across engines: generate, score, shape, filter, advantages, deliver.

Every rank runs :meth:`RolloutCollector.collect`; the engines live on the leader ranks of
:class:`~dapo_megatron.parallel.layout.EnginePlacement`. Per generation round:

1. Every rank draws the same seeded prompt indices; engine ``e`` takes the contiguous share ``e``
   (:func:`~dapo_megatron.parallel.layout.shard_bounds`) with all ``n`` responses of each of its
   prompts, so group filtering is local. Sample ``j`` of global prompt ``i`` uses the seed
   ``base + i * n + j`` whatever the number of engines: the responses are those one engine would
   sample for the whole batch.
2. The leader scores its responses (its own reward pool) and adds the overlong penalty.
3. Kept-group counts (dynamic sampling) are all-gathered; rounds stop when the global count
   reaches ``train_batch_size``. The kept groups are the first ``train_batch_size`` in the order
   (round, engine, prompt): the order of a single engine, so the batch does not depend on the
   number of engines and is reproducible from the seeds (also after resume).
4. Group advantages and overlong filtering (local: a group never spans engines).
5. The data plane: only lengths are gathered globally; every rank computes the same
   data-parallel split (:func:`~dapo_megatron.parallel.data.assign_data_parallel`) and each
   leader sends each replica's rows, as tensors, to that replica's ranks
   (:func:`~dapo_megatron.parallel.exchange.exchange`). A rank receives ~``batch / dp`` rows.
6. KL in the reward only (``algorithm.kl_coef > 0``, ``use_kl_loss: false``): the rows also carry
   their shaped rewards, and once the training ranks have the old and reference log-probs,
   :func:`kl_in_reward_advantages` recomputes the group advantages of ``reward - kl_coef * KL``
   from a small all-gather (a group's responses sit on several data-parallel ranks).

Shaping, filtering and advantages happen here and only here; the math is :mod:`dapo_megatron.algo`.

Engine failures (:class:`EngineError`): every call into an engine (generate, weight sync, sleep)
is followed by :meth:`RolloutCollector.check_engines`, a tiny all-reduce of one flag per engine
over every rank. If an engine failed (its process died, say), its leader raises its own error and
every other rank raises one naming that engine and its rank, at the same point of the step: the
whole job exits non-zero within seconds, instead of the other ranks waiting in their next
collective until the process-group timeout (30 min by default; torchrun's agent stops the other
local workers when one exits, but on a multi-node job the other nodes' ranks would wait).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dapo_megatron.algo import (
    broadcast_advantages,
    group_advantages,
    overlong_mask,
    overlong_penalty,
    select_informative_groups,
    sequence_kl_sums,
)
from dapo_megatron.algo.dynamic_sampling import exhausted_error
from dapo_megatron.parallel.data import assign_data_parallel
from dapo_megatron.parallel.exchange import all_gather_cpu, all_reduce_cpu, exchange
from dapo_megatron.parallel.layout import EnginePlacement, shard_bounds
from dapo_megatron.policy.batch import RolloutBatch
from dapo_megatron.rollout import SamplingConfig
from dapo_megatron.trainer.prompt_skip import PromptSkipper
from dapo_megatron.utils.dtypes import HF_DTYPE_NAMES
from dapo_megatron.utils.report import Report

# Seeds of successive generation rounds are spaced so per-sample seeds (base + i*n + j) never collide.
_SEED_STRIDE = 1_000_003


@dataclass
class Row:
    """One kept response on its engine's leader, ready for the data plane."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_log_probs: list[float]
    advantage: float
    in_loss: bool  # False: dropped from the loss by overlong filtering
    reward: float = 0.0  # the shaped scalar reward; delivered only with KL in the reward
    # MoE engines that record routing: int [prompt + response, layers, top_k] (Response.routed_experts)
    routed_experts: torch.Tensor | None = None


class EngineError(RuntimeError):
    """A rollout engine failed (e.g. its process died); the message names the engine and rank."""


def _drain(iterator) -> None:
    for _ in iterator:
        pass


class RolloutCollector:
    """Sharded rollout collection; see the module docstring.

    Args:
        cfg: the :class:`~dapo_megatron.config.DapoConfig`.
        placement: where the engines live.
        groups: this rank's :class:`~dapo_megatron.parallel.groups.ProcessGroups`.
        tokenizer, dataset, data_sampler: on every rank (all draw the same prompt indices).
        engine, reward_pool: on engine leaders only (``None`` elsewhere).
    """

    def __init__(
        self,
        cfg,
        *,
        placement: EnginePlacement,
        groups,
        tokenizer,
        dataset,
        data_sampler,
        engine=None,
        reward_pool=None,
        routing_shape: tuple[int, int] | None = None,
    ):
        self.cfg = cfg
        # (layers, top_k) of the engine's recorded expert ids, carried to the training ranks; None:
        # the engines do not record routing.
        self.routing_shape = routing_shape
        self.placement = placement
        self.groups = groups
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.data_sampler = data_sampler
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.engine_index = placement.engine_of(self.rank)
        self.is_leader = placement.is_leader(self.rank)
        if self.is_leader and (engine is None or reward_pool is None):
            raise ValueError(
                f"rank {self.rank} leads engine {self.engine_index}: it needs an engine and a reward pool"
            )
        self.engine = engine
        self.reward_pool = reward_pool
        self.pad_id = (tokenizer.pad_token_id or 0) if tokenizer is not None else 0
        algo = cfg.algorithm
        self.prompt_skipper = PromptSkipper(  # the same state on every rank (observes every group)
            enabled=algo.prompt_skipping,
            explore_prob=algo.prompt_skipping_explore_prob,
            metric=algo.filter_metric,
        )
        self.generate_seconds = 0.0
        self.generation_round = 0  # persisted: makes every round's sampling seed reproducible

    # ------------------------------------------------------------------------------ generation

    def sampling(self, *, validation: bool = False, seed: int | None = None) -> SamplingConfig:
        r = self.cfg.rollout
        return SamplingConfig(
            temperature=r.val_temperature if validation else r.temperature,
            top_p=r.val_top_p if validation else r.top_p,
            top_k=r.val_top_k if validation else r.top_k,
            max_new_tokens=r.max_response_length,
            seed=seed,
        )

    def _failed(self, what: str, engine: int | None = None) -> str:
        e = self.engine_index if engine is None else engine
        return (
            f"rollout engine {e} (of {self.placement.num_engines}) on rank {self.placement.leaders[e]} "
            f"failed in {what}"
        )

    def _engine_error(self, what: str, err: Exception) -> EngineError:
        error = EngineError(f"{self._failed(what)}: {type(err).__name__}: {err}")
        error.__cause__ = err
        return error

    def _generate(self, prompts, n: int, sampling: SamplingConfig):
        try:
            return self.engine.generate([p.input_ids for p in prompts], n, sampling)
        except Exception as err:
            raise self._engine_error("generate", err) from err

    def check_engines(self, error: EngineError | None, what: str) -> None:
        """Collective over every rank, after each engine call: raise on every rank if any engine
        failed (``error`` is this leader's failure, else ``None``). The failing leader raises its
        own error; every other rank raises one naming each failed engine and its rank."""
        failed = torch.zeros(self.placement.num_engines, dtype=torch.long)
        if error is not None:
            failed[self.engine_index] = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            failed = all_reduce_cpu(failed, op=dist.ReduceOp.MAX, group=self.groups.world)
        if error is not None:
            raise error
        if failed.any():
            which = "; ".join(self._failed(what, e) for e in failed.nonzero().flatten().tolist())
            raise EngineError(f"{which} (that rank's log has the engine's error); rank {self.rank} stops too")

    def update_engine_weights(self, tensors) -> None:
        """Collective: this replica's export ``tensors`` (``(hf_name, tensor)`` pairs; ``None`` on
        ranks that take no part in an export) into this rank's engine, or only iterated on the
        replica's other ranks (the export is collective over the TP x PP group); then
        :meth:`check_engines`. If the engine fails mid-stream, the rest of the export is still
        iterated, so the replica's other ranks finish the export's collectives and reach the check."""
        error = None
        if tensors is not None and self.engine is None:
            _drain(tensors)
        elif tensors is not None:
            source, export_failed = iter(tensors), []

            def feed():
                try:
                    yield from source
                except BaseException:
                    export_failed.append(True)
                    raise

            try:
                self.engine.update_weights(feed())
            except Exception as err:
                if export_failed:  # the export itself failed, not the engine
                    raise
                _drain(source)
                error = self._engine_error("weight sync", err)
        self.check_engines(error, "weight sync")

    def sleep_engine(self) -> None:
        """Collective: put this rank's engine to sleep (frees its GPU memory for training; a no-op
        on CPU), then :meth:`check_engines`."""
        error = None
        if self.engine is not None:
            try:
                self.engine.sleep()
            except Exception as err:
                error = self._engine_error("sleep", err)
        self.check_engines(error, "sleep")

    def generate_and_score(
        self, prompts, n: int, sampling: SamplingConfig, *, uid_prefix: str, first: int, report: Report
    ) -> list[dict]:
        """Sample ``n`` responses for each of this engine's ``prompts`` (global positions
        ``first, first + 1, ...``), score them and add the overlong penalty. Adds the per-response
        sums to ``report``; returns the samples, prompt by prompt."""
        t0 = time.monotonic()
        groups = self._generate(prompts, n, sampling)
        self.generate_seconds += time.monotonic() - t0
        flat = [(i, r) for i, group in enumerate(groups) for r in group]
        texts = self.tokenizer.batch_decode([r.token_ids for _, r in flat], skip_special_tokens=True)
        results, reward_stats = self.reward_pool.compute(texts, [prompts[i].ground_truth for i, _ in flat])
        for key, value in reward_stats.as_metrics().items():
            report.total(key, value)
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
                    "uid": f"{uid_prefix}:{prompts[i].index}:{first + i}",
                    "prompt_ids": list(prompts[i].input_ids),
                    "response_ids": list(resp.token_ids),
                    "rollout_log_probs": list(resp.logprobs),
                    "routed_experts": resp.routed_experts,
                    "truncated": resp.finish_reason == "length",
                    "score": float(res["score"]),
                    "acc": float(bool(res["acc"])),
                    "reward": float(res["score"]) + float(penalty[k]),
                }
            )
        return samples

    def _checked_generate(self, what: str, generates: bool, prompts, n: int, sampling, **kwargs):
        """Collective: :meth:`generate_and_score` on a leader with prompts (``generates``), then
        :meth:`check_engines` on every rank. Returns the samples, or ``None`` where nothing ran."""
        samples, error = None, None
        if generates:
            try:
                samples = self.generate_and_score(prompts, n, sampling, **kwargs)
            except EngineError as err:
                error = err
        self.check_engines(error, what)
        return samples

    # --------------------------------------------------------------------------------- collect

    def _gather_counts(self, local: list[int]) -> torch.Tensor:
        """``[num_engines, len(local)]``: every leader's ``local`` counts (collective)."""
        mine = torch.tensor(local, dtype=torch.long)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return mine[None]
        every = all_gather_cpu(mine)
        return torch.stack([every[r] for r in self.placement.leaders])

    def collect(self) -> tuple[RolloutBatch, dict[str, float]]:
        """This rank's share of one training batch of ``train_batch_size`` groups, and the step's
        rollout metrics (identical on every rank)."""
        cfg, algo = self.cfg, self.cfg.algorithm
        n, needed = cfg.rollout.n, cfg.trainer.train_batch_size
        num_engines = self.placement.num_engines
        report = Report()
        kept_by_round: list[list[list[dict]]] = []
        kept_counts: list[list[int]] = []
        totals = torch.zeros(4, dtype=torch.long)  # kept, generated, all solved, none solved
        generated_tokens = 0
        scanned = 0
        self.generate_seconds = 0.0
        while True:
            indices, drawn = self.prompt_skipper.choose(
                self.data_sampler,
                cfg.trainer.gen_batch_size,
                seed=cfg.trainer.seed * _SEED_STRIDE + self.generation_round,
            )
            scanned += drawn
            seed = cfg.trainer.seed * _SEED_STRIDE + self.generation_round * (
                n * cfg.trainer.gen_batch_size + 1
            )
            self.generation_round += 1
            start, stop = shard_bounds(len(indices), num_engines)[self.engine_index]
            kept, local, values = [], [0, 0, 0, 0], []
            generates = self.is_leader and stop > start
            samples = self._checked_generate(
                "generate",
                generates,
                self.dataset.batch(indices[start:stop]) if generates else None,
                n,
                self.sampling(seed=seed + start * n),
                uid_prefix=f"r{self.generation_round}",
                first=start,
                report=report,
            )
            if generates:
                generated_tokens += sum(len(s["response_ids"]) for s in samples)
                _add_response_sums(report, samples)
                values = [s[algo.filter_metric] for s in samples]
                informative = select_informative_groups([s["uid"] for s in samples], values).tolist()
                for g in range(stop - start):
                    group = samples[g * n : (g + 1) * n]
                    solved = sum(v > 0.0 for v in values[g * n : (g + 1) * n])
                    local[1] += 1
                    local[2] += solved == n
                    local[3] += solved == 0
                    if informative[g * n] or not algo.dynamic_sampling:
                        kept.append(group)
                local[0] = len(kept)
            if self.prompt_skipper.enabled:  # every rank observes every group (small metadata)
                shares: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
                if len(shares) > 1:
                    dist.all_gather_object(shares, (start, values))
                else:
                    shares = [(start, values)]
                every = [v for _, vs in sorted(shares, key=lambda x: x[0]) for v in vs]
                self.prompt_skipper.observe(indices, [{algo.filter_metric: v} for v in every], n)
            per_engine = self._gather_counts(local)
            kept_by_round.append(kept)
            kept_counts.append(per_engine[:, 0].tolist())
            totals += per_engine.sum(0)
            if int(totals[0]) >= needed:
                break
            if algo.max_num_gen_batches > 0 and len(kept_counts) >= algo.max_num_gen_batches:
                raise exhausted_error(
                    num_gen_batches=len(kept_counts),
                    max_num_gen_batches=algo.max_num_gen_batches,
                    num_kept=int(totals[0]),
                    needed=needed,
                    num_total=int(totals[1]),
                    num_solve_all=int(totals[2]),
                    num_solve_none=int(totals[3]),
                    metric=algo.filter_metric,
                    where=f" over {num_engines} engine(s)",
                )

        # The first `needed` kept groups in (round, engine, prompt) order.
        take = []
        left = needed
        for counts in kept_counts:
            take.append(_running(counts, left))
            left -= sum(take[-1])
        mine = [g for r, groups in enumerate(kept_by_round) for g in groups[: take[r][self.engine_index]]]
        rows = self.shape(mine)
        _add_kept_sums(report, [s for g in mine for s in g])
        if self.is_leader:
            report.max("rollout/engine_generated_tokens_max", generated_tokens)
            report.min("rollout/engine_generated_tokens_min", generated_tokens)
            report.max("timing/generate", self.generate_seconds)  # the slowest engine

        batch, stats = self.deliver(rows, take)
        out = report.reduce(self.groups.world).values()
        kept_total, generated = int(totals[0]), int(totals[1])
        if self.prompt_skipper.enabled:
            generated_prompts = generated
            out["prompt_skipping/skipped_prompts"] = float(scanned - generated_prompts)
            out["prompt_skipping/skip_ratio"] = (scanned - generated_prompts) / scanned if scanned else 0.0
            out["prompt_skipping/zero_streak_prompts"] = float(self.prompt_skipper.num_zero_streak())
        out.update(
            {
                # what dynamic sampling costs: responses generated per group that is trained on
                "rollout/responses_per_kept_group": generated * n / needed,
                "dynamic_sampling/num_gen_batches": float(len(kept_counts)),
                "dynamic_sampling/num_groups_total": float(generated),
                "dynamic_sampling/num_groups_kept": float(kept_total),
                "dynamic_sampling/kept_ratio": kept_total / generated if generated else 0.0,
                "dynamic_sampling/solve_all_frac": int(totals[2]) / generated if generated else 0.0,
                "dynamic_sampling/solve_none_frac": int(totals[3]) / generated if generated else 0.0,
                "dynamic_sampling/num_groups_trimmed": float(kept_total - needed),
                "rollout/num_engines": float(num_engines),
                **stats,
            }
        )
        return batch, out

    def shape(self, groups: list[list[dict]]) -> list[Row]:
        """Group advantages of the shaped rewards and overlong filtering, for this engine's kept
        groups (complete groups: the group statistics are exact)."""
        samples = [s for g in groups for s in g]
        if not samples:
            return []
        algo = self.cfg.algorithm
        adv = group_advantages(
            [s["reward"] for s in samples], [s["uid"] for s in samples], norm_by_std=algo.norm_adv_by_std
        ).float()
        keep = torch.ones(len(samples), dtype=torch.bool)
        if algo.overlong_filter:
            keep = overlong_mask(
                torch.tensor([len(s["response_ids"]) for s in samples]),
                torch.tensor([s["truncated"] for s in samples]),
            )
        return [
            Row(
                s["prompt_ids"],
                s["response_ids"],
                s["rollout_log_probs"],
                float(a),
                bool(k),
                s["reward"],
                routed_experts=s["routed_experts"] if self.routing_shape is not None else None,
            )
            for s, a, k in zip(samples, adv.tolist(), keep.tolist())
        ]

    def deliver(self, rows: list[Row], take: list[list[int]]) -> tuple[RolloutBatch, dict[str, float]]:
        """Move each row to the data-parallel replica that trains it (see :func:`deliver_rows`)."""
        return deliver_rows(
            rows if self.is_leader else [],
            take,
            n=self.cfg.rollout.n,
            mini_batch_size=self.cfg.trainer.ppo_mini_batch_size * self.cfg.rollout.n,
            placement=self.placement,
            groups=self.groups,
            pad_id=self.pad_id,
            with_rewards=self.cfg.algorithm.kl_in_reward,
            routing_shape=self.routing_shape,
        )

    # ------------------------------------------------------------------------------ validation

    def validate(self, dataset) -> dict[str, float]:
        """avg@``val_n`` accuracy over every prompt of ``dataset``, sharded over the engines."""
        r = self.cfg.rollout
        report = Report()
        start, stop = shard_bounds(len(dataset), self.placement.num_engines)[self.engine_index]
        generates = self.is_leader and stop > start
        samples = self._checked_generate(
            "generate (validation)",
            generates,
            dataset.batch(list(range(start, stop))) if generates else None,
            r.val_n,
            self.sampling(validation=True, seed=self.cfg.trainer.seed + start * r.val_n),
            uid_prefix="val",
            first=start,
            report=Report(),
        )
        if generates:
            report.add(f"val/acc_avg@{r.val_n}", sum(s["acc"] for s in samples), len(samples))
            report.add("val/score_mean", sum(s["score"] for s in samples), len(samples))
            report.add("val/response_length_mean", sum(len(s["response_ids"]) for s in samples), len(samples))
        return report.reduce(self.groups.world).values()

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Identical on every rank (the partial batch never outlives a step)."""
        return {
            "generation_round": self.generation_round,
            "data_sampler": self.data_sampler.state_dict(),
            "prompt_skipper": self.prompt_skipper.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generation_round = state["generation_round"]
        self.data_sampler.load_state_dict(state["data_sampler"])
        # (checkpoints from before prompt skipping existed hold no history: a disabled skipper)
        self.prompt_skipper.load_state_dict(state.get("prompt_skipper", {"enabled": False, "history": {}}))


def deliver_rows(
    rows: list[Row],
    take: list[list[int]],
    *,
    n: int,
    mini_batch_size: int,
    placement: EnginePlacement,
    groups,
    pad_id: int = 0,
    with_rewards: bool = False,
    routing_shape: tuple[int, int] | None = None,
) -> tuple[RolloutBatch, dict[str, float]]:
    """The data plane: each kept row, as tensors, to the data-parallel replica that trains it.

    Args:
        rows: this rank's rows (its engine's kept groups in (round, prompt) order; empty off leaders).
        take: ``take[r][e]`` = groups of engine ``e`` kept in round ``r`` (the same on every rank).
        n: responses per group; mini_batch_size: sequences per optimizer update over all ranks.
        placement, groups: engine placement and this rank's process groups.
        with_rewards: also deliver each row's shaped reward (float64, exact), global position and
            prompt length (``sequence_rewards``, ``sequence_ids``, ``prompt_lengths``), for KL in
            the reward; positions and prompt lengths follow from the gathered lengths, so only the
            rewards travel (8 bytes a row).
        routing_shape: ``(layers, top_k)`` when the rows carry the engine's expert ids (MoE
            routing replay / expert agreement): they travel as one more tensor (int16, every
            token of every row) and arrive as ``RolloutBatch.routed_experts`` (long; padding
            positions hold experts ``0..top_k-1``, a valid distinct set that nothing scores).

    Only the lengths of every row are all-gathered; every rank then computes the same split
    (:func:`~dapo_megatron.parallel.data.assign_data_parallel`) and each leader sends each replica's
    rows to every rank of that replica. Returns this rank's batch (rows in split order) and
    ``rollout/batch_bytes_per_rank`` (the most bytes any rank received) and ``rollout/batch_tokens``.
    """
    num_engines = placement.num_engines
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine_index, is_leader = placement.engine_of(rank), placement.is_leader(rank)
    rows_of = [sum(t[e] for t in take) * n for e in range(num_engines)]
    # Global order (round, engine, row): owner engine and local row of each global sequence.
    owner, offset = [], [0] * num_engines
    for t in take:
        for e in range(num_engines):
            owner += [(e, offset[e] + k) for k in range(t[e] * n)]
            offset[e] += t[e] * n
    # Small metadata: (prompt length, response length) of every row of every engine.
    width = max(rows_of)
    mine = torch.zeros(width, 2, dtype=torch.long)
    for j, row in enumerate(rows):
        mine[j, 0], mine[j, 1] = len(row.prompt_ids), len(row.response_ids)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = all_gather_cpu(mine)
        lens = [every[r] for r in placement.leaders]
    else:
        lens = [mine]
    seq_len = [int(lens[e][j].sum()) for e, j in owner]
    dp = groups.dp_size
    assignment = assign_data_parallel(seq_len, mini_batch_size=mini_batch_size, dp=dp)

    def pack_shapes(e: int, idx: list[int]) -> tuple[int, int]:
        toks = sum(int(lens[e][j].sum()) for j in idx)
        vals = sum(2 + int(lens[e][j, 1]) for j in idx)
        return toks, vals

    sends: dict[int, list[torch.Tensor]] = {}
    if is_leader and rows:
        me = engine_index
        for d in range(dp):
            idx = [owner[g][1] for g in assignment[d] if owner[g][0] == me]
            if not idx:
                continue
            toks = torch.tensor(
                [t for j in idx for t in rows[j].prompt_ids + rows[j].response_ids], dtype=torch.long
            )
            vals = torch.tensor(
                [
                    v
                    for j in idx
                    for v in [rows[j].advantage, float(rows[j].in_loss), *rows[j].rollout_log_probs]
                ],
                dtype=torch.float32,
            )
            payload = [toks, vals]
            if with_rewards:
                payload.append(torch.tensor([rows[j].reward for j in idx], dtype=torch.float64))
            if routing_shape is not None:
                payload.append(_packed_routing([rows[j] for j in idx], routing_shape))
            for rank in groups.replica_ranks[d]:
                sends[rank] = list(payload)
    mine_idx = assignment[groups.dp_rank]
    recvs: dict[int, list[torch.Tensor]] = {}
    reward_bufs: dict[int, torch.Tensor] = {}  # with_rewards: engine -> its rows' rewards, in row order
    routing_bufs: dict[int, torch.Tensor] = {}  # routing_shape: engine -> its rows' expert ids, end to end
    for e in range(num_engines):
        idx = [owner[g][1] for g in mine_idx if owner[g][0] == e]
        if idx:
            toks, vals = pack_shapes(e, idx)
            recvs[placement.leaders[e]] = [
                torch.empty(toks, dtype=torch.long),
                torch.empty(vals, dtype=torch.float32),
            ]
            if with_rewards:
                reward_bufs[e] = torch.empty(len(idx), dtype=torch.float64)
                recvs[placement.leaders[e]].append(reward_bufs[e])
            if routing_shape is not None:
                routing_bufs[e] = torch.empty(toks, *routing_shape, dtype=ROUTING_DTYPE)
                recvs[placement.leaders[e]].append(routing_bufs[e])
    received = exchange(sends, recvs)

    # Unpack into this rank's batch, in assignment order.
    cursor = {e: [0, 0, 0] for e in range(num_engines)}  # token, value and row offsets per engine
    num, width = len(mine_idx), max(seq_len[g] for g in mine_idx)
    input_ids = torch.full((num, width), pad_id, dtype=torch.long)
    response_mask = torch.zeros(num, width)
    advantages = torch.zeros(num, width)
    rollout_log_probs = torch.zeros(num, width)
    lengths = torch.zeros(num, dtype=torch.long)
    per_row: dict[str, torch.Tensor] = {}
    if routing_shape is not None:
        per_row["routed_experts"] = torch.arange(routing_shape[1]).expand(num, width, *routing_shape).clone()
    if with_rewards:
        per_row["sequence_rewards"] = torch.zeros(num, dtype=torch.float64)
        per_row["sequence_ids"] = torch.tensor(mine_idx, dtype=torch.long)
        per_row["prompt_lengths"] = torch.zeros(num, dtype=torch.long)
    for i, g in enumerate(mine_idx):
        e, j = owner[g]
        p, r = int(lens[e][j, 0]), int(lens[e][j, 1])
        toks, vals = recvs[placement.leaders[e]][:2]
        ti, vi, ri = cursor[e]
        input_ids[i, : p + r] = toks[ti : ti + p + r]
        if routing_shape is not None:
            per_row["routed_experts"][i, : p + r] = routing_bufs[e][ti : ti + p + r]
        if with_rewards:
            per_row["sequence_rewards"][i] = reward_bufs[e][ri]
            per_row["prompt_lengths"][i] = p
        adv, in_loss = float(vals[vi]), float(vals[vi + 1])
        response_mask[i, p : p + r] = in_loss
        advantages[i, p : p + r] = adv * in_loss
        rollout_log_probs[i, p : p + r] = vals[vi + 2 : vi + 2 + r]
        lengths[i] = p + r
        cursor[e] = [ti + p + r, vi + 2 + r, ri + 1]
    batch = RolloutBatch(
        input_ids=input_ids,
        seq_lengths=lengths,
        response_mask=response_mask,
        advantages=advantages,
        rollout_log_probs=rollout_log_probs,
        **per_row,
    )
    most = torch.tensor([float(received)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        most = all_reduce_cpu(most, op=dist.ReduceOp.MAX)
    return batch, {
        "rollout/batch_bytes_per_rank": float(most),
        "rollout/batch_tokens": float(sum(seq_len)),
    }


def kl_in_reward_advantages(
    batch: RolloutBatch,
    *,
    kl_coef: float,
    kl_type: str,
    n: int,
    norm_by_std: bool,
    contributes: bool,
) -> dict[str, float]:
    """KL in the reward: replace ``batch.advantages`` by the group advantages of the KL-shaped
    rewards ``reward_i - kl_coef * KL_i`` (:func:`~dapo_megatron.algo.sequence_kl_sums` over each
    row's response tokens, estimator ``kl_type``), exact for the whole batch on every rank.

    ``batch`` needs ``old_log_probs``, ``ref_log_probs`` and the fields of
    :func:`deliver_rows` ``(with_rewards=True)``. A group's responses sit on several data-parallel
    replicas, so every rank all-gathers (over all ranks) one row ``(sequence id, reward, KL)`` per
    sequence (24 bytes) and recomputes :func:`~dapo_megatron.algo.group_advantages` (``norm_by_std``;
    group = ``sequence id // n``) over the batch in its global order, the order the engines
    computed the delivered advantages in: with ``kl_coef = 0`` the result equals them bit for bit.
    Only ``contributes`` ranks count, one per replica: the log-probs are filled on the last pipeline
    stage only and are the same on its TP and CP ranks (vocab-parallel, gathered), so the trainer
    passes its reporting rank (last stage, TP rank 0, CP rank 0); gathering over every rank rather
    than the data-parallel group gives the other stages the same advantages. Rows out of the loss
    (overlong filtering) keep advantage 0 but count in their group's baseline, as in
    :meth:`RolloutCollector.shape`.

    Returns ``actor/kl_in_reward``: the mean per-sequence KL sum over the batch (the same on every rank).
    """
    for name in ("old_log_probs", "ref_log_probs", "sequence_rewards", "sequence_ids", "prompt_lengths"):
        if name not in batch:
            raise ValueError(f"KL in the reward needs RolloutBatch.{name}")
    positions = torch.arange(batch.input_ids.shape[1])[None]
    response = (positions >= batch.prompt_lengths[:, None]) & (positions < batch.seq_lengths[:, None])
    kl = sequence_kl_sums(batch.old_log_probs, batch.ref_log_probs, response, kl_type)
    mine = torch.stack([batch.sequence_ids.double(), batch.sequence_rewards.double(), kl], dim=1)
    if not contributes:
        mine[:, 0] = -1.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        # (every rank holds the same number of rows: assign_data_parallel splits evenly)
        mine = torch.cat(all_gather_cpu(mine))
    every = mine[mine[:, 0] >= 0]
    every = every[torch.argsort(every[:, 0])]
    ids = every[:, 0].long()
    if not torch.equal(ids, torch.arange(ids.numel())):
        raise RuntimeError(
            f"KL in the reward: the gathered sequence ids are not 0..{ids.numel() - 1} once each "
            "(one contributing rank per data-parallel replica expected)"
        )
    shaped = every[:, 1] - kl_coef * every[:, 2]
    adv = group_advantages(shaped, ids // n, norm_by_std=norm_by_std).float()
    batch.advantages = broadcast_advantages(adv[batch.sequence_ids], batch.response_mask)
    return {"actor/kl_in_reward": float(every[:, 2].mean())}


# Expert ids on the wire: int16 holds any expert index of a real MoE (Qwen3-30B-A3B: 128 experts)
# at a quarter of int64's bytes ([tokens, layers, top_k] per row is the data plane's largest tensor).
ROUTING_DTYPE = torch.int16


def _packed_routing(rows: list[Row], routing_shape: tuple[int, int]) -> torch.Tensor:
    """The rows' expert ids end to end, ``[sum(prompt + response), layers, top_k]`` int16."""
    parts = []
    for row in rows:
        t = row.routed_experts
        n = len(row.prompt_ids) + len(row.response_ids)
        if t is None or tuple(t.shape) != (n, *routing_shape):
            raise ValueError(
                f"the rollout engine's routed_experts must be [prompt + response = {n}, "
                f"{routing_shape[0]} layers, top_k {routing_shape[1]}] per response, got "
                f"{None if t is None else tuple(t.shape)}"
            )
        if t.numel() and int(t.max()) > torch.iinfo(ROUTING_DTYPE).max:
            raise ValueError(f"expert id {int(t.max())} does not fit the data plane's {ROUTING_DTYPE}")
        parts.append(t.to(ROUTING_DTYPE))
    return torch.cat(parts) if parts else torch.empty(0, *routing_shape, dtype=ROUTING_DTYPE)


def build_collector(cfg, placement: EnginePlacement, groups, *, routing_shape: tuple[int, int] | None = None):
    """Every rank: tokenizer, training data and sampler (the same prompt indices everywhere).
    Engine leaders also get the rollout engine (on ``model.hf_dir``) and the reward pool.
    ``routing_shape``: ``(layers, top_k)`` of a mixture-of-experts policy whose engines must record
    each token's experts (routing replay / expert agreement); ``None``: they do not.
    Returns ``(collector, validation dataset or None)``."""
    from transformers import AutoTokenizer

    from dapo_megatron.data.prompts import dataset_from_config
    from dapo_megatron.data.sampler import EpochSampler
    from dapo_megatron.rewards.pool import RewardPool
    from dapo_megatron.rollout import create_engine

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_dir or cfg.model.hf_dir)
    train = dataset_from_config(cfg.data, tokenizer, "train")
    val = dataset_from_config(cfg.data, tokenizer, "val") if cfg.data.val_files else None
    sampler = EpochSampler(
        len(train), cfg.trainer.gen_batch_size, shuffle=cfg.data.shuffle, seed=cfg.data.seed
    )
    engine = reward_pool = None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if placement.is_leader(rank):
        reward_pool = RewardPool.from_config(cfg.reward)
        dtype = HF_DTYPE_NAMES[cfg.model.dtype]
        options = dict(cfg.rollout.engine_options)
        if cfg.rollout.engine == "vllm" and placement.ranks_per_engine > 1:
            options["tensor_parallel_size"] = placement.ranks_per_engine
        if routing_shape is not None:
            options["record_routing"] = True
        engine = create_engine(
            cfg.rollout.engine, cfg.model.hf_dir, dtype=dtype, seed=cfg.trainer.seed, **options
        )
    collector = RolloutCollector(
        cfg,
        placement=placement,
        groups=groups,
        tokenizer=tokenizer,
        dataset=train,
        data_sampler=sampler,
        engine=engine,
        reward_pool=reward_pool,
        routing_shape=routing_shape,
    )
    return collector, val


def _running(counts: list[int], left: int) -> list[int]:
    """How many of each engine's ``counts`` fit, in engine order, into ``left`` remaining slots."""
    out = []
    for c in counts:
        t = max(min(c, left), 0)
        out.append(t)
        left -= t
    return out


def _add_response_sums(report: Report, samples: list[dict]) -> None:
    """Means over every generated response (what the policy does)."""
    k = len(samples)
    report.add("acc/mean", sum(s["acc"] for s in samples), k)
    report.add("score/mean", sum(s["score"] for s in samples), k)
    report.add("reward/mean", sum(s["reward"] for s in samples), k)
    report.add("response_length/mean", sum(len(s["response_ids"]) for s in samples), k)
    report.add("response_length/clip_ratio", sum(s["truncated"] for s in samples), k)
    report.max("response_length/max", max(len(s["response_ids"]) for s in samples))
    report.total("rollout/generated_tokens", sum(len(s["response_ids"]) for s in samples))
    report.total("rollout/generated_responses", k)


def _add_kept_sums(report: Report, samples: list[dict]) -> None:
    """Means over the responses kept for training."""
    report.add("acc/kept_mean", sum(s["acc"] for s in samples), len(samples))
    report.add("reward/kept_mean", sum(s["reward"] for s in samples), len(samples))
